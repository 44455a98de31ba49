import pytest
from conftest import tiny_config
from transformers import DynamicCache
from transformers.cache_utils import QuantizedCache as TransformersQuantizedCache

import hf_kvcache.registry as registry
from hf_kvcache import QuantizedCache
from hf_kvcache.registry import CacheSpec, build_cache, describe_caches, parse_cache_spec, register_cache


def test_parse_converts_types_and_labels():
    spec = parse_cache_spec("quantized:bits=2, group_size=16,rotate=false")
    assert spec == CacheSpec("quantized", {"bits": 2, "group_size": 16, "rotate": False})
    assert spec.label == "quantized:bits=2,group_size=16,rotate=False"
    assert parse_cache_spec("dynamic").label == "dynamic"
    assert parse_cache_spec("hf-quantized:backend=hqq,bits=none").params == {"backend": "hqq", "bits": None}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "registered caches: .*dynamic.*quantized"),
        ("quantized:bitz=2", "accepted parameters: bits, group_size"),
        ("quantized:bits=two", "bits='two' is not a valid value"),
        ("quantized:rotate=maybe", "rotate='maybe'"),
        ("quantized:bits", "key=value"),
        ("quantized:bits=2,bits=4", "twice"),
        ("dynamic:bits=2", "accepted parameters: none"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_cache_spec(text)


def test_build_cache():
    config = tiny_config("llama")
    cache = build_cache("quantized:bits=2,group_size=16", config)
    assert isinstance(cache, QuantizedCache) and cache.storage.bits == 2 and cache.storage.group_size == 16
    assert isinstance(build_cache("dynamic", config), DynamicCache)
    hf = build_cache("hf-quantized:backend=hqq,bits=2,residual_length=32", config)
    assert isinstance(hf, TransformersQuantizedCache)
    assert hf.layers[0].nbits == 2 and hf.layers[0].residual_length == 32
    assert build_cache("quantized", config).layers[0].storage.group_size == 16  # the default fits every head size
    with pytest.raises(ValueError, match=r"group_size=32 must divide the 16 grouped channels of layer 0"):
        build_cache("quantized:group_size=32", config)


def test_hf_quantized_errors(monkeypatch):
    config = tiny_config("llama")
    with pytest.raises(ValueError, match="accepted values: quanto, hqq, fp8"):
        build_cache("hf-quantized:backend=int8", config)
    with pytest.raises(ValueError, match="fp8 quantizes per tensor"):
        build_cache("hf-quantized:backend=fp8,bits=4", config)
    monkeypatch.setattr(registry, "_installed", lambda module: False)
    with pytest.raises(ValueError, match="pip install optimum-quanto"):
        build_cache("hf-quantized:backend=quanto", config)


def test_register_reads_signature():
    def tiny(config, window: int = 8, label: str | None = None, exact: bool = False) -> DynamicCache:
        assert isinstance(window, int)
        return DynamicCache(config=config)

    register_cache("test-tiny", tiny, "a test strategy")
    try:
        assert (
            "test-tiny: a test strategy (window: int = 8, label: str|None = None, exact: bool = False)"
            in describe_caches()
        )
        assert parse_cache_spec("test-tiny:window=3,exact=yes").params == {"window": 3, "exact": True}
        assert isinstance(build_cache("test-tiny:window=3", tiny_config("llama")), DynamicCache)
        with pytest.raises(ValueError, match="contain none of"):
            register_cache("bad:name", tiny, "x")
    finally:
        registry._REGISTRY.pop("test-tiny")
