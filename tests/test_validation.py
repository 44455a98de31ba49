"""Every public constructor refuses every bad value at construction, naming the parameter (fuzzed)."""

from dataclasses import dataclass
from typing import Any

import pytest
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache import (
    DiskBackend,
    HeavyHitterCache,
    MemoryBackend,
    PrefixCache,
    QuantizedCache,
    RedisBackend,
    SinkCache,
    SlidingWindowCache,
    SnapKVCache,
    TOVACache,
)
from hf_kvcache.policies import Knorm, PyramidKV, StreamingLLM


@dataclass(frozen=True)
class Kind:
    """Which values a parameter accepts."""

    types: tuple[type, ...]
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    optional: bool = False
    above_minimum: bool = False  # the minimum itself is refused

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) and bool not in self.types:
            return False
        if not isinstance(value, self.types):
            return False
        if self.choices:
            return any(type(value) is type(choice) and value == choice for choice in self.choices)
        if isinstance(value, str):
            return bool(value)
        if self.minimum is not None and not (value > self.minimum if self.above_minimum else value >= self.minimum):
            return False
        return self.maximum is None or value <= self.maximum


NON_NEGATIVE, POSITIVE = Kind((int,), 0), Kind((int,), 1)
OPTIONAL_POSITIVE = Kind((int,), 1, optional=True)
BOOL = Kind((bool,))
BITS, OPTIONAL_BITS = Kind((int,), choices=(2, 3, 4, 8)), Kind((int,), choices=(2, 3, 4, 8), optional=True)
SECONDS = Kind((int, float), 0, above_minimum=True)
TEXT = Kind((str,))
STORAGE = {"bits": OPTIONAL_BITS, "group_size": OPTIONAL_POSITIVE, "residual_length": NON_NEGATIVE, "rotate": BOOL}
CONFIG = tiny_config("llama")

CONSTRUCTORS = {
    "QuantizedCache": (
        lambda **kw: QuantizedCache(CONFIG, **kw),
        {
            **STORAGE,
            "bits": BITS,
            "sink_tokens": NON_NEGATIVE,
            "key_bits": OPTIONAL_BITS,
            "key_group_size": OPTIONAL_POSITIVE,
            "key_outliers": Kind((int,), 0, 15),  # fewer than the tiny model's 16-token key blocks
            "codebook": Kind((str,), choices=("uniform", "normal")),
        },
    ),
    "SlidingWindowCache": (lambda **kw: SlidingWindowCache(CONFIG, **kw), {**STORAGE, "window": POSITIVE}),
    "SinkCache": (
        lambda **kw: SinkCache(CONFIG, **kw),
        {**STORAGE, "sink_tokens": NON_NEGATIVE, "window": POSITIVE, "rerotate": BOOL},
    ),
    "HeavyHitterCache": (
        lambda **kw: HeavyHitterCache(CONFIG, **kw),
        {
            **STORAGE,
            "budget": POSITIVE,
            "recent": Kind((int,), 0, 256, optional=True),
            "accumulate": Kind((str,), choices=("sum", "mean")),
            "per_head": BOOL,
        },
    ),
    "TOVACache": (lambda **kw: TOVACache(CONFIG, **kw), {**STORAGE, "budget": POSITIVE, "per_head": BOOL}),
    "SnapKVCache": (
        lambda **kw: SnapKVCache(CONFIG, **kw),
        {
            **STORAGE,
            "budget": POSITIVE,
            "observation_window": Kind((int,), 1, 256),
            "pooling": Kind((str,), choices=("max", "avg")),
            "per_head": BOOL,
        },
    ),
    "Knorm": (Knorm, {"budget": POSITIVE, "per_head": BOOL}),
    "StreamingLLM": (StreamingLLM, {"budget": POSITIVE, "sink_tokens": Kind((int,), 0, 256)}),
    "PyramidKV": (PyramidKV, {"budget": POSITIVE, "beta": POSITIVE}),
    "MemoryBackend": (MemoryBackend, {"max_bytes": OPTIONAL_POSITIVE}),
    "DiskBackend": (lambda **kw: DiskBackend(**{"path": "/nonexistent-parent/never-created", **kw}), {"path": TEXT}),
    "PrefixCache": (
        lambda **kw: PrefixCache(MemoryBackend(), **kw),
        {"block_size": POSITIVE, "prefetch_blocks": NON_NEGATIVE, "secret": Kind((str, bytes), optional=True)},
    ),
    "RedisBackend": (
        RedisBackend,
        {
            "url": TEXT,
            "prefix": TEXT,
            "ttl": OPTIONAL_POSITIVE,
            "socket_timeout": SECONDS,
            "socket_connect_timeout": SECONDS,
            "retry_after": Kind((int, float), 0),
        },
    ),
}
CASES = [(name, param) for name, (_, params) in CONSTRUCTORS.items() for param in params]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(0, 9), max_size=2),
)


@pytest.mark.parametrize(("constructor", "param"), CASES, ids=[f"{name}-{param}" for name, param in CASES])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_bad_values_are_refused_at_construction_naming_the_parameter(constructor, param, data):
    make, params = CONSTRUCTORS[constructor]
    value = data.draw(ANY_VALUE.filter(lambda v: not params[param].accepts(v)), label=param)
    kwargs = {param: value}
    if param in ("group_size", "residual_length", "rotate"):
        kwargs.setdefault("bits", 4)  # storage settings matter only with codes
    with pytest.raises(ValueError) as refused:
        make(**kwargs)
    assert f"{param}=" in str(refused.value)


def test_unknown_redis_keywords_are_refused_at_construction():
    with pytest.raises(ValueError, match="not a redis-py connection option"):
        RedisBackend(not_an_option=1)
