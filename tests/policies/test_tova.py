"""TOVA (and its preset TOVACache): exact with a large budget; keeps the tokens the latest query attends to most."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from helpers import (
    chunked_logits,
    eager_reference,
    kept_indices,
    observe,
    policy_layer,
    random_ids,
    sharp_model,
    store_tokens,
)

from hf_kvcache import TOVACache, enable_score_capture
from hf_kvcache.policies import TOVA


def test_keeps_top_scores_of_hand_built_pattern_per_head():
    layer = policy_layer(TOVA(budget=3, per_head=True))
    tokens = torch.arange(5, dtype=torch.float32)
    keys = torch.stack([tokens, tokens + 100]).view(1, 2, 5, 1)
    store_tokens(layer, keys, -keys)
    assert layer.policy.scored_queries(5) == 1  # only the latest query is scored
    observe(layer, torch.tensor([[[0.1, 0.4, 0.05, 0.3, 0.15], [0.5, 0.0, 0.2, 0.1, 0.2]]]))
    assert layer.body.keys[0, :, :, 0].tolist() == [[1.0, 3.0, 4.0], [100.0, 102.0, 104.0]]
    assert torch.equal(layer.body.values, -layer.body.keys)
    assert layer.get_mask_sizes(1) == (4, 2)


def test_within_budget_no_scores_are_computed():
    layer = policy_layer(TOVA(budget=8), head_dim=4)
    store_tokens(layer, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))

    def no_scores(count):
        raise AssertionError("scores were computed")

    layer.observe(SimpleNamespace(scores=no_scores, query=None, scaling=None))
    assert layer.stored_tokens == 5


@pytest.mark.parametrize("per_head", [True, False])
def test_prefill_keeps_top_attention_of_last_query(attn, per_head):
    """Kept tokens equal the top tokens by the last query's attention averaged over each KV head's
    query heads (GQA), or over all heads with `per_head=False` (the default, one set for the layer),
    read from an independent eager run."""
    reference_model = sharp_model("eager")
    ids = random_ids(reference_model, 2, 30)
    weights, reference_keys = eager_reference(reference_model, ids)
    batch, q_heads, _, length = weights.shape
    latest = weights[:, :, -1].reshape(batch, 2, q_heads // 2, length).mean(2)
    if not per_head:
        latest = latest.mean(1, keepdim=True).expand(-1, 2, -1)
    model = enable_score_capture(sharp_model(attn))
    cache = TOVACache(model.config, budget=10, per_head=per_head)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    indices = kept_indices(cache.layers[0].body.keys, reference_keys)
    assert torch.equal(indices, latest.topk(10).indices.sort(-1).values)
    assert torch.equal(indices[:, 0], indices[:, 1]) != per_head
    assert cache.get_seq_length() == 30 and cache.stored_tokens == 10


def test_decoding_and_chunks_stay_within_budget(attn):
    model = enable_score_capture(make_tiny_model("qwen2", attn))
    ids = random_ids(model, 2, 30)
    cache = TOVACache(model.config, budget=12)
    chunked_logits(model, ids, cache, chunk=7)
    assert cache.get_seq_length() == 30 and cache.stored_tokens == 12
    output = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=TOVACache(model.config, budget=12))
    assert output.shape == (2, 40)


def test_invalid_arguments():
    config = make_tiny_model("llama").config
    with pytest.raises(ValueError, match="budget"):
        TOVACache(config, budget=-1)
    with pytest.raises(ValueError, match=r"bits=1.*2, 3, 4, 8"):
        TOVACache(config, budget=64, bits=1, group_size=8)
