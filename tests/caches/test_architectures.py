"""The architecture matrix: every cache on every architecture family, eager and SDPA.

Each cell either equals `DynamicCache` (full precision with nothing evicted: to float rounding; 8-bit
`QuantizedCache`: within a stated tolerance) or is refused at construction with a clear error
(`REFUSED`). The README's matrix is this table. Sink eviction is checked separately on every layer kind
of every RoPE family against a dense run over exactly the kept tokens.
"""

import re

import pytest
import torch
from conftest import EAGER_ONLY, MATRIX, NO_ATTENTION_INTERFACE, tiny_config
from eviction_reference import dense_on_kept
from helpers import prefill_then_tokens as feed
from helpers import random_ids
from transformers import AutoModelForCausalLM, DynamicCache

from hf_kvcache import (
    HeavyHitterCache,
    QuantizedCache,
    SinkCache,
    SlidingWindowCache,
    SnapKVCache,
    TOVACache,
    enable_score_capture,
)
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import model_geometry

QUANTIZED_8BIT_TOLERANCE = 0.02  # max |logit difference| at 8 bits, 4-token residual (logits are O(1))
CACHES = {
    "quantized-8bit": lambda config: QuantizedCache(config, bits=8, group_size=4, residual_length=4, sink_tokens=2),
    "window": lambda config: SlidingWindowCache(config, window=64),
    "sink": lambda config: SinkCache(config, sink_tokens=4, window=60),
    "sink-4bit": lambda config: SinkCache(config, sink_tokens=4, window=60, bits=4, residual_length=64),
    "h2o": lambda config: HeavyHitterCache(config, budget=64),
    "tova": lambda config: TOVACache(config, budget=64),
    "snapkv": lambda config: SnapKVCache(config, budget=64),
}
NO_SCORE_CAPTURE = r"FalconForCausalLM does not take attention functions from transformers' AttentionInterface"
SCORE_CACHES = ("h2o", "tova", "snapkv")
REFUSED = {
    **{(arch, cache): NO_SCORE_CAPTURE for arch in NO_ATTENTION_INTERFACE for cache in SCORE_CACHES},
    ("gpt2", "sink"): r"gpt2 layer 0 \(full_attention\) has no rotary position embedding.*rerotate=False",
    ("gpt2", "sink-4bit"): r"gpt2 layer 0 \(full_attention\) has no rotary position embedding.*rerotate=False",
}
CELLS = [
    pytest.param(arch, cache, attn, id=f"{arch}-{cache}-{attn}")
    for arch in MATRIX
    for cache in CACHES
    for attn in ("eager", "sdpa")
    if not (attn == "sdpa" and arch in EAGER_ONLY)
]


def widen_model_window(config) -> None:
    """Sinks take room in a sliding or chunked layer's window (tested in test_sink.py); widen the model's
    window so that nothing is evicted."""
    for name in ("sliding_window", "attention_chunk_size"):
        if getattr(config, name, None):
            setattr(config, name, 64)


def model_from(config, attn: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize(("arch", "cache_name", "attn"), CELLS)
def test_matrix_cell_equals_dynamic_cache_or_is_refused(arch, cache_name, attn):
    config = tiny_config(arch)
    if cache_name.startswith("sink"):
        widen_model_window(config)
    model = model_from(config, attn)

    def build():
        if cache_name in SCORE_CACHES:
            enable_score_capture(model)
        return CACHES[cache_name](model.config)

    if (arch, cache_name) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[arch, cache_name]):
            build()
        return
    ids = random_ids(model, 2, 16)
    cache = build()
    expected = feed(model, ids, DynamicCache(config=model.config))
    actual = feed(model, ids, cache)
    if cache_name == "quantized-8bit":
        assert (actual - expected).abs().max() < QUANTIZED_8BIT_TOLERANCE
        assert any(getattr(layer.body, "quantized_length", 0) for layer in cache.layers if hasattr(layer, "body"))
    else:
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    generated = model.generate(
        ids[:1], max_new_tokens=4, do_sample=False, **{CACHE_KWARG: CACHES[cache_name](model.config)}
    )
    assert torch.equal(generated, model.generate(ids[:1], max_new_tokens=4, do_sample=False))


SINKS, WINDOW = 2, 10
ROPE_FAMILIES = [arch for arch in MATRIX if arch not in ("gpt2", "qwen3-next-linear-hybrid")]


def silence_other_layers(model, probe: int) -> None:
    """Zero the attention output of every layer but `probe`: the other layers then act on each token alone,
    so a dense run over the kept tokens is an exact reference for what the probed layer's cache holds."""
    pattern = re.compile(r"(?:layers|h)\.(\d+)\.(?:self_attn|attention|self_attention)\.(?:o_proj|dense)$")
    with torch.no_grad():
        for name, module in model.named_modules():
            if (found := pattern.search(name)) and int(found.group(1)) != probe:
                module.weight.zero_()


def probes(arch: str) -> list[tuple[int, str]]:
    """The first layer of each kind in the architecture."""
    first = {}
    for layer in model_geometry(tiny_config(arch)).layers:
        first.setdefault(layer.kind, layer.index)
    return [(index, kind) for kind, index in first.items()]


@pytest.mark.parametrize(
    ("arch", "probe"),
    [pytest.param(arch, probe, id=f"{arch}-{kind}") for arch in ROPE_FAMILIES for probe, kind in probes(arch)],
)
def test_sink_eviction_on_every_layer_kind_equals_a_dense_run_on_the_kept_tokens(arch, probe):
    """Each layer re-rotates its sinks with its own RoPE (Gemma 3's local base, Gemma 4's head sizes, NoPE
    layers not at all, DeepSeek-V3's rotated latent in the value slot, interleaved pairs in Cohere 2)."""
    config = tiny_config(arch)
    widen_model_window(config)  # the model's own window stays wider than sinks + window
    model = model_from(config, "eager")
    silence_other_layers(model, probe)
    ids = random_ids(model, 1, 30, seed=3)
    cache = SinkCache(model.config, sink_tokens=SINKS, window=WINDOW)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits = model(ids[:, t : t + 1], **{CACHE_KWARG: cache}).logits
            if t > SINKS + WINDOW:
                kept = list(range(SINKS)) + list(range(t - WINDOW, t))
                expected = dense_on_kept(model, ids, kept, [t], first_label=t - len(kept))
                torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "arch", ["deepseek-v3-mla", "gemma4-per-layer-dims", "gpt-oss-sinks", "cohere2-interleaved-nope"]
)
@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
def test_score_caches_evict_on_every_kind_of_layer(arch, cache_class):
    """Past the budget, each full-attention layer keeps `budget` tokens (per cached head: DeepSeek-V3's single
    latent takes the scores of all attention heads), sliding layers keep the model's window, and
    `generate` goes on with the evicted cache."""
    model = enable_score_capture(model_from(tiny_config(arch), "eager"))
    ids = random_ids(model, 2, 20)
    extra = {"observation_window": 2} if cache_class is SnapKVCache else {}
    cache = cache_class(model.config, budget=6, **extra)
    feed(model, ids, cache)  # a prefill of 8, then 12 single tokens
    kept = 6 + 12 if cache_class is SnapKVCache else 6  # SnapKV compresses prompts only; decoding grows
    for layer, geometry in zip(cache.layers, cache.geometry.layers):
        if geometry.kind == "full_attention":
            assert layer.stored_tokens == kept and layer.body.keys.shape[1] == geometry.kv_heads
        else:
            assert layer.stored_tokens == min(20, geometry.window - 1)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, **{CACHE_KWARG: cache})
    assert out.shape == (2, 23)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cache_name", ["window", "sink"])
def test_window_smaller_than_a_chunk_still_gets_the_chunk_mask(attn, cache_name):
    """Llama 4's chunked layers, chunk 16, a cache keeping fewer tokens: SDPA must not drop the mask (it
    would let the first queries of a chunk see the end of the previous one). Within the second chunk the
    model attends only to that chunk's tokens, all kept, so the logits equal DynamicCache's."""
    config = tiny_config("llama4-chunked")
    config.num_hidden_layers, config.no_rope_layers, config.attention_chunk_size = 1, [1], 16
    model = model_from(config, attn)
    cache = SlidingWindowCache(config, window=10) if cache_name == "window" else SinkCache(config, 2, 10)
    ids = random_ids(model, 1, 26)
    logits = torch.cat([model(ids[:, t : t + 1], **{CACHE_KWARG: cache}).logits for t in range(26)], dim=1)
    with torch.no_grad():
        expected = model(ids).logits
    if cache_name == "window":
        torch.testing.assert_close(logits[:, 16:26], expected[:, 16:26], atol=2e-5, rtol=1e-4)
    else:  # sinks sit before the window; only the tokens of the chunk itself are visible
        assert model_geometry(config).layers[0].kind == "chunked_attention"
        torch.testing.assert_close(logits[:, 16:22], expected[:, 16:22], atol=2e-5, rtol=1e-4)
