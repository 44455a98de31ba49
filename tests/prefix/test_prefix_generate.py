"""generate_with_prefix_cache against plain generate, token for token, cold and warm."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from transformers import GenerationConfig

from hf_kvcache import (
    HeavyHitterCache,
    QuantizedCache,
    SlidingWindowCache,
    SnapKVCache,
    TOVACache,
    enable_score_capture,
)
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.prefix import MemoryBackend, PrefixCache, generate_with_prefix_cache

GREEDY = {"max_new_tokens": 6, "do_sample": False}


def prompts(model, prefix_length=37, count=3):
    """Prompts sharing one prefix, with different tails of different lengths."""
    prefix = random_ids(model, 1, prefix_length, seed=1)
    return [torch.cat([prefix, random_ids(model, 1, 3 + 2 * i, seed=10 + i)], dim=1) for i in range(count)]


@pytest.mark.parametrize(
    "arch, attn",
    [
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("qwen2", "sdpa"),
        ("gpt2", "sdpa"),
        ("phi3", "sdpa"),
        ("mistral-sliding", "eager"),
    ],
)
def test_outputs_equal_plain_generate_cold_and_warm(arch, attn):
    model = make_tiny_model(arch, attn)
    store = PrefixCache(MemoryBackend(), block_size=8)
    for ids in prompts(model):
        reference = model.generate(ids, **GREEDY)
        for _ in range(2):  # first call with this tail: cold for it; second: fully warm
            assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    stats = store.stats()
    # Prompts of 40, 42, 44 tokens: 4, 5, 5 usable blocks (one token always left to compute).
    assert stats["lookups"] == 6 and stats["hits"] == 0 + 4 + 4 + 5 + 4 + 5 and stats["misses"] == 4 + 0 + 1 + 0 + 1 + 0
    assert stats["tokens_reused"] == 8 * stats["hits"] and stats["errors"] == 0


def test_prompt_lengths_at_block_edges():
    model = make_tiny_model("llama")
    store = PrefixCache(MemoryBackend(), block_size=8)
    longest = random_ids(model, 1, 17)
    for length in (1, 7, 8, 9, 16, 17):
        ids = longest[:, :length]
        reference = model.generate(ids, **GREEDY)
        for _ in range(2):
            assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    # A token must remain to compute: lengths 1-8 restore nothing, 9 and 16 one block, 17 two (each twice).
    assert store.stats()["tokens_reused"] == 8 * (2 * 1 + 2 * 1 + 2 * 2)


def test_tokenizer_style_inputs_and_sampling_kwargs():
    model = make_tiny_model("qwen2")
    store = PrefixCache(MemoryBackend(), block_size=8)
    ids = random_ids(model, 1, 30)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reference = model.generate(**inputs, **GREEDY)
    generate_with_prefix_cache(model, inputs, store, **GREEDY)
    assert torch.equal(generate_with_prefix_cache(model, inputs, store, **GREEDY), reference)
    warm = generate_with_prefix_cache(model, ids[0], store, max_new_tokens=6, do_sample=True, top_k=5)
    assert warm.shape == (1, 36) and torch.equal(warm[:, :30], ids)
    assert store.stats()["hits"] == 3 + 3


def test_quantized_cache_is_filled_like_a_two_chunk_prefill():
    """Restored KV enters a QuantizedCache through update: same as prefilling the prefix, then the rest."""
    model = make_tiny_model("llama")
    store = PrefixCache(MemoryBackend(), block_size=16)
    ids = random_ids(model, 1, 45)

    def quantized():
        return QuantizedCache(model.config, bits=4, group_size=8, residual_length=8, sink_tokens=2)

    generate_with_prefix_cache(model, ids, store, past_key_values=quantized(), **GREEDY)
    warm = generate_with_prefix_cache(model, ids, store, cache=quantized(), **GREEDY)
    assert store.stats()["tokens_reused"] == 32
    reference_cache = quantized()
    with torch.no_grad():
        model(ids[:, :32], **{CACHE_KWARG: reference_cache})
    reference = model.generate(ids, **{CACHE_KWARG: reference_cache}, **GREEDY)
    assert torch.equal(warm, reference)


def test_another_model_never_gets_this_models_kv():
    first, second = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    store = PrefixCache(MemoryBackend(), block_size=8)
    ids = random_ids(first, 1, 33)
    generate_with_prefix_cache(first, ids, store, **GREEDY)
    output = generate_with_prefix_cache(second, ids, store, **GREEDY)
    assert torch.equal(output, second.generate(ids, **GREEDY))
    assert store.stats()["hits"] == 0 and store.stats()["misses"] == 8


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, s: generate_with_prefix_cache(m, random_ids(m, 2, 9), s), "one prompt"),
        (
            lambda m, s: generate_with_prefix_cache(
                m, {"input_ids": random_ids(m, 1, 4), "attention_mask": torch.tensor([[0, 1, 1, 1]])}, s
            ),
            "padding",
        ),
        (lambda m, s: generate_with_prefix_cache(m, random_ids(m, 1, 9), s, num_beams=2), "num_beams"),
        (lambda m, s: generate_with_prefix_cache(m, random_ids(m, 1, 9), s, use_cache=False), "use_cache"),
        (lambda m, s: generate_with_prefix_cache(m, torch.zeros(1, 0, dtype=torch.long), s), "at least one"),
        (
            lambda m, s: generate_with_prefix_cache(
                m, random_ids(m, 1, 9), s, generation_config=GenerationConfig(num_beams=2)
            ),
            "num_beams=2",
        ),
        (
            lambda m, s: generate_with_prefix_cache(
                m, random_ids(m, 1, 9), s, generation_config=GenerationConfig(output_attentions=True)
            ),
            "output_attentions",
        ),
        (
            lambda m, s: (
                setattr(m.generation_config, "num_beams", 3) or generate_with_prefix_cache(m, random_ids(m, 1, 9), s)
            ),
            "num_beams=3",
        ),
        (lambda m, s: generate_with_prefix_cache(m, None, s), "no prompt"),
        (lambda m, s: generate_with_prefix_cache(m, random_ids(m, 1, 9), None), "must be a PrefixCache"),
    ],
)
def test_unsupported_requests_are_refused(call, match):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        call(model, PrefixCache(MemoryBackend(), block_size=8))


def test_the_prompt_as_keywords():
    """`generate_with_prefix_cache(model, store=store, **tokenizer_output)`, as `model.generate` is called."""
    model = make_tiny_model("llama")
    store = PrefixCache(MemoryBackend(), block_size=8)
    ids = random_ids(model, 1, 20)
    reference = model.generate(ids, **GREEDY)
    for _ in range(2):
        output = generate_with_prefix_cache(
            model, store=store, input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY
        )
        assert torch.equal(output, reference)
    assert store.stats()["hits"] == 2


def test_non_empty_cache_is_refused():
    model = make_tiny_model("llama")
    cache = QuantizedCache(model.config, group_size=8)
    with torch.no_grad():
        model(random_ids(model, 1, 3), **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="empty"):
        generate_with_prefix_cache(model, random_ids(model, 1, 9), PrefixCache(MemoryBackend()), past_key_values=cache)


@pytest.mark.parametrize("cache_class", [HeavyHitterCache, TOVACache, SnapKVCache])
def test_score_caches_take_restored_prefixes(cache_class):
    """A hit feeds the restored KV without running attention over it: score caches must not wait for scores
    (they raised ScoreCaptureError on every second request). With a budget that evicts nothing the warm
    output is plain generate's; with a small budget warm requests run and the cache keeps its budget."""
    model = enable_score_capture(make_tiny_model("llama"))
    store = PrefixCache(MemoryBackend(), block_size=8)
    for ids in prompts(model):
        reference = model.generate(ids, **GREEDY)
        for _ in range(2):
            output = generate_with_prefix_cache(
                model, ids, store, cache=cache_class(model.config, budget=256), **GREEDY
            )
            assert torch.equal(output, reference)
    assert store.stats()["hits"] > 0
    extra = {"observation_window": 4} if cache_class is SnapKVCache else {}
    for _ in range(2):
        small = cache_class(model.config, budget=16, **extra)
        output = generate_with_prefix_cache(model, prompts(model)[0], store, cache=small, **GREEDY)
        assert output.shape == (1, 40 + 6) and small.layers[0].stored_tokens <= 16 + 6


def test_kv_computed_through_an_approximate_cache_is_never_served_to_another_configuration():
    """After a restore, the tail's KV is computed attending to what the cache holds (an evicted window,
    quantized codes): it is stored under that cache's configuration and never restored into another."""
    model = make_tiny_model("llama")
    store = PrefixCache(MemoryBackend(), block_size=8)
    ids = prompts(model)[0]

    def window():
        return SlidingWindowCache(model.config, window=6)

    for _ in range(2):  # the second request restores blocks computed through the window
        generate_with_prefix_cache(model, ids, store, cache=window(), **GREEDY)
    assert store.stats()["hits"] == 4
    reference = model.generate(ids, **GREEDY)
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["hits"] == 4  # a DynamicCache request found none of the window's blocks
    generate_with_prefix_cache(model, ids, store, cache=window(), **GREEDY)
    assert store.stats()["hits"] == 8  # the same configuration still finds its own


def test_save_refuses_layers_of_unequal_lengths_and_stores_every_token_from_a_plain_cache():
    """A sliding layer of DynamicCache(config) keeps only its window: saved as is, its newest tokens would be
    stored as the prompt's first ones. `save` refuses that; the same prompt's KV from DynamicCache() (every layer
    keeps every token) is stored, and a restore from it generates what plain generate does."""
    from transformers import DynamicCache

    model = make_tiny_model("gemma3-local-rope")
    ids = random_ids(model, 1, 4 * model.config.sliding_window + 3)
    store = PrefixCache(MemoryBackend(), block_size=8)
    windowed, whole = DynamicCache(config=model.config), DynamicCache()
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: windowed})
        model(ids, **{CACHE_KWARG: whole})
    with pytest.raises(ValueError, match=r"layers hold 7 to 7 tokens of the prompt's 35 from start: every layer"):
        store.save(model, ids, [(layer.keys, layer.values) for layer in windowed.layers])
    assert store.stats()["blocks_saved"] == 0
    assert store.save(model, ids, [(layer.keys, layer.values) for layer in whole.layers]) == 4
    reference = model.generate(ids, **GREEDY)
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["hits"] == 4
