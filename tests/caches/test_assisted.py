"""Assisted and prompt-lookup decoding: caches that can roll back say so (`is_croppable`) and do it exactly."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import chunked_logits, random_ids
from transformers import DynamicCache

from hf_kvcache import QuantizedCache, SinkCache, SlidingWindowCache
from hf_kvcache.compat import CACHE_KWARG


def greedy(model, ids, cache=None, **kwargs) -> torch.Tensor:
    extra = {} if cache is None else {CACHE_KWARG: cache}
    return model.generate(ids, max_new_tokens=30, do_sample=False, **extra, **kwargs)


def repetitive_prompt(model, length: int = 24) -> torch.Tensor:
    """A prompt that repeats itself, so prompt lookup proposes (and the model partly rejects) drafts."""
    return random_ids(model, 1, 8, seed=4).repeat(1, length // 8)


@pytest.mark.parametrize("arch", ["llama", "gemma3-local-rope", "gpt-oss-sinks", "deepseek-v3-mla", "mistral-sliding"])
@pytest.mark.parametrize("assist", ["draft model", "prompt lookup"])
def test_quantized_cache_assisted_greedy_equals_plain_greedy(assist, arch):
    """Rollbacks reach into quantized blocks (residual 4, groups of 4) and, on models with sliding layers,
    into the model's window (8 or 12 tokens), which defers its eviction until `crop`."""
    model = make_tiny_model(arch, "eager", layers=None)
    ids = repetitive_prompt(model)
    kwargs = {"prompt_lookup_num_tokens": 3} if assist == "prompt lookup" else {}
    if assist == "draft model":
        kwargs["assistant_model"] = make_tiny_model("llama", "eager", seed=1, layers=1)
    cache = QuantizedCache(model.config, bits=8, group_size=4, residual_length=4, sink_tokens=2)
    assert cache.is_croppable
    assert torch.equal(greedy(model, ids, cache, **kwargs), greedy(model, ids))
    assert cache.layers[0].body.quantized_length > 0


@pytest.mark.parametrize("cache_class", [SinkCache, SlidingWindowCache])
def test_rollback_after_deferred_eviction_restores_exactly(cache_class):
    """With past recording on (as assisted decoding turns it on), a forward of 6 draft tokens followed by
    `crop(-4)` leaves exactly the state of a cache that only ever saw the 2 accepted tokens."""
    model = make_tiny_model("llama")
    ids = random_ids(model, 2, 36)
    make = {"window": 12} if cache_class is SlidingWindowCache else {"sink_tokens": 2, "window": 10}
    rolled_back, reference = cache_class(model.config, **make), cache_class(model.config, **make)
    chunked_logits(model, ids[:, :30], rolled_back, chunk=10)
    chunked_logits(model, ids[:, :30], reference, chunk=10)
    rolled_back.activate_past_recording()
    chunked_logits(model, ids[:, 30:36], rolled_back, chunk=6)  # evicts 6 more, kept until `crop`
    rolled_back.crop(-4)
    chunked_logits(model, ids[:, 30:32], reference, chunk=2)
    # (to float rounding: a 6-token and a 2-token forward round matrix products differently)
    for layer, expected in zip(rolled_back.layers, reference.layers):
        assert layer.seen_tokens == expected.seen_tokens == 32 and layer.stored_tokens == expected.stored_tokens
        for store, expected_store in ((layer.head, expected.head), (layer.body, expected.body)):
            torch.testing.assert_close(store.keys, expected_store.keys, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(store.values, expected_store.values, atol=1e-6, rtol=1e-5)
    # and the two go on alike
    torch.testing.assert_close(
        chunked_logits(model, ids[:, 32:36], rolled_back, chunk=1),
        chunked_logits(model, ids[:, 32:36], reference, chunk=1),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("cache_class", [SinkCache, SlidingWindowCache])
def test_eviction_caches_run_prompt_lookup_decoding(cache_class):
    model = make_tiny_model("llama")
    ids = repetitive_prompt(model, 32)
    # a window larger than the whole text: nothing is evicted, so the tokens are plain greedy's
    cache = cache_class(model.config, window=128)
    assert torch.equal(greedy(model, ids, cache, prompt_lookup_num_tokens=3), greedy(model, ids))
    # a window that evicts during the run: assisted decoding runs and the cache stays bounded
    cache = cache_class(model.config, window=16)
    out = greedy(model, ids, cache, prompt_lookup_num_tokens=3)
    assert out.shape[1] == ids.shape[1] + 30 and cache.stored_tokens <= cache.layers[0].get_max_length()
    assert cache.get_seq_length() == out.shape[1] - 1


def test_crop_without_recording_refuses_to_invent_evicted_tokens():
    model = make_tiny_model("llama")
    cache = SlidingWindowCache(model.config, window=8)
    chunked_logits(model, random_ids(model, 1, 20), cache, chunk=20)
    cache.crop(0)  # nothing to restore: fine
    with pytest.raises(ValueError, match="were evicted"):
        cache.crop(-2)


@pytest.mark.real_model
@pytest.mark.parametrize("assist", ["prompt lookup", "draft model"])
def test_real_model_assisted_decoding_with_8bit_cache_equals_dynamic_greedy(real_model, assist):
    """The packaged SmolLM2; its draft is the same model (no second model ships offline), which still
    runs every crop that assisted decoding makes."""
    model, tokenizer = real_model
    prompt = "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Again: Monday,"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = {"prompt_lookup_num_tokens": 4} if assist == "prompt lookup" else {"assistant_model": model}
    cache = QuantizedCache(model.config, bits=8, group_size=8, residual_length=8)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=24, do_sample=False, **{CACHE_KWARG: DynamicCache()})
        actual = model.generate(ids, max_new_tokens=24, do_sample=False, **kwargs, **{CACHE_KWARG: cache})
    assert torch.equal(actual, expected)
    assert cache.layers[0].body.quantized_length > 0
