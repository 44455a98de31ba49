"""Hybrid models: attention layers held by the cache's strategy, recurrent layers exactly as transformers holds them.

Tiny hybrids of three kinds of recurrent layer: Qwen3-Next (gated-delta linear attention, the Qwen 3.5 layout),
LFM2 (short convolutions) and Jamba (Mamba). Every cache equals `DynamicCache` where nothing is evicted and
precision is full, assisted decoding rolls the recurrent state back (transformers 5.25's
`recurrent_states_to_keep`), and eviction touches the attention layers only.
"""

import pytest
import torch
import transformers
from conftest import tiny_config
from helpers import prefill_then_tokens as feed
from helpers import random_ids
from packaging.version import Version
from transformers import AutoModelForCausalLM, DynamicCache

from hf_kvcache import (
    HeavyHitterCache,
    QuantizedCache,
    SinkCache,
    SlidingWindowCache,
    SnapKVCache,
    enable_score_capture,
)
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import model_geometry

HYBRIDS = {
    "qwen3-next": lambda: tiny_config("qwen3-next-linear-hybrid"),
    "lfm2": lambda: transformers.Lfm2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv"],
        pad_token_id=0,
    ),
    "jamba": lambda: transformers.JambaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=4,
        expert_layer_offset=3,
        mamba_d_state=8,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
        pad_token_id=0,
    ),
}
CACHES = {
    "quantized-8bit": lambda config: QuantizedCache(config, bits=8, group_size=4, residual_length=4),
    "window": lambda config: SlidingWindowCache(config, window=64),
    "sink": lambda config: SinkCache(config, sink_tokens=4, window=60),
    "h2o": lambda config: HeavyHitterCache(config, budget=64),
    "snapkv": lambda config: SnapKVCache(config, budget=64, observation_window=4),
}
NO_ROPE = ("jamba",)  # its attention layers have no position encoding: sinks cannot be re-rotated (refused)


def model_of(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(HYBRIDS[name](), attn_implementation="eager").eval()


def recurrent_bytes(cache) -> int:
    return sum(
        t.nbytes
        for layer in cache.layers
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {}))
        for t in states.values()
        if t is not None
    )


@pytest.mark.parametrize("hybrid", HYBRIDS)
@pytest.mark.parametrize("cache_name", CACHES)
def test_hybrid_model_equals_dynamic_cache_with_every_cache(hybrid, cache_name):
    model = model_of(hybrid)
    geometry = model_geometry(model.config)
    assert geometry.recurrent_layers and any(layer.is_attention for layer in geometry.layers)
    if cache_name in ("h2o", "snapkv"):
        enable_score_capture(model)
    if cache_name == "sink" and hybrid in NO_ROPE:
        with pytest.raises(ValueError, match=r"has no rotary position embedding"):
            CACHES[cache_name](model.config)
        return
    ids = random_ids(model, 2, 14)
    reference = DynamicCache(config=model.config)
    expected = feed(model, ids, reference)
    cache = CACHES[cache_name](model.config)
    actual = feed(model, ids, cache)
    if cache_name == "quantized-8bit":
        assert (actual - expected).abs().max() < 0.02
    else:
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    for ours, theirs, layer in zip(cache.layers, reference.layers, geometry.layers):
        if layer.keeps_recurrent_state:  # transformers' own class, holding the same state
            assert type(ours) is type(theirs)
    breakdown = cache.memory_breakdown()
    assert breakdown["recurrent_state"] == recurrent_bytes(reference) > 0
    assert breakdown["attention"] > 0 and cache.memory_bytes() == sum(breakdown.values())
    generated = model.generate(
        ids[:1], max_new_tokens=4, do_sample=False, **{CACHE_KWARG: CACHES[cache_name](model.config)}
    )
    assert torch.equal(generated, model.generate(ids[:1], max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("hybrid", ["qwen3-next", "lfm2"])
@pytest.mark.parametrize("cache_name", ["quantized-8bit", "window", "sink"])
def test_prompt_lookup_decoding_rolls_back_the_recurrent_state(hybrid, cache_name):
    """Prompt lookup drafts tokens from the prompt and rolls rejected ones back (`crop`): the attention layers
    through our crop, the recurrent ones through transformers' recorded states."""
    model = model_of(hybrid)
    base = random_ids(model, 1, 6, seed=3)
    prompt = torch.cat([base, base, base, random_ids(model, 1, 3, seed=4)], dim=1)
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    cache = CACHES[cache_name](model.config)
    lookup = dict(max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
    if Version(transformers.__version__) < Version("5.25") and getattr(model, "_is_stateful", False):
        # before 5.25 transformers refuses assisted decoding of stateful models, DynamicCache included
        with pytest.raises(ValueError, match="not supported with stateful models"):
            model.generate(prompt, **lookup, **{CACHE_KWARG: cache})
        return
    out = model.generate(prompt, **lookup, **{CACHE_KWARG: cache})
    assert torch.equal(out, expected)


def test_eviction_applies_to_attention_layers_only():
    model = enable_score_capture(model_of("qwen3-next"))
    ids = random_ids(model, 1, 24)
    cache = HeavyHitterCache(model.config, budget=6, recent=2)
    reference = DynamicCache(config=model.config)
    feed(model, ids, cache)
    feed(model, ids, reference)
    for layer, geometry in zip(cache.layers, cache.geometry.layers):
        if geometry.is_attention:
            assert layer.stored_tokens == 6
    assert cache.memory_breakdown()["recurrent_state"] == recurrent_bytes(reference)
