"""`Storage` refuses what it would ignore: a non-bool `token_wise`, and code settings with `bits=None` (fuzzed)."""

import pytest
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kvcache import HeavyHitterCache, SinkCache, SlidingWindowCache, Storage, build_cache
from hf_kvcache.caches.base import CODE_SETTINGS

DEFAULTS = Storage()


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, None, 1.0])
def test_token_wise_must_be_a_bool(value):
    with pytest.raises(ValueError, match=rf"token_wise={value!r} must be True or False"):
        Storage(bits=4, token_wise=value)


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ({"key_bits": 4}, "key_bits=4 applies"),
        ({"group_size": 8}, "group_size=8 applies"),
        ({"key_group_size": 16}, "key_group_size=16 applies"),
        ({"residual_length": 4}, "residual_length=4 applies"),
        ({"rotate": False}, "rotate=False applies"),
        ({"key_outliers": 2}, "key_outliers=2 applies"),
        ({"codebook": "normal"}, "codebook='normal' applies"),
        ({"group_size": 8, "residual_length": 4}, "group_size=8, residual_length=4 apply"),
    ],
)
def test_code_settings_without_bits_are_refused_naming_them(given, shown):
    with pytest.raises(ValueError, match=rf"^{shown} only to quantized storage, but bits=None stores full precision"):
        Storage(**given)
    Storage(bits=4, **given)  # with codes they apply


def test_defaults_and_token_wise_full_precision_are_accepted():
    assert Storage(token_wise=True).bits is None  # the policy caches' own full-precision storage
    assert Storage(residual_length=128, rotate=True, codebook="uniform", key_outliers=0) == DEFAULTS


def test_caches_and_specs_refuse_code_settings_without_bits():
    config = tiny_config("llama")
    for make in (
        lambda: HeavyHitterCache(config, budget=8, residual_length=4),
        lambda: SlidingWindowCache(config, window=8, group_size=8),
        lambda: SinkCache(config, window=8, rotate=False),
        lambda: build_cache("knorm:budget=8,residual_length=4", config),
    ):
        with pytest.raises(ValueError, match=r"only to quantized storage, but bits=None"):
            make()
    assert build_cache("knorm:budget=8,bits=4,residual_length=4", config).layers[0].storage.residual_length == 4


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([2, 3, 4, 8, "uniform", "normal", "no", 4.0])
)


def accepted(name: str, value: object, bits: object) -> bool:
    """A plain reading of the contract for one setting, the others at their defaults."""
    plain_int = isinstance(value, int) and not isinstance(value, bool)
    if name == "bits":
        return value is None or (plain_int and value in (2, 3, 4, 8))
    if name in ("rotate", "token_wise"):
        valid = isinstance(value, bool)
    elif name == "key_bits":
        valid = value is None or (plain_int and value in (2, 3, 4, 8))
    elif name in ("group_size", "key_group_size"):
        valid = value is None or (plain_int and value >= 1)
    elif name in ("residual_length", "key_outliers"):
        valid = plain_int and value >= 0
    else:  # codebook
        valid = isinstance(value, str) and value in ("uniform", "normal")
    ignored = bits is None and name in CODE_SETTINGS and value != getattr(DEFAULTS, name)
    return valid and not ignored


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["bits", "token_wise", *CODE_SETTINGS]),
    value=ANY_VALUE,
    bits=st.sampled_from([None, 4]),
)
def test_storage_accepts_exactly_the_valid_settings(name, value, bits):
    kwargs = {"bits": bits, name: value}
    if accepted(name, value, kwargs["bits"]):
        assert getattr(Storage(**kwargs), name) == value
    else:
        with pytest.raises(ValueError, match=rf"{name}="):
            Storage(**kwargs)
