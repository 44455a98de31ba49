"""Ada-KV: the layer's budget shared among heads, held in ragged per-head storage (memory really freed)."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import chunked_logits, random_ids

from hf_kvcache import EvictionCache, Storage, enable_score_capture
from hf_kvcache.caches.ragged import RaggedPolicyLayer
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import AdaKV, SnapKV
from hf_kvcache.policies.base import Step


def hand_built_step(attention: torch.Tensor) -> Step:
    batch, heads, stored = attention.shape
    real = torch.ones_like(attention, dtype=torch.bool)
    positions = torch.arange(stored, dtype=torch.int32).expand(batch, heads, -1)
    return Step(None, 1, stored, stored, real, positions, {}, {}, lambda: None, attention)


def test_concentrated_heads_give_tokens_to_spread_heads():
    """Head 0 attends two tokens, head 1 spreads its attention: with a budget of 4 per head (8 in all), a
    guaranteed share of 2 (the window's token and the top one), head 0 keeps just its two peaks and head 1
    receives the slot head 0 leaves unused."""
    attention = torch.zeros(1, 2, 10)
    attention[0, 0, [2, 5]] = torch.tensor([0.6, 0.4])
    attention[0, 1, :9] = torch.linspace(0.2, 0.1, 9)
    policy = AdaKV(budget=4, observation_window=1, kernel_size=1, safeguard=0.5)
    keep = policy.select(hand_built_step(attention), budget=4)
    assert keep.sum().item() == 8
    assert keep[0, 0].nonzero().flatten().tolist() == [2, 5, 9]
    assert keep[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3, 9]


def test_full_safeguard_is_snapkv_exactly(attn):
    """safeguard=1 gives every head `budget` tokens: the same logits and kept tokens as SnapKV, through a
    chunked prompt and single-token steps, though held in ragged storage."""
    model = enable_score_capture(make_tiny_model("qwen2", attn))
    ids = random_ids(model, 2, 40)
    ada = EvictionCache(model.config, AdaKV(budget=12, observation_window=4, safeguard=1.0))
    snap = EvictionCache(model.config, SnapKV(budget=12, observation_window=4))
    torch.testing.assert_close(chunked_logits(model, ids, ada, chunk=9), chunked_logits(model, ids, snap, chunk=9))
    assert isinstance(ada.layers[0], RaggedPolicyLayer)
    for ada_layer, snap_layer in zip(ada.layers, snap.layers):
        assert ada_layer.kept_positions() == snap_layer.kept_positions()


def test_heads_hold_different_counts_and_only_those_bytes():
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 64)
    ada = EvictionCache(model.config, AdaKV(budget=16, observation_window=4))
    snap = EvictionCache(model.config, SnapKV(budget=16, observation_window=4))
    model.generate(ids, max_new_tokens=1, do_sample=False, **{CACHE_KWARG: ada})
    model.generate(ids, max_new_tokens=1, do_sample=False, **{CACHE_KWARG: snap})
    held = torch.stack([layer.held_tokens() for layer in ada.layers])  # [layers, batch, heads]
    assert (held.sum(-1) == 2 * 16).all()  # the layer's budget, shared
    assert (held.amax(-1) > held.amin(-1)).any()  # ragged
    kv_bytes_per_token = 2 * 16 * 4  # key and value channels, fp32
    for layer in ada.layers:  # the stores hold the kept tokens only, not the longest head's count for all
        records = layer.memory_bytes() - int(layer.held_tokens().sum()) * kv_bytes_per_token
        assert 0 < records <= int(layer.held_tokens().sum()) * 6  # head (1), position (4), padding flag (1)
    assert ada.memory_bytes() <= snap.memory_bytes() * 1.05


def test_quantized_ragged_rows():
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 2, 48)
    cache = EvictionCache(
        model.config, AdaKV(budget=12, observation_window=4), Storage(bits=4, residual_length=8, token_wise=True)
    )
    output = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=2, **{CACHE_KWARG: cache})
    assert output.shape == (2, 52)
    full = EvictionCache(model.config, AdaKV(budget=12, observation_window=4))
    model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=2, **{CACHE_KWARG: full})
    assert cache.memory_bytes() < 0.6 * full.memory_bytes()


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"safeguard=1\.5"):
        AdaKV(budget=8, observation_window=2, safeguard=1.5)
    with pytest.raises(ValueError, match="per_head=False"):
        AdaKV(budget=8, observation_window=2, per_head=False)
    with pytest.raises(ValueError, match=r"safeguard=-0\.1"):
        AdaKV(budget=8, observation_window=2, safeguard=-0.1)


def test_prompt_chunks_after_ragged_eviction_score_with_per_head_masks(attn):
    """A second prompt chunk after a ragged eviction is scored with each head's own mask (GQA: 4 query heads
    on 2 KV heads), and the kept tokens stay real and within the layer's shared budget."""
    model = enable_score_capture(make_tiny_model("llama", attn))
    cache = EvictionCache(model.config, AdaKV(budget=12, observation_window=4))
    chunked_logits(model, random_ids(model, 2, 60), cache, chunk=20)
    for layer in cache.layers:
        assert (layer.held_tokens().sum(-1) == 2 * 12).all() and layer.padding_held() == 0
        assert (layer.held_tokens().amax(-1) > layer.held_tokens().amin(-1)).any()
