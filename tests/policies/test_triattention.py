"""TriAttention: the score against the trigonometric series computed independently, the query statistics against
a direct computation from the model's projections, the statistics file, padded rows, the calibrate command."""

import math

import pytest
import torch
from conftest import make_tiny_model
from helpers import left_padded_batch, random_ids

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.caches.base import FULL_PRECISION
from hf_kvcache.caches.policy_layer import PolicyLayer
from hf_kvcache.calibration.query_statistics import calibrate_query_statistics
from hf_kvcache.cli import main
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies import TriAttention
from hf_kvcache.policies.triattention import QueryStatistics
from hf_kvcache.rope import Rope

CHANNELS, PAIRS = 8, 4
INV_FREQ = torch.tensor([1.0, 0.3, 0.05, 0.01], dtype=torch.float64)


def rope_layer(policy: TriAttention) -> PolicyLayer:
    geometry = LayerGeometry(0, "full_attention", None, 1, CHANNELS, CHANNELS, positions="rope", rope=Rope(INV_FREQ))
    return PolicyLayer(geometry, FULL_PRECISION, policy, policy.budget, num_layers=1)


def rotate_pairs(vector: list[float], angles: list[float]) -> list[float]:
    """`vector` with its channel pairs (i, i + 4) rotated by `angles[i]` (the "half" layout), in plain Python."""
    out = list(vector)
    for f, angle in enumerate(angles):
        x, y = vector[f], vector[f + PAIRS]
        out[f], out[f + PAIRS] = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
    return out


def reference_score(centers, norms, pre_rope_keys, seen: int, horizon: int) -> list[float]:
    """Per key: the mean over query heads of (the center's logit averaged over future distances, the series
    sum_f c_f . R(-distance theta_f) k_f) + sum_f (E|q_f| - |c_f|) |k_f|."""
    distances = [2**i for i in range(int(math.log2(horizon)) + 1)]
    pair_norm = lambda v, f: math.hypot(v[f], v[f + PAIRS])  # noqa: E731
    scores = []
    for j, key in enumerate(pre_rope_keys):
        total = 0.0
        for center, norm in zip(centers, norms):
            series = 0.0
            for d in distances:
                distance = seen - 1 + d - j
                turned = rotate_pairs(key, [-distance * float(w) for w in INV_FREQ])
                series += sum(c * k for c, k in zip(center, turned)) / len(distances)
            spread = sum((norm[f] - pair_norm(center, f)) * pair_norm(key, f) for f in range(PAIRS))
            total += (series + spread) / len(centers)
        scores.append(total)
    return scores


def test_score_equals_the_trigonometric_series(tmp_path):
    torch.manual_seed(0)
    centers, keys = torch.randn(2, CHANNELS), torch.randn(10, CHANNELS)
    norms = torch.hypot(centers[:, :PAIRS], centers[:, PAIRS:]) + torch.rand(2, PAIRS)  # E|q_f| >= |c_f|
    path = QueryStatistics({0: centers}, {0: norms}).save(tmp_path / "statistics.json")
    policy = TriAttention(budget=4, statistics=str(path), horizon=64, recent=1)
    layer = rope_layer(policy)
    rotated = torch.tensor([rotate_pairs(key, [j * float(w) for w in INV_FREQ]) for j, key in enumerate(keys.tolist())])
    layer.update(rotated.view(1, 1, 10, CHANNELS), torch.zeros(1, 1, 10, CHANNELS))
    step = layer._step(query_length=10)
    policy.update_state(step)
    expected = reference_score(centers.tolist(), norms.tolist(), keys.tolist(), seen=10, horizon=64)
    torch.testing.assert_close(policy.score(step)[0, 0], torch.tensor(expected), atol=1e-4, rtol=1e-4)


def direct_statistics(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 of a tiny llama: its pre-RoPE queries straight from the projections, averaged over the tokens."""
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        queries = attention.q_proj(hidden).view(ids.shape[1], -1, attention.head_dim)  # [tokens, heads, dim]
    first, second = queries.chunk(2, dim=-1)
    return queries.mean(0), torch.hypot(first, second).mean(0)


def test_calibrated_statistics_are_the_mean_pre_rope_queries():
    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 30)
    statistics = calibrate_query_statistics(model, ids, chunk=7)
    centers, norms = direct_statistics(model, ids)
    torch.testing.assert_close(statistics.centers[0], centers, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(statistics.component_norms[0], norms, atol=1e-5, rtol=1e-5)
    assert sorted(statistics.centers) == [0, 1] and statistics.tokens == 30 and statistics.chunk == 7
    assert model.config._attn_implementation == "sdpa"  # handed back as it came


def test_the_file_round_trips_and_is_checked_against_the_model(tmp_path):
    model = make_tiny_model("llama")
    statistics = calibrate_query_statistics(model, random_ids(model, 1, 20), source="random ids")
    path = statistics.save(tmp_path / "statistics.json")
    loaded = QueryStatistics.load(path)
    for layer in statistics.centers:
        assert torch.equal(loaded.centers[layer], statistics.centers[layer])
        assert torch.equal(loaded.component_norms[layer], statistics.component_norms[layer])
    assert (loaded.source, loaded.tokens) == ("random ids", 20)
    EvictionCache(model.config, TriAttention(budget=8, statistics=str(path)))  # fits its own model
    other = make_tiny_model("gpt2").config  # another geometry: no RoPE, 16 components per key, not 8
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\): TriAttention's query statistics are"):
        EvictionCache(other, TriAttention(budget=8, statistics=str(path)))
    with pytest.raises(ValueError, match="hold no such layer"):
        QueryStatistics({0: statistics.centers[0]}, {0: statistics.component_norms[0]}).check_layer(
            EvictionCache(model.config, TriAttention(budget=8)).layers[1].geometry, "TriAttention"
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"format": "other"}', "not query statistics"),
        ('{"format": "hf_kvcache.query_statistics", "version": 9, "layers": []}', "version 9"),
        ('{"format": "hf_kvcache.query_statistics", "version": 1, "layers": [{"layer": 0}]}', "missing field"),
        (
            '{"format": "hf_kvcache.query_statistics", "version": 1, "layers": '
            '[{"layer": 0, "centers": [[1, NaN]], "component_norms": [[1]]}]}',
            "not finite",
        ),
        (
            '{"format": "hf_kvcache.query_statistics", "version": 1, "layers": '
            '[{"layer": 0, "centers": [[1, 2]], "component_norms": [[-1]]}]}',
            "negative",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        TriAttention(statistics=str(path))
    assert str(path) in str(caught.value)


def test_a_missing_file_is_named():
    with pytest.raises(ValueError, match=r"statistics='/nonexistent.json'.*cannot read it"):
        TriAttention(statistics="/nonexistent.json")


def test_padded_rows_keep_what_each_keeps_alone(tmp_path):
    """With file statistics, scores depend on RoPE positions: each left-padded row's positions start at its first
    real token, so a padded row keeps the same tokens as the row alone."""
    model = enable_score_capture(make_tiny_model("llama"))
    path = calibrate_query_statistics(model, random_ids(model, 1, 40, seed=5)).save(tmp_path / "statistics.json")
    policy = TriAttention(budget=8, statistics=str(path), recent=2)
    ids, mask = left_padded_batch(model, [30, 21])
    batch = EvictionCache(model.config, policy)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **{CACHE_KWARG: batch})
    for row, padding in ((0, 0), (1, 9)):
        alone = EvictionCache(model.config, policy)
        model.generate(ids[row : row + 1, padding:], max_new_tokens=4, **{CACHE_KWARG: alone})
        for index in (0, 1):
            kept_alone = alone.layers[index].kept_positions()[0]
            assert batch.layers[index].kept_positions()[row] == [[p + padding for p in h] for h in kept_alone]


def test_the_calibrate_command_writes_statistics_a_cache_takes(folder_and_text, tmp_path, capsys):
    folder, text = folder_and_text
    output = tmp_path / "statistics.json"
    argv = ["calibrate", "--query-statistics", "--model", str(folder), "--dataset", str(text), "--tokens", "64"]
    assert main([*argv, "--chunk-size", "16", "--output", str(output), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "concentration" in printed and f"triattention:budget=256,statistics={output}" in printed
    statistics = QueryStatistics.load(output)
    assert statistics.tokens == 64 and "text.txt" in statistics.source
    assert main([*argv, "--average-bits", "3", "--output", str(output)]) == 2
    assert "--average-bits cannot apply" in capsys.readouterr().err
