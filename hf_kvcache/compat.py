"""The names transformers uses for a cache argument, across the supported 5.x versions.

transformers 5.24 renamed the argument `past_key_values=` to `cache=` (model forwards drop the old name
in 5.40, `generate` in 6.0; passing both raises). The library's own calls use `CACHE_KWARG`, the name
the installed version prefers, so nothing it runs emits a deprecation warning; functions that take a
cache from a user accept both names through `pop_cache`.
"""

from typing import Any

import transformers
from packaging.version import Version

CACHE_RENAMED_IN = Version("5.24.0")
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= CACHE_RENAMED_IN.release else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache a user passed as `cache=` or `past_key_values=` (None if neither).

    Raises:
        ValueError: both names were given.
    """
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache as `cache=` or as `past_key_values=`, not both")
    values = [kwargs.pop(name, None) for name in CACHE_NAMES]
    return next((value for value in values if value is not None), None)
