"""`--task long-generation`: a reference generation replayed through each cache, checked against transformers'
own generate and a forward with no cache."""

import json

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from transformers import DynamicCache

from hf_kvcache import build_cache
from hf_kvcache.cli import main
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.eval.long_generation import evaluate_long_generation, kl_divergence, reference_generation, replay

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def prompt(model):
    return random_ids(model, 1, 12, seed=3)


@pytest.fixture(scope="module")
def generated(model, prompt):
    return reference_generation(model, prompt, NEW_TOKENS)


def test_the_reference_is_transformers_greedy_generation(model, prompt, generated):
    expected = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated == expected[0, prompt.shape[1] :].tolist()


def test_a_sampled_reference_is_seeded_and_agreement_follows_the_full_model(model, prompt, generated):
    sampled = reference_generation(model, prompt, NEW_TOKENS, temperature=1.0, seed=3)
    assert sampled == reference_generation(model, prompt, NEW_TOKENS, temperature=1.0, seed=3) != generated
    run = evaluate_long_generation(
        model, prompt, ["dynamic", "window:window=6"], NEW_TOKENS, 10, progress=False, temperature=1.0, seed=3
    )
    assert run.generated == sampled and run.to_json()["temperature"] == 1.0
    exact, window = run.results
    assert exact.agreement == 1.0 and exact.mean_kl == 0.0  # the full model's own top-1, not the sampled token
    # the window's agreement: its top-1 against the full model's top-1 after the same sampled history
    cache, full, agrees = build_cache("window:window=6", model.config), DynamicCache(), []
    with torch.no_grad():
        ids = prompt
        for token in sampled:
            ours = model(ids, **{CACHE_KWARG: cache}).logits[0, -1].argmax()
            theirs = model(ids, **{CACHE_KWARG: full}).logits[0, -1].argmax()
            agrees.append(bool(ours == theirs))
            ids = torch.tensor([[token]])
    assert window.agrees == agrees and not all(agrees)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_bad_temperature_is_refused(model, prompt, value):
    with pytest.raises(ValueError, match="temperature"):
        evaluate_long_generation(model, prompt, ["dynamic"], NEW_TOKENS, 10, progress=False, temperature=value)


def test_a_cache_that_keeps_everything_agrees_everywhere_with_kl_zero(model, prompt, generated):
    exact = replay(model, prompt, generated, "dynamic", segment_tokens=10)
    assert exact.agreement == 1.0 and exact.kl == [0.0] * NEW_TOKENS and exact.first_departure is None
    everything = replay(model, prompt, generated, "sink:sink_tokens=4,window=1000", segment_tokens=10)
    assert everything.agreement == 1.0 and everything.mean_kl < 1e-9


def test_departure_is_where_free_generation_through_the_cache_leaves_the_reference(model, prompt, generated):
    spec = "window:window=6"
    result = replay(model, prompt, generated, spec, segment_tokens=10)
    cache = build_cache(spec, model.config)
    free = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **{CACHE_KWARG: cache}
    )[0, prompt.shape[1] :].tolist()
    departures = [index for index, (a, b) in enumerate(zip(free, generated)) if a != b]
    assert departures, "the window is too large to depart: the test would not test anything"
    assert result.first_departure == departures[0]
    assert all(result.agrees[: departures[0]]) and 0 < result.agreement < 1 and result.mean_kl > 0


def test_kl_is_taken_against_the_full_model(model, prompt, generated):
    """The reference distribution at a position is the no-cache forward's over the prompt and the tokens before it."""
    result = replay(model, prompt, generated, "window:window=6", segment_tokens=10)
    position = 25
    history = torch.cat([prompt, torch.tensor([generated[:position]])], dim=1)
    with torch.no_grad():
        full = model(history, use_cache=False).logits[0, -1]
        window = build_cache("window:window=6", model.config)
        model(history[:, : prompt.shape[1]], **{CACHE_KWARG: window})
        for token in generated[:position]:
            logits = model(torch.tensor([[token]]), **{CACHE_KWARG: window}).logits[0, -1]
    assert result.kl[position] == pytest.approx(kl_divergence(full, logits), rel=1e-3, abs=1e-6)


def test_segments_and_bytes(model, prompt, generated):
    run = evaluate_long_generation(model, prompt, ["dynamic", "window:window=6"], NEW_TOKENS, 10, progress=False)
    full, window = run.results
    assert [len(result.segments()) for result in run.results] == [4, 4]
    assert sum(row["agreement"] * (row["end"] - row["start"]) for row in window.segments()) == pytest.approx(
        sum(window.agrees)
    )
    assert full.bytes_at == sorted(full.bytes_at) and full.bytes_at[0] < full.bytes_at[-1]  # it grows
    assert len(set(window.bytes_at)) == 1 and window.cache_bytes < full.cache_bytes  # a bounded window does not
    assert run.rows()[0]["speed ratio"] == 1.0
    assert (full.peak_bytes, window.peak_bytes) == (full.cache_bytes, window.cache_bytes)


def test_peak_bytes_count_what_a_cache_holds_between_compactions(model, prompt, generated):
    specs = ["tova:budget=8", "tova:budget=8,compaction_interval=4"]
    every_step, every_fourth = evaluate_long_generation(model, prompt, specs, NEW_TOKENS, 10, progress=False).results
    per_token = every_step.peak_bytes / 8  # one layer-token's bytes, the same in both caches
    assert every_fourth.peak_bytes == every_step.peak_bytes + 3 * per_token  # 3 tokens beyond the budget
    assert max(every_fourth.bytes_at) <= every_fourth.peak_bytes


def test_compress_once_caches_are_refused_before_the_generation(model, prompt):
    with pytest.raises(ValueError, match="compress-once"):
        evaluate_long_generation(model, prompt, ["dynamic", "kvzip:budget=8"], NEW_TOKENS, 10, progress=False)


def test_the_command(folder_and_text, tmp_path, capsys):
    folder, text = folder_and_text
    output = tmp_path / "out"
    argv = ["eval", "--task", "long-generation", "--model", str(folder), "--dataset", str(text)]
    argv += ["--context-tokens", "16", "--max-new-tokens", "24", "--no-progress", "--output", str(output)]
    assert main([*argv, "--cache", "dynamic", "--cache", "window:window=6"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "per segment" in printed
    saved = json.loads((output / "results.json").read_text())
    assert [r["cache"] for r in saved["results"]] == ["dynamic", "window:window=6"]
    assert saved["results"][0]["agreement"] == 1.0 and len(saved["generated"]) == 24
    assert len((output / "segments.csv").read_text().splitlines()) == 1 + 2 * 8  # 24 tokens, segments of 3
    assert (output / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--samples", "3"])
    assert refused.value.code == 2 and "--samples does not apply to --task long-generation" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["eval", "--task", "passkey", "--model", str(folder), "--temperature", "0.7", "--output", str(output)])
    assert refused.value.code == 2 and "--temperature does not apply to --task passkey" in capsys.readouterr().err


def test_a_score_policy_replays_with_capture_and_hands_the_model_back(model, prompt, generated):
    result = replay(model, prompt, generated, "h2o:budget=16", segment_tokens=10)
    assert max(result.kl[:5]) < 1e-9  # 12 prompt + 4 generated tokens fit the budget: nothing evicted yet
    assert result.mean_kl > 0 and model.config._attn_implementation == "sdpa"
