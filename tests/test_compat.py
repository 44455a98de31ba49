"""The cache argument's name across transformers versions."""

import pytest
import transformers
from packaging.version import Version

from hf_kvcache.compat import CACHE_KWARG, pop_cache


def test_the_installed_version_gets_the_name_it_prefers():
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert ("cache" if renamed else "past_key_values") == CACHE_KWARG


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_user_may_pass_either_name(name):
    kwargs = {name: "the cache", "max_new_tokens": 3}
    assert pop_cache(kwargs) == "the cache" and kwargs == {"max_new_tokens": 3}
    assert pop_cache({}) is None


def test_both_names_at_once_are_refused():
    with pytest.raises(ValueError, match="not both"):
        pop_cache({"cache": 1, "past_key_values": 2})
