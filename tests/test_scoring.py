"""Score capture: the registered attention leaves outputs unchanged and computes exact chunked scores."""

import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import MATRIX, NO_ATTENTION_INTERFACE, make_tiny_model
from helpers import chunked_logits, dynamic_logits, random_ids
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hf_kvcache import HeavyHitterCache, SnapKVCache, TOVACache, disable_score_capture, enable_score_capture, scoring
from hf_kvcache.attention import routing
from hf_kvcache.attention.probabilities import allowed_keys
from hf_kvcache.caches.evicting import EvictionCache, PolicyLayer
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import EvictionPolicy
from hf_kvcache.scoring import CAPTURE_PREFIX, ScoreCaptureError, attention_scores


def small_cache(cache_class, config, budget: int = 8, **kwargs):
    """A score-based cache with a small budget (and a recent/observation window that fits in it)."""
    extra = {HeavyHitterCache: {"recent": 2}, SnapKVCache: {"observation_window": 2}}.get(cache_class, {})
    return cache_class(config, budget=budget, **extra, **kwargs)


def dense_scores(query, key, allowed, last):
    """Reference: the full softmax matrix, last `last` rows summed, averaged over each KV head's group."""
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    keys = key.repeat_interleave(q_heads // kv_heads, dim=1)
    logits = (query @ keys.transpose(-1, -2)) / dim**0.5
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)[:, :, -last:].sum(-2)
    return weights.view(batch, kv_heads, q_heads // kv_heads, -1).mean(2)


@pytest.mark.parametrize("last", [1, 5, 7])
def test_chunked_scores_equal_dense_scores(monkeypatch, last):
    monkeypatch.setattr(scoring, "QUERY_CHUNK", 3)  # several chunks, the last one partial
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 7, 8, generator=generator)
    key = torch.randn(2, 3, 12, 8, generator=generator)
    causal = torch.arange(12)[None, :] <= torch.arange(7)[:, None] + 5  # 5 stored tokens, then 7 queries
    expected = dense_scores(query, key, causal, last)
    assert torch.allclose(attention_scores(query, key, None, None, last), expected, atol=1e-5)
    bool_mask = causal.clone()[None, None].expand(2, 1, 7, 12).clone()
    bool_mask[1, :, :, 0] = False  # a per-row mask is honoured
    expected = dense_scores(query, key, bool_mask, last)
    assert torch.allclose(attention_scores(query, key, bool_mask, None, last), expected, atol=1e-5)
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.allclose(attention_scores(query, key, float_mask, None, last), expected, atol=1e-5)
    # each query's weights sum to one, so the totals count the queries
    assert torch.allclose(expected.sum(-1), torch.full((2, 3), float(last)), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2-softcap", "gpt-oss-sinks"])
@pytest.mark.parametrize("boolean", [True, False])
def test_attention_probabilities_are_the_models_eager_weights(arch, boolean):
    """On a left-padded batch, with the model's own scaling, softcapping (Gemma 2) and learned sinks (GPT-OSS):
    `attention_probabilities` equals the weights of the modeling file's `eager_attention_forward`, for every
    real query, given a boolean or an additive mask; padding queries get zeros."""
    module = make_tiny_model(arch, "eager").model.layers[0].self_attn
    config = module.config
    q_heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, module.head_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, q_heads, 9, dim, generator=generator)
    key, value = (torch.randn(2, kv_heads, 9, dim, generator=generator) for _ in range(2))
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, :3] = False  # row 1 is left-padded
    allowed = (torch.arange(9)[None, :] <= torch.arange(9)[:, None])[None, None] & real[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    softcap, sinks = getattr(config, "attn_logit_softcapping", None), getattr(module, "sinks", None)
    assert (sinks is not None) == (arch == "gpt-oss-sinks") and (softcap is not None) == (arch == "gemma2-softcap")
    eager = sys.modules[type(module).__module__].eager_attention_forward
    _, weights = eager(module, query, key, value, additive, scaling=module.scaling, dropout=0.0, softcap=softcap)
    given = allowed_keys(allowed if boolean else additive, slice(0, 9), 9, 9, "cpu")
    logits = scoring.grouped_logits(query, key, slice(0, 9), module.scaling)
    probabilities = scoring.attention_probabilities(logits, given, softcap, sinks, real_queries=real)
    by_query = probabilities.flatten(1, 2).permute(0, 2, 1, 3)  # [batch, rows, q_heads, kv]
    torch.testing.assert_close(by_query[real], weights.float().permute(0, 2, 1, 3)[real], atol=1e-6, rtol=1e-5)
    assert by_query[~real].abs().sum() == 0


def test_interfaces_registered_together_once():
    routing.install()
    entries = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    for base in ("sdpa", "eager"):
        assert CAPTURE_PREFIX + base in entries[0] and CAPTURE_PREFIX + base in entries[1]
    routing.install()  # idempotent: no second wrapper around the first
    assert (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)) == entries


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_capture_leaves_outputs_unchanged(arch, attn):
    model = make_tiny_model(arch, attn)
    ids = random_ids(model, 2, 30)
    expected_chunked = dynamic_logits(model, ids, chunk=7)
    with torch.no_grad():
        expected_plain = model(ids, use_cache=False).logits
    expected_generate = model.generate(ids, max_new_tokens=10, do_sample=False)
    enable_score_capture(model)
    assert model.config._attn_implementation == CAPTURE_PREFIX + attn
    assert torch.equal(dynamic_logits(model, ids, chunk=7), expected_chunked)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, expected_plain)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), expected_generate)
    enable_score_capture(model)  # idempotent
    disable_score_capture(model)
    assert model.config._attn_implementation == attn


def test_enable_refuses_other_attention_implementations():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        enable_score_capture(model)


@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_budget_above_length_matches_dynamic_cache(cache_class, arch, attn):
    """Nothing is evicted, so chunked logits and greedy generate equal DynamicCache's exactly."""
    model = enable_score_capture(make_tiny_model(arch, attn))
    ids = random_ids(model, 2, 40)
    cache = cache_class(model.config, budget=64)
    assert torch.equal(chunked_logits(model, ids, cache, chunk=6), dynamic_logits(model, ids, chunk=6))
    assert cache.get_seq_length() == 40 == cache.stored_tokens
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    actual = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache_class(model.config, 64))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
def test_quantized_storage_tracks_full_precision_at_8_bits(cache_class, attn):
    """Kept tokens held as 8-bit per-token codes: logits within 5e-3 of DynamicCache while nothing is
    evicted; with eviction, close to the same policy in full precision (a token whose score is within
    the quantization noise of another's may be kept instead of it: 5e-2), in fewer bytes."""
    model = enable_score_capture(make_tiny_model("llama", attn))
    ids = random_ids(model, 2, 40)
    storage = {"group_size": 8, "residual_length": 4}
    full = small_cache(cache_class, model.config, budget=16)
    quantized = small_cache(cache_class, model.config, budget=16, bits=8, **storage)
    difference = (chunked_logits(model, ids, quantized, chunk=6) - chunked_logits(model, ids, full, chunk=6)).abs()
    assert 0 < difference.max() < 5e-2
    assert quantized.stored_tokens == full.stored_tokens == 16
    assert quantized.layers[0].body.quantized_length >= 12
    assert quantized.memory_bytes() < 0.7 * full.memory_bytes()
    no_eviction = cache_class(model.config, budget=64, bits=8, **storage)
    difference = chunked_logits(model, ids, no_eviction, chunk=6) - dynamic_logits(model, ids, chunk=6)
    assert difference.abs().max() < 5e-3


@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
def test_quantized_storage_under_beam_search_and_sampling(cache_class):
    model = enable_score_capture(make_tiny_model("qwen2"))
    ids = random_ids(model, 2, 20)
    storage = {"bits": 4, "group_size": 8, "residual_length": 4}
    cache = small_cache(cache_class, model.config, budget=10, **storage)
    output = model.generate(ids, max_new_tokens=8, num_beams=2, do_sample=False, past_key_values=cache)
    assert output.shape == (2, 28) and cache.get_seq_length() == 27
    assert all(layer.stored_tokens <= 10 + 7 for layer in cache.layers)  # SnapKV grows while decoding
    torch.manual_seed(0)
    sampled = model.generate(
        ids, max_new_tokens=8, do_sample=True, past_key_values=small_cache(cache_class, model.config, 10, **storage)
    )
    assert sampled.shape == (2, 28)


@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
def test_score_cache_without_capture_raises(cache_class):
    model = make_tiny_model("llama")
    cache = small_cache(cache_class, model.config)
    with pytest.raises(ScoreCaptureError, match="enable_score_capture"):
        model(random_ids(model, 1, 12), past_key_values=cache)


@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
def test_crop_refused_clearly(cache_class):
    """Assisted decoding crops the cache; evicted tokens cannot come back, so a score cache says so."""
    model = enable_score_capture(make_tiny_model("llama"))
    cache = small_cache(cache_class, model.config)
    with torch.no_grad():
        model(random_ids(model, 1, 12), past_key_values=cache)
    with pytest.raises(ValueError, match=r"PolicyLayer cannot roll back \(crop\)"):
        cache.crop(10)
    assert not cache.is_croppable
    # assisted decoding asks for past recording before its first forward: refused there, before any work
    with pytest.raises(ValueError, match="cannot serve assisted or prompt-lookup decoding"):
        model.generate(random_ids(model, 1, 12), max_new_tokens=4, prompt_lookup_num_tokens=2, **{CACHE_KWARG: cache})


def test_eval_tool_builds_score_caches_from_specs_captures_scores_and_hands_the_model_back():
    from hf_kvcache.eval.runner import evaluate

    model = make_tiny_model("llama")
    specs = ["dynamic", "h2o:budget=16,recent=4", "tova:budget=16", "snapkv:budget=16,observation_window=4"]
    results = evaluate(
        specs, model=model, input_ids=random_ids(model, 1, 64), chunk_size=8, decode_tokens=2, progress=False
    )
    assert model.config._attn_implementation == "sdpa"  # capture was on for the score caches only
    perplexities = [result.perplexity for result in results.results]
    assert all(torch.isfinite(torch.tensor(perplexities)))
    assert len(set(perplexities)) == 4  # each eviction policy changed the figures


class ProbeLayer(PolicyLayer):
    """Keeps every query's scores as captured (before any averaging to cached heads)."""

    def observe(self, call):
        self.captured = call.scores(call.query.shape[2])


class ProbeCache(EvictionCache):
    def __init__(self, config):
        super().__init__(config, EvictionPolicy(budget=10**6))

    def full_attention_layer(self, layer, storage):
        return ProbeLayer(layer, storage, self.policy, self.policy.budget, self.geometry.num_layers)


SCORED_FAMILIES = [  # families with full-attention layers and score capture
    arch for arch in MATRIX if arch not in ("qwen3-next-linear-hybrid", "mistral-sliding", *NO_ATTENTION_INTERFACE)
]


@pytest.mark.parametrize("arch", SCORED_FAMILIES)
def test_captured_scores_are_the_models_own_attention_probabilities(arch):
    """Against the model's eager attention weights: scaling, softcapping (Gemma 2), learned sink logits
    (GPT-OSS), latent MLA keys (DeepSeek-V3), partial rotary, per-layer head sizes (Gemma 4)."""
    model = enable_score_capture(make_tiny_model(arch, "eager", layers=None))
    ids = random_ids(model, 2, 12)
    cache = ProbeCache(model.config)
    with torch.no_grad():
        weights = model(ids, output_attentions=True, **{CACHE_KWARG: cache}).attentions
    full_layers = [index for index, layer in enumerate(cache.layers) if isinstance(layer, ProbeLayer)]
    assert full_layers
    for index in full_layers:
        captured = cache.layers[index].captured  # [batch, attention KV heads, kv]
        expected = weights[index].sum(dim=2).unflatten(1, (captured.shape[1], -1)).mean(dim=2)
        torch.testing.assert_close(captured, expected, atol=1e-5, rtol=1e-4)
    if arch == "gpt-oss-sinks":  # the sink logits take probability mass: rows sum to less than one
        assert (weights[full_layers[0]].sum(-1) < 0.999).any()
