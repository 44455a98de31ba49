"""H2O (and its preset HeavyHitterCache): exact with a large budget; keeps the recent window plus the heavy hitters."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import eager_reference, kept_indices, observe, policy_layer, random_ids, store_tokens

from hf_kvcache import HeavyHitterCache, enable_score_capture
from hf_kvcache.caches.evicting import PolicyLayer
from hf_kvcache.policies import H2O


def append(layer: PolicyLayer, first_token: int, count: int) -> None:
    """Store `count` tokens whose keys identify them: 100 * head + token index (values: the negation)."""
    tokens = torch.arange(first_token, first_token + count, dtype=torch.float32)
    keys = torch.stack([tokens, tokens + 100]).view(1, 2, count, 1)
    store_tokens(layer, keys, -keys)


def kept(layer: PolicyLayer) -> list[list[int]]:
    keys = layer.body.keys[0, :, :, 0]
    assert torch.equal(layer.body.values, -layer.body.keys)
    return [[int(k) - 100 * head for k in keys[head].tolist()] for head in range(2)]


def test_keeps_recent_window_and_highest_accumulated_scores_per_head():
    layer = policy_layer(H2O(budget=5, recent=2))
    append(layer, 0, 6)
    observe(layer, torch.tensor([[[0.5, 0.1, 0.9, 0.3, 0.2, 0.05], [0.2, 0.8, 0.1, 0.05, 0.7, 0.6]]]))
    # the 3 best of tokens 0-3, then the 2 most recent tokens; each KV head chooses its own
    assert kept(layer) == [[0, 2, 3, 4, 5], [0, 1, 2, 4, 5]]
    assert torch.allclose(
        layer.state["attention"], torch.tensor([[[0.5, 0.9, 0.3, 0.2, 0.05], [0.2, 0.8, 0.1, 0.7, 0.6]]])
    )
    append(layer, 6, 1)
    observe(layer, torch.tensor([[[0.0, 0.0, 0.0, 0.6, 0.3, 0.1], [0.0, 0.0, 0.5, 0.0, 0.0, 0.5]]]))
    # head 0: token 4 (0.2 + 0.6) now beats token 3 (0.3); head 1: token 4 (0.7) leaves the recent window
    # and beats nothing below it: totals 0.2, 0.8, 0.6, 0.7 -> drop token 0
    assert kept(layer) == [[0, 2, 4, 5, 6], [1, 2, 4, 5, 6]]
    assert layer.get_seq_length() == 7 and layer.stored_tokens == 5
    assert layer.get_mask_sizes(1) == (6, 2)


def test_mean_accumulation_divides_by_the_queries_that_saw_each_token():
    layer = policy_layer(H2O(budget=3, recent=1, accumulate="mean"))
    append(layer, 0, 4)  # one forward of 4 queries: token i was seen by 4 - i of them
    observe(layer, torch.tensor([[[2.0, 1.2, 1.0, 0.5], [2.0, 1.2, 1.0, 0.5]]]))
    # means 0.5, 0.4, 0.5 (token 3 is the recent one): tokens 0 and 2 win, where sums would keep 0 and 1
    assert kept(layer) == [[0, 2, 3], [0, 2, 3]]
    append(layer, 4, 1)  # one more query: tokens 0, 2, 3 were now seen by 5, 3 and 2 queries
    observe(layer, torch.tensor([[[0.0, 0.5, 0.4, 0.1], [0.0, 0.5, 0.4, 0.1]]]))
    # sums 2.0, 1.5, 0.9 would keep token 0; means 0.4, 0.5, 0.45 drop it
    assert kept(layer) == [[2, 3, 4], [2, 3, 4]]
    assert (layer.seen_tokens - layer.positions[0, 0]).tolist() == [3, 2, 1]  # the queries that saw each kept token


def peaky_model(attn: str):
    """Tiny llama whose layer-0 attention is sharp (scaled queries), so scores differ between heads."""
    model = make_tiny_model("llama", attn)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(30)
        model.model.layers[0].self_attn.k_proj.weight.mul_(30)
    return model


@pytest.mark.parametrize("per_head", [True, False])
def test_prefill_keeps_top_accumulated_attention_of_the_model(attn, per_head):
    """On a tiny model, the tokens kept after a one-forward prefill are the recent window plus the top
    tokens by attention summed over queries and averaged over each KV head's query heads (GQA), or
    over all heads with `per_head=False`, read from an independent eager run."""
    reference_model = peaky_model("eager")
    ids = random_ids(reference_model, 2, 30)
    weights, reference_keys = eager_reference(reference_model, ids)
    batch, q_heads, _, length = weights.shape
    totals = weights.view(batch, 2, q_heads // 2, 30, length).sum(3).mean(2)
    if not per_head:
        totals = totals.mean(1, keepdim=True).expand(-1, 2, -1)
    model = enable_score_capture(peaky_model(attn))
    cache = HeavyHitterCache(model.config, budget=12, recent=4, per_head=per_head)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    indices = kept_indices(cache.layers[0].body.keys, reference_keys)
    expected = torch.cat([totals[..., :26].topk(8).indices.sort(-1).values, torch.arange(26, 30).expand(2, 2, 4)], -1)
    assert torch.equal(indices, expected)
    assert torch.equal(indices[:, 0], indices[:, 1]) != per_head  # per-head or shared kept sets
    assert cache.get_seq_length() == 30 and cache.stored_tokens == 12


def test_decoding_stays_within_budget_and_batch_ops_follow_scores():
    model = enable_score_capture(make_tiny_model("qwen2"))
    ids = random_ids(model, 2, 20)
    cache = HeavyHitterCache(model.config, budget=10, recent=3)
    output = model.generate(ids, max_new_tokens=15, do_sample=False, num_beams=2, past_key_values=cache)
    assert output.shape == (2, 35)
    for layer in cache.layers:
        assert layer.stored_tokens == 10 and layer.state["attention"].shape == (4, 2, 10)  # 2 rows x 2 beams
    assert cache.get_seq_length() == 34


def test_recent_defaults_to_half_the_budget():
    cache = HeavyHitterCache(make_tiny_model("llama").config, budget=9)
    assert cache.policy.recent == 4 and cache.layers[0].policy.recent == 4


def test_invalid_arguments():
    config = make_tiny_model("llama").config
    with pytest.raises(ValueError, match="budget"):
        HeavyHitterCache(config, budget=0)
    with pytest.raises(ValueError, match="recent"):
        HeavyHitterCache(config, budget=8, recent=9)
    with pytest.raises(ValueError, match=r"accumulate='max'.*sum, mean"):
        HeavyHitterCache(config, budget=8, accumulate="max")
    with pytest.raises(ValueError, match=r"bits=5.*2, 3, 4, 8"):
        HeavyHitterCache(config, budget=64, bits=5, group_size=8)
