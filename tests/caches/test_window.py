"""SlidingWindowCache: DynamicCache before eviction, a dense run on the window after."""

import pytest
import torch
from eviction_reference import dense_on_kept
from helpers import chunked_logits, dynamic_logits, left_padded_batch, random_ids

from hf_kvcache import SlidingWindowCache

WINDOW = 12


@pytest.fixture
def one_layer_model(arch, attn):
    from conftest import make_tiny_model

    return make_tiny_model(arch, attn, layers=1)


def test_equal_to_dynamic_cache_before_eviction(make_model):
    model = make_model()
    ids = random_ids(model, 2, WINDOW)
    cache = SlidingWindowCache(model.config, window=WINDOW)
    torch.testing.assert_close(chunked_logits(model, ids, cache, chunk=5), dynamic_logits(model, ids, chunk=5))


@pytest.mark.parametrize("chunk", [1, 5, 20])
def test_after_eviction_equals_dense_run_on_the_window(one_layer_model, chunk):
    model = one_layer_model
    ids, mask = left_padded_batch(model, [60, 51])
    cache = SlidingWindowCache(model.config, window=WINDOW)
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            kept = list(range(max(0, start - WINDOW), start))
            queries = list(range(start, min(start + chunk, ids.shape[1])))
            logits = model(ids[:, queries], past_key_values=cache, attention_mask=mask[:, : queries[-1] + 1]).logits
            expected = dense_on_kept(model, ids, kept, queries, first_label=start - len(kept), mask=mask)
            real = mask[:, queries].bool()
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-4)
            assert cache.get_mask_sizes(1, 0) == (cache.stored_tokens + 1, queries[-1] + 1 - cache.stored_tokens)
    assert cache.stored_tokens == WINDOW


def test_generate_modes_run_and_stay_bounded(make_model):
    model = make_model()
    ids = random_ids(model, 2, 6)
    for kwargs in ({"do_sample": False}, {"do_sample": True}, {"num_beams": 2, "do_sample": False}):
        cache = SlidingWindowCache(model.config, window=WINDOW)
        out = model.generate(ids, max_new_tokens=30, past_key_values=cache, **kwargs)
        assert out.shape == (2, 36) and cache.stored_tokens == WINDOW and cache.get_seq_length() == 35


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_window_tracks_full_precision(bits):
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 100)
    full = chunked_logits(model, ids, SlidingWindowCache(model.config, window=40), chunk=1)
    cache = SlidingWindowCache(model.config, window=40, bits=bits, group_size=8, residual_length=8)
    quant = chunked_logits(model, ids, cache, chunk=1)
    assert cache.stored_tokens == 40 and cache.layers[0].body.quantized_length >= 24
    assert 0 < (full - quant).abs().max() < {8: 5e-3, 4: 6e-2, 2: 3e-1}[bits]


def test_window_below_the_model_window_on_sliding_layers():
    from conftest import make_tiny_model

    model = make_tiny_model("mistral-sliding")  # model window 12: its cache keeps 11 tokens
    assert SlidingWindowCache(model.config, window=5).layers[0].window == 5
    assert SlidingWindowCache(model.config, window=50).layers[0].window == 11


def test_bad_window_is_refused():
    from conftest import tiny_config

    with pytest.raises(ValueError, match="window=-3 must be an integer >= 1"):
        SlidingWindowCache(tiny_config("llama"), window=-3)
