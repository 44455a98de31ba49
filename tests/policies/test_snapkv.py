"""SnapKV (and its preset SnapKVCache): exact with a large budget; compresses a prompt with its observation window's attention."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import eager_reference, kept_indices, observe, policy_layer, random_ids, sharp_model, store_tokens

from hf_kvcache import SnapKVCache, enable_score_capture
from hf_kvcache.policies import SnapKV


def test_pooling_keeps_neighbours_of_the_hand_built_peak():
    layer = policy_layer(SnapKV(budget=5, observation_window=2, kernel_size=3))
    tokens = torch.arange(10, dtype=torch.float32)
    keys = torch.stack([tokens, tokens + 100]).view(1, 2, 10, 1)
    store_tokens(layer, keys, -keys)
    assert layer.policy.scored_queries(10) == 2
    scores = torch.zeros(1, 2, 10)
    scores[0, 0, 4] = 1.0  # head 0: one peak; pooling (width 3) brings its neighbours 3 and 5 along
    scores[0, 1, [0, 1, 2]] = torch.tensor([0.2, 0.9, 0.3])  # head 1: a peak at the start
    scores[0, :, 8:] = 5.0  # the window's own scores do not matter: it is always kept
    observe(layer, scores)
    assert layer.body.keys[0, :, :, 0].tolist() == [[3.0, 4.0, 5.0, 8.0, 9.0], [100.0, 101.0, 102.0, 108.0, 109.0]]
    assert torch.equal(layer.body.values, -layer.body.keys)


def test_average_pooling_prefers_a_broad_region_to_a_lone_peak():
    layer = policy_layer(SnapKV(budget=5, observation_window=2, kernel_size=3, pooling="avg"), kv_heads=1)
    store_tokens(layer, torch.arange(12.0).view(1, 1, 12, 1), torch.zeros(1, 1, 12, 1))
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, 2] = 1.0  # a lone peak: averages 1/3 at tokens 1-3 (max pooling would keep exactly those)
    scores[0, 0, 6:9] = torch.tensor([0.5, 0.6, 0.55])  # a broad region: averages 0.55, 0.55, 0.38 at 6-8
    observe(layer, scores)
    assert layer.body.keys[0, 0, :, 0].tolist() == [6.0, 7.0, 8.0, 10.0, 11.0]


def test_decoding_grows_after_compression():
    layer = policy_layer(SnapKV(budget=4, observation_window=2, kernel_size=1), head_dim=4)
    store_tokens(layer, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    observe(layer, torch.rand(1, 2, 6))
    assert layer.stored_tokens == 4
    store_tokens(layer, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert not layer.policy.should_evict(1, 5, 4)  # single-token steps never evict
    observe(layer, None)
    assert layer.stored_tokens == 5 and layer.get_seq_length() == 7


@pytest.mark.parametrize("per_head", [True, False])
def test_prefill_matches_observation_window_reference(attn, per_head):
    """Kept tokens equal the window plus the top pooled window-attention tokens (averaged over each KV
    head's query heads, or over all heads with `per_head=False`), read from an independent eager run."""
    reference_model = sharp_model("eager")
    ids = random_ids(reference_model, 2, 30)
    weights, reference_keys = eager_reference(reference_model, ids)
    batch, q_heads, _, length = weights.shape
    votes = weights[:, :, -4:].sum(2).reshape(batch, 2, q_heads // 2, length).mean(2)[..., :26]
    if not per_head:
        votes = votes.mean(1, keepdim=True).expand(-1, 2, -1)
    pooled = torch.nn.functional.max_pool1d(votes.reshape(-1, 1, 26), 3, stride=1, padding=1).view_as(votes)
    expected = torch.cat(
        [
            pooled.sort(dim=-1, descending=True, stable=True).indices[..., :8].sort(-1).values,
            torch.arange(26, 30).expand(2, 2, 4),
        ],
        -1,
    )
    model = enable_score_capture(sharp_model(attn))
    cache = SnapKVCache(model.config, budget=12, observation_window=4, kernel_size=3, per_head=per_head)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    indices = kept_indices(cache.layers[0].body.keys, reference_keys)
    assert torch.equal(indices, expected)
    assert torch.equal(indices[:, 0], indices[:, 1]) != per_head
    assert cache.get_seq_length() == 30 and cache.stored_tokens == 12


def test_generate_compresses_prompt_then_grows(attn):
    model = enable_score_capture(make_tiny_model("qwen2", attn))
    ids = random_ids(model, 2, 30)
    cache = SnapKVCache(model.config, budget=12, observation_window=4)
    output = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert output.shape == (2, 40)
    assert cache.get_seq_length() == 39 and cache.stored_tokens == 12 + 9


def test_invalid_arguments():
    config = make_tiny_model("llama").config
    with pytest.raises(ValueError, match="observation_window"):
        SnapKVCache(config, budget=16, observation_window=17)
    with pytest.raises(ValueError, match="observation_window"):
        SnapKVCache(config, budget=16, observation_window=0)
    with pytest.raises(ValueError, match="kernel_size=4 must be an odd integer between 1 and 1023"):
        SnapKVCache(config, budget=16, observation_window=4, kernel_size=4)
    with pytest.raises(ValueError, match=r"kernel_size=1000000001 must be an integer between 1 and 1023"):
        SnapKVCache(config, budget=16, observation_window=4, kernel_size=10**9 + 1)  # 10 s per eviction before
    with pytest.raises(ValueError, match=r"pooling='median'.*max, avg"):
        SnapKVCache(config, budget=16, observation_window=4, pooling="median")
    with pytest.raises(ValueError, match=r"bits=6.*2, 3, 4, 8"):
        SnapKVCache(config, budget=64, bits=6, group_size=8)
