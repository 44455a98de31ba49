"""R-KV: importance from the recent queries' attention minus redundancy among keys, against independent references."""

import math

import pytest
import torch
from conftest import make_tiny_model
from helpers import eager_reference, kept_indices, observe, policy_layer, random_ids, sharp_model, store_tokens

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import RKV


def reference_scores(keys, queries, window: int, kernel: int, weight: float) -> list[list[float]]:
    """R-KV's score of every token, one head at a time in plain Python: keys [kv_heads][tokens][dim], queries
    [q_heads][window][dim] at the last `window` positions, no RoPE, scale 1 / sqrt(dim)."""
    tokens, dim = len(keys[0]), len(keys[0][0])
    group = len(queries) // len(keys)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    scores = []
    for head, head_keys in enumerate(keys):
        importance = [0.0] * tokens
        for query_head in range(head * group, (head + 1) * group):
            for w, query in enumerate(queries[query_head]):
                position = tokens - window + w  # sees keys 0 .. position
                exps = [math.exp(dot(query, key) / math.sqrt(dim)) for key in head_keys[: position + 1]]
                for j, e in enumerate(exps):
                    importance[j] += e / sum(exps) / (group * window)
        half = kernel // 2
        pooled = [max(importance[max(0, j - half) : j + half + 1]) for j in range(tokens)]
        cosine = lambda a, b: dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))  # noqa: E731
        mean = [
            sum(cosine(head_keys[i], head_keys[j]) for j in range(tokens) if j != i) / (tokens - 1)
            for i in range(tokens)
        ]
        redundancy = [math.exp(m) / sum(math.exp(x) for x in mean) for m in mean]
        scores.append([weight * p - (1 - weight) * r for p, r in zip(pooled, redundancy)])
    return scores


def test_kept_tokens_follow_the_reference_score():
    torch.manual_seed(0)
    keys, queries = torch.randn(1, 2, 14, 4), torch.randn(1, 4, 14, 4)
    policy = RKV(budget=6, observation_window=3, kernel_size=3, importance_weight=0.5)
    layer = policy_layer(policy, kv_heads=2, head_dim=4)
    store_tokens(layer, keys, -keys)
    observe(layer, queries=queries)  # 14 tokens > budget 6: scores, then keeps the best
    scores = torch.tensor(reference_scores(keys[0].tolist(), queries[0, :, -3:].tolist(), 3, 3, 0.5))
    scores[:, -3:] = float("inf")  # the observation window is always kept
    expected = scores.topk(6).indices.sort(-1).values
    assert torch.equal(kept_indices(layer.body.keys, keys)[0], expected)
    assert layer.running["queries"].shape == (1, 4, 3, 4) and layer.running["query_positions"].tolist() == [
        [11, 12, 13]
    ]


def test_of_repeated_keys_it_keeps_the_others_first():
    """Six copies of one key and four keys orthogonal to it and to each other, attended alike (zero queries):
    redundancy decides, and only two copies stay (the earliest, ties going to the earlier token)."""
    keys = torch.zeros(1, 1, 10, 8)
    keys[0, 0, :6, 0] = 1.0
    for index in range(4):
        keys[0, 0, 6 + index, 1 + index] = 1.0
    layer = policy_layer(RKV(budget=6, observation_window=1, kernel_size=1), kv_heads=1, head_dim=8)
    token_index = torch.arange(10.0).view(1, 1, 10, 1).expand(-1, -1, -1, 8)
    store_tokens(layer, keys, token_index)  # the values say which token each kept one is
    observe(layer, queries=torch.zeros(1, 1, 10, 8))
    assert layer.body.values[0, 0, :, 0].tolist() == [0, 1, 6, 7, 8, 9]


@pytest.mark.parametrize("per_head", [True, False])
def test_importance_is_the_eager_attention_of_the_last_queries(attn, per_head):
    """With importance alone and no pooling, a prompt keeps its last 4 tokens and the 6 the last 4 queries attend
    most (layer 0, averaged over each KV head's query heads), read from an independent eager run."""
    reference_model = sharp_model("eager")
    ids = random_ids(reference_model, 1, 30)
    weights, reference_keys = eager_reference(reference_model, ids)
    batch, q_heads, _, length = weights.shape
    mean = weights[:, :, -4:].mean(2).reshape(batch, 2, q_heads // 2, length).mean(2)
    if not per_head:
        mean = mean.mean(1, keepdim=True).expand(-1, 2, -1).clone()
    mean[..., -4:] = float("inf")
    model = enable_score_capture(sharp_model(attn))
    policy = RKV(budget=10, per_head=per_head, observation_window=4, kernel_size=1, importance_weight=1.0)
    cache = EvictionCache(model.config, policy)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    assert torch.equal(kept_indices(cache.layers[0].body.keys, reference_keys), mean.topk(10).indices.sort(-1).values)


def test_generates_within_budget_with_compaction():
    model = enable_score_capture(make_tiny_model("qwen2"))
    cache = EvictionCache(model.config, RKV(budget=12, compaction_interval=8))
    output = model.generate(random_ids(model, 2, 30), max_new_tokens=20, do_sample=False, **{CACHE_KWARG: cache})
    assert output.shape == (2, 50) and cache.stored_tokens <= 12 + 7


def test_a_latent_mla_layer_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"RKV scores cached keys with the queries.*caches a latent"):
        EvictionCache(make_tiny_model("deepseek-v3-mla").config, RKV(budget=8))


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"observation_window": 0}, "observation_window"),
        ({"budget": 4, "observation_window": 8}, "observation_window"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"importance_weight": 1.5}, "importance_weight"),
        ({"importance_weight": float("nan")}, "importance_weight"),
    ],
)
def test_invalid_settings_are_named(settings, named):
    with pytest.raises(ValueError, match=named):
        RKV(**settings)
