"""Expected Attention: the closed form against Monte-Carlo and enumerated rotations, a tiny model's prefill
against an eager reference, decoding within budget, and refused parameters."""

import math

import pytest
import torch
from conftest import make_tiny_model
from helpers import eager_reference, kept_indices, observe, policy_layer, random_ids, store_tokens
from transformers import DynamicCache

from hf_kvcache import EvictionCache, build_cache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import LayerGeometry, model_geometry
from hf_kvcache.policies import ExpectedAttention, Step
from hf_kvcache.rope import Rope


def geometry(head_dim: int, rope: Rope | None = None, kv_heads: int = 2) -> LayerGeometry:
    positions = "none" if rope is None else "rope"
    return LayerGeometry(0, "full_attention", None, kv_heads, head_dim, head_dim, positions, rope=rope)


def scores(policy, layer_geometry, keys, queries, real=None, seen=None) -> torch.Tensor:
    """The policy's scores after one forward that stored `keys` and scored `queries` (all real by default)."""
    batch, kv_heads, stored, _ = keys.shape
    seen = stored if seen is None else seen
    real = torch.ones(batch, kv_heads, stored, dtype=torch.bool) if real is None else real
    positions = torch.arange(seen - stored, seen, dtype=torch.int32).expand(batch, kv_heads, -1)
    unit_values = torch.nn.functional.normalize(torch.randn_like(keys), dim=-1)  # the value-norm weights are 1
    step = Step(layer_geometry, 1, stored, seen, real, positions, {}, {}, lambda: (keys, unit_values), queries=queries)
    policy.update_state(step)
    return policy.score(step)


def rotated(pre_rope: torch.Tensor, rope: Rope, first_position: int) -> torch.Tensor:
    """Queries [..., n, dim] rotated one by one to positions first_position, first_position + 1, ..."""
    return torch.cat(
        [rope.shift(pre_rope[..., i : i + 1, :], first_position + i) for i in range(pre_rope.shape[-2])], -2
    )


def statistics(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [..., dim] and population covariance [..., dim, dim] of queries [..., n, dim]."""
    flat = queries.flatten(0, -3)
    covariance = torch.stack([torch.cov(q.T, correction=0) for q in flat]).view(
        *queries.shape[:-2], *flat.shape[-1:] * 2
    )
    return queries.mean(-2), covariance


def mean_rotation(rope: Rope, dim: int, start: int, count: int) -> torch.Tensor:
    """The average over positions start .. start + count - 1 of the RoPE rotation matrices [dim, dim], each
    built by rotating the identity's rows with `Rope.shift` (rows R e_i: the transposed matrix)."""
    return torch.stack([rope.shift(torch.eye(dim), start + j).T for j in range(count)]).mean(0)


def per_kv_head(probabilities: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return probabilities.unflatten(1, (kv_heads, -1)).mean(2)


def test_closed_form_matches_monte_carlo_without_rope():
    """Sampling queries from the Gaussian of the observed queries and averaging exp(q.k / sqrt(d)) gives the
    same expected attention as the closed form (d = 4, 2 KV heads of 2 query heads each)."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 10, 4, generator=generator) * 0.7
    queries = torch.randn(1, 4, 10, 4, generator=generator) + torch.tensor([1.0, -0.5, 0.0, 2.0])
    policy = ExpectedAttention(budget=8, query_window=10)
    actual = scores(policy, geometry(4), keys, queries)
    mean, covariance = statistics(queries)
    torch.manual_seed(0)
    samples = torch.distributions.MultivariateNormal(mean.double(), covariance.double()).sample((400_000,))
    expanded = keys.double().repeat_interleave(2, dim=1)  # [1, 4, 10, 4]: each query head's KV head
    expected_exp = (torch.einsum("nbhd,bhsd->nbhs", samples, expanded) / 2).exp().mean(0)  # [1, 4, 10]
    expected = per_kv_head(expected_exp / expected_exp.sum(-1, keepdim=True), 2)
    torch.testing.assert_close(actual.double(), expected, rtol=0.01, atol=0)
    assert torch.equal(actual.argsort(-1), expected.argsort(-1))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_queries_are_unrotated_and_the_future_rotation_is_exact_for_one_position(layout):
    """With one future position the expected query is the pre-RoPE Gaussian rotated to position `seen`:
    Monte-Carlo samples rotated with `Rope.shift` agree (head_dim 8, rotary on the first 4 channels)."""
    generator = torch.Generator().manual_seed(1)
    rope = Rope(torch.tensor([1.0, 0.1], dtype=torch.float64), layout=layout)
    keys = torch.randn(1, 1, 12, 8, generator=generator) * 0.6
    pre_rope = torch.randn(1, 2, 12, 8, generator=generator) * 0.8 + torch.linspace(-1, 1, 8)
    policy = ExpectedAttention(budget=8, query_window=12, n_future_positions=1)
    actual = scores(policy, geometry(8, rope, kv_heads=1), keys, rotated(pre_rope, rope, 20), seen=32)
    mean, covariance = statistics(pre_rope)
    torch.manual_seed(0)
    samples = torch.distributions.MultivariateNormal(mean.double(), covariance.double()).sample((400_000,))
    samples = rope.shift(samples.view(-1, 1, 8), 32).view_as(samples)  # the next query sits at position 32
    expected_exp = (samples @ keys[0].double().transpose(-1, -2) / math.sqrt(8)).exp().mean(0)  # [1, 2, 12]
    expected = per_kv_head(expected_exp / expected_exp.sum(-1, keepdim=True), 1)
    torch.testing.assert_close(actual.double(), expected, rtol=0.01, atol=0)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_future_positions_average_the_enumerated_rotation_matrices(layout):
    """mu and Sigma rotated by the mean of the 16 future rotation matrices, enumerated with `Rope.shift`, give
    the policy's expected attention; only the newest `query_window` queries count."""
    generator = torch.Generator().manual_seed(2)
    rope = Rope(torch.tensor([1.0, 0.3, 0.05, 0.01], dtype=torch.float64), layout=layout)
    keys = torch.randn(2, 2, 20, 8, generator=generator)
    pre_rope = torch.randn(2, 4, 20, 8, generator=generator) + torch.linspace(-1, 1, 8)
    policy = ExpectedAttention(budget=8, query_window=12, n_future_positions=16)
    actual = scores(policy, geometry(8, rope), keys, rotated(pre_rope, rope, 0))
    mean, covariance = statistics(pre_rope[:, :, -12:])
    rotation = mean_rotation(rope, 8, 20, 16)
    mean, covariance = mean @ rotation.T, rotation @ covariance @ rotation.T
    expanded = keys.repeat_interleave(2, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", mean, expanded) / math.sqrt(8)
    logits += torch.einsum("bhsd,bhde,bhse->bhs", expanded, covariance, expanded) / 16
    torch.testing.assert_close(actual, per_kv_head(logits.softmax(-1), 2), rtol=1e-4, atol=1e-6)


def test_padding_queries_and_keys_do_not_count():
    """A row left-padded with garbage queries and keys scores its real tokens as the row alone, although its
    positions (counted with the padding) are offset from the RoPE positions its queries and keys carry."""
    generator = torch.Generator().manual_seed(3)
    rope = Rope(torch.tensor([1.0, 0.2], dtype=torch.float64))
    keys = torch.randn(1, 2, 15, 4, generator=generator)
    queries = rotated(torch.randn(1, 4, 15, 4, generator=generator), rope, 0)
    policy = ExpectedAttention(budget=8, query_window=32, n_future_positions=8)
    alone = scores(policy, geometry(4, rope), keys, queries)
    padded_keys = torch.cat([torch.full((1, 2, 5, 4), 50.0), keys], dim=2)
    padded_queries = torch.cat([torch.full((1, 4, 5, 4), -50.0), queries], dim=2)
    real = torch.ones(1, 2, 20, dtype=torch.bool)
    real[..., :5] = False
    padded = scores(policy, geometry(4, rope), padded_keys, padded_queries, real=real)
    assert torch.equal(padded[..., :5], torch.zeros(1, 2, 5))
    torch.testing.assert_close(padded[..., 5:], alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_head", [True, False])
def test_prefill_keeps_the_reference_choice_of_an_eager_run(attn, per_head):
    """A tiny Llama's prompt: the kept tokens of layer 0 are its 2 sinks, its 2 newest tokens and the 8 others
    with the highest expected attention computed from the eager run's pre-RoPE queries (read at q_proj, last 8
    queries) and cached keys, with the future rotation enumerated with `Rope.shift`, weighted by the cached
    values' norms."""
    reference_model = make_tiny_model("llama", "eager")
    ids = random_ids(reference_model, 2, 30)
    captured = []
    attention = reference_model.model.layers[0].self_attn
    hook = attention.q_proj.register_forward_hook(lambda module, inputs, output: captured.append(output))
    _, reference_keys = eager_reference(reference_model, ids)
    hook.remove()
    reference_values = DynamicCache(config=reference_model.config)
    with torch.no_grad():
        reference_model(ids, **{CACHE_KWARG: reference_values})
    value_norms = reference_values.layers[0].values.norm(dim=-1)
    pre_rope = captured[0].view(2, 30, 4, 16).transpose(1, 2)  # [batch, q_heads, tokens, head_dim]
    mean, covariance = statistics(pre_rope[:, :, -8:])
    rotation = mean_rotation(model_geometry(reference_model.config).layers[0].rope, 16, 30, 16)
    mean, covariance = mean @ rotation.T, rotation @ covariance @ rotation.T
    expanded = reference_keys.repeat_interleave(2, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", mean, expanded) / 4
    logits += torch.einsum("bhsd,bhde,bhse->bhs", expanded, covariance, expanded) / 32
    votes = (per_kv_head(logits.softmax(-1), 2) * value_norms)[..., 2:28]
    if not per_head:
        votes = votes.mean(1, keepdim=True).expand(-1, 2, -1)
    chosen = votes.sort(dim=-1, descending=True, stable=True).indices[..., :8].sort(-1).values + 2
    expected = torch.cat([torch.tensor([0, 1, 28, 29]).expand(2, 2, 4), chosen], -1).sort(-1).values

    model = enable_score_capture(make_tiny_model("llama", attn))
    policy = ExpectedAttention(12, per_head, query_window=8, n_future_positions=16, recent=2, sink_tokens=2)
    cache = EvictionCache(model.config, policy)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    indices = kept_indices(cache.layers[0].body.keys, reference_keys)
    assert torch.equal(indices, expected)
    assert torch.equal(indices[:, 0], indices[:, 1]) != per_head
    assert cache.get_seq_length() == 30 and cache.stored_tokens == 12


def test_decoding_evicts_every_step_within_budget():
    """Single-token steps: the stored tokens stay at the budget, the newest `recent` and the sink are kept,
    and the query window holds the newest `query_window` queries."""
    layer = policy_layer(ExpectedAttention(budget=6, query_window=4, recent=2, sink_tokens=1), head_dim=4)
    generator = torch.Generator().manual_seed(4)
    store_tokens(layer, torch.randn(1, 2, 10, 4, generator=generator), torch.randn(1, 2, 10, 4, generator=generator))
    observe(layer, queries=torch.randn(1, 4, 10, 4, generator=generator)[:, :, -4:])
    assert layer.stored_tokens == 6
    for step in range(5):
        store_tokens(layer, torch.randn(1, 2, 1, 4, generator=generator), torch.randn(1, 2, 1, 4, generator=generator))
        observe(layer, queries=torch.randn(1, 4, 1, 4, generator=generator))
        assert layer.stored_tokens == 6 and layer.get_seq_length() == 11 + step
        kept = layer.positions[0].tolist()
        assert all(row[0] == 0 and row[-2:] == [9 + step, 10 + step] for row in kept)
        assert layer.running["queries"].shape == (1, 4, 4, 4) and bool(layer.running["queries_real"].all())


def test_generate_keeps_the_budget_in_every_layer(attn):
    model = enable_score_capture(make_tiny_model("qwen2", attn))
    cache = build_cache("expected-attention:budget=12,query_window=8,n_future_positions=32", model.config)
    output = model.generate(random_ids(model, 2, 20), max_new_tokens=8, do_sample=False, **{CACHE_KWARG: cache})
    assert output.shape == (2, 28) and cache.get_seq_length() == 27
    for layer in cache.layers:
        assert layer.stored_tokens == 12 and bool(layer.real.all())
        assert layer.running["queries"].shape == (2, 4, 8, 16)


def test_a_latent_mla_layer_is_refused_at_construction():
    model = make_tiny_model("deepseek-v3-mla")
    with pytest.raises(ValueError, match="caches a latent"):
        EvictionCache(model.config, ExpectedAttention(budget=8))


def test_a_layer_caching_other_keys_than_the_queries_meet_is_refused():
    keys, queries = torch.randn(1, 1, 6, 16), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\).*16-channel keys, 8-channel queries"):
        scores(ExpectedAttention(budget=8), geometry(16, kv_heads=1), keys, queries)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"query_window": 0}, "query_window=0 must be an integer between 1 and 4096"),
        ({"query_window": 4097}, "query_window=4097 must be an integer between 1 and 4096"),
        ({"n_future_positions": 1.5}, "n_future_positions=1.5 must be an integer between 1 and 131072"),
        ({"n_future_positions": 10**12}, "n_future_positions=1000000000000 must be an integer between 1 and 131072"),
        ({"recent": 9}, "recent=9 must be an integer between 0 and budget=8"),
        ({"sink_tokens": -1}, "sink_tokens=-1 must be an integer between 0 and budget=8"),
        ({"recent": 5, "sink_tokens": 4}, r"recent=5 \+ sink_tokens=4 = 9 exceeds budget=8"),
        ({"per_head": "no"}, "per_head='no' must be True or False"),
    ],
)
def test_bad_parameters_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        ExpectedAttention(budget=8, **settings)


def test_the_largest_accepted_values_still_score():
    """At the bounds the policy works (a few tokens, a 128K-position rotation average)."""
    policy = ExpectedAttention(budget=4, query_window=4096, n_future_positions=131072, recent=0, sink_tokens=0)
    rope = Rope(10000.0 ** -(torch.arange(8, dtype=torch.float64) / 8))
    keys, queries = torch.randn(1, 2, 6, 16), torch.randn(1, 4, 6, 16)
    result = scores(policy, geometry(16, rope), keys, queries)
    assert result.shape == (1, 2, 6) and torch.isfinite(result).all()
