"""`--resume` reuses a saved result only when it was measured on the same bytes: the same dataset file, the same
model weights. Every reused record is checked field by field; a tampered, damaged or planted file (a FIFO, a
link to /dev/zero, a huge file) is skipped with one warning naming it, and its cache is measured again."""

import copy
import json
import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_tiny_model, save_tiny_model_folder

from hf_kvcache.cli import main
from hf_kvcache.eval import runner, task_runner
from hf_kvcache.eval.results import CacheResult, PartialResults
from hf_kvcache.eval.task_eval import TaskResult

pytestmark = pytest.mark.usefixtures("one_thread")

CACHES = ["--cache", "dynamic", "--cache", "window:window=16"]
LABELS = ["dynamic", "window:window=16"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def eval_args(model: Path, text: Path, output: Path, *extra: str) -> list[str]:
    argv = ["eval", "--model", str(model), "--dataset", str(text), "--max-tokens", "48", "--chunk-size", "16"]
    return [*argv, *CACHES, "--decode-tokens", "2", "--no-progress", "--output", str(output), *extra]


def task_args(model: Path, output: Path, *extra: str) -> list[str]:
    argv = ["eval", "--task", "passkey", "--model", str(model), "--context-tokens", "300", "--samples", "2"]
    return [*argv, *CACHES, "--no-progress", "--output", str(output), *extra]


@pytest.fixture
def measured(monkeypatch) -> list[str]:
    """The labels measured (not reused), in perplexity and task mode."""
    calls: list[str] = []
    measure, task = runner._measure, task_runner.evaluate_task
    monkeypatch.setattr(runner, "_measure", lambda m, spec, *a: calls.append(spec.label) or measure(m, spec, *a))
    monkeypatch.setattr(task_runner, "evaluate_task", lambda *a, **k: calls.append(a[2].label) or task(*a, **k))
    return calls


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    save_tiny_model_folder(folder / "tiny")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def results_of(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def partial_files(output: Path) -> list[Path]:
    return sorted((output / "partial").rglob("*.json"))


def test_dataset_edited_in_place_is_measured_again(workdir, tmp_path, measured):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    output = tmp_path / "out"
    assert main(eval_args(workdir / "tiny", text, output)) == 0
    first = results_of(output)
    assert main(eval_args(workdir / "tiny", text, output, "--resume")) == 0  # the same bytes: all reused
    assert measured == LABELS and results_of(output)["distribution"]["reused"] == LABELS

    measured.clear()
    text.write_text("A slow green turtle walks under the busy bridge. " * 20, encoding="utf-8")  # same name
    assert main(eval_args(workdir / "tiny", text, output, "--resume")) == 0
    second = results_of(output)
    assert measured == LABELS and second["distribution"]["reused"] == []
    assert second["results"][0]["nll"] != first["results"][0]["nll"]  # measured on the new text


def test_one_byte_edited_past_what_is_read_still_counts(workdir, tmp_path, measured):
    """The digest covers the file's bytes, not only the tokens evaluated: any edit is a new dataset."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    output = tmp_path / "out"
    assert main(eval_args(workdir / "tiny", text, output)) == 0
    measured.clear()
    text.write_text(TEXT + "!", encoding="utf-8")
    assert main(eval_args(workdir / "tiny", text, output, "--resume")) == 0
    assert measured == LABELS


def test_model_folder_saved_again_with_other_weights_is_measured_again(workdir, tmp_path, measured):
    model = save_tiny_model_folder(tmp_path / "model")
    output = tmp_path / "out"
    assert main(eval_args(model, workdir / "text.txt", output)) == 0
    first = results_of(output)
    measured.clear()
    make_tiny_model("llama", seed=1).save_pretrained(model)  # the same folder, other weights
    assert main(eval_args(model, workdir / "text.txt", output, "--resume")) == 0
    second = results_of(output)
    assert measured == LABELS and second["distribution"]["reused"] == []
    assert second["results"][0]["perplexity"] != first["results"][0]["perplexity"]


def test_task_mode_reuses_only_results_of_the_same_weights(tmp_path, measured):
    model = save_tiny_model_folder(tmp_path / "model")
    output = tmp_path / "out"
    assert main(task_args(model, output)) == 0
    measured.clear()
    assert main(task_args(model, output, "--resume")) == 0
    assert measured == [] and results_of(output)["distribution"]["reused"] == [f"passkey/{x}" for x in LABELS]
    make_tiny_model("llama", seed=1).save_pretrained(model)
    assert main(task_args(model, output, "--resume")) == 0
    assert measured == LABELS and results_of(output)["distribution"]["reused"] == []


# Tampering: a real record of each kind, altered one field at a time.


@pytest.fixture(scope="module")
def cache_record(workdir, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("cache-record")
    assert main(eval_args(workdir / "tiny", workdir / "text.txt", output)) == 0
    [path] = [p for p in partial_files(output) if json.loads(p.read_text())["label"] == "dynamic"]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def task_record(workdir, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("task-record")
    assert main(task_args(workdir / "tiny", output)) == 0
    [path] = [p for p in partial_files(output) if json.loads(p.read_text())["label"] == "passkey/dynamic"]
    return json.loads(path.read_text())


def load_planted(root: Path, record: dict, kind: type, content: str | bytes | None = None, caplog=None):
    """Plant `record` (or raw `content`) under its label's file name; what `load` returns, and its warnings."""
    partial = PartialResults(root, record["settings"])
    partial.folder.mkdir(parents=True, exist_ok=True)
    path = partial._path(record["label"])
    if content is None:
        content = json.dumps(record)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.eval.results"):
        found = partial.load(kind)
    return found, [r.getMessage() for r in caplog.records], path


def _set(path: str, value):
    def change(result: dict) -> None:
        *parents, last = path.split(".")
        target = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _scale(path: str, factor: float):
    def change(result: dict) -> None:
        _set(path, result[path] * factor)(result)

    return change


CACHE_TAMPERING = {
    "perplexity -1": _set("perplexity", -1.0),
    "perplexity NaN": _set("perplexity", math.nan),
    "perplexity inf": _set("perplexity", math.inf),
    "perplexity 0.5": _set("perplexity", 0.5),
    "perplexity as text": _set("perplexity", "12"),
    "perplexity bool": _set("perplexity", True),
    "perplexity planted 10% better": _scale("perplexity", 0.9),
    "mean_nll negative": _set("mean_nll", -0.1),
    "mean_nll NaN": _set("mean_nll", math.nan),
    "mean_nll doubled": _scale("mean_nll", 2.0),
    "nll negative": _set("nll.0", -1.0),
    "nll NaN": _set("nll.3", math.nan),
    "nll text": _set("nll.3", "x"),
    "nll not a list": _set("nll", 3.0),
    "nll shortened": lambda r: r.update(nll=r["nll"][:-1]),
    "tokens 0": _set("tokens", 0),
    "tokens one more": lambda r: r.update(tokens=r["tokens"] + 1),
    "tokens float": _set("tokens", 47.0),
    "tokens bool": _set("tokens", True),
    "bucket_size 0": _set("bucket_size", 0),
    "bucket_size other": _set("bucket_size", 6),
    "bucket_perplexity NaN": _set("bucket_perplexity.0", math.nan),
    "bucket_perplexity planted": _set("bucket_perplexity.0", 1.0),
    "bucket_perplexity shortened": lambda r: r.update(bucket_perplexity=r["bucket_perplexity"][:-1]),
    "memory_positions reversed": lambda r: r.update(memory_positions=r["memory_positions"][::-1]),
    "memory_positions negative": _set("memory_positions.0", -16),
    "memory_bytes negative": _set("memory_bytes.0", -5),
    "memory_bytes shortened": lambda r: r.update(memory_bytes=r["memory_bytes"][:-1]),
    "cache_bytes negative": _set("cache_bytes", -1),
    "cache_bytes not the last held": lambda r: r.update(cache_bytes=r["cache_bytes"] + 1),
    "cache_bytes float": lambda r: r.update(cache_bytes=float(r["cache_bytes"])),
    "peak_memory_bytes negative": _set("peak_memory_bytes", -1),
    "peak_memory_bytes text": _set("peak_memory_bytes", "1 GB"),
    "peak_memory_bytes huge float": _set("peak_memory_bytes", 1e30),
    "peak_memory_kind unknown": _set("peak_memory_kind", "vram"),
    "prefill_tokens_per_s negative": _set("prefill_tokens_per_s", -1.0),
    "prefill_tokens_per_s zero": _set("prefill_tokens_per_s", 0.0),
    "prefill_tokens_per_s None in chunk mode": _set("prefill_tokens_per_s", None),
    "decode_tokens_per_s NaN": _set("decode_tokens_per_s", math.nan),
    "decode_tokens_per_s inf": _set("decode_tokens_per_s", math.inf),
    "decode_tokens_per_s None": _set("decode_tokens_per_s", None),
    "ratios not a mapping": _set("ratios", "x"),
    "cache relabelled": _set("cache", "window:window=16"),
    "spec of another cache": _set("spec", {"name": "window", "params": {"window": 16}}),
    "spec params added": _set("spec", {"name": "dynamic", "params": {"bits": 2}}),
    "unknown field": _set("secret", 1),
    "missing field": lambda r: r.pop("perplexity"),
}


@pytest.mark.parametrize("case", list(CACHE_TAMPERING))
def test_each_tampered_field_of_a_cache_result_is_skipped_with_one_warning(cache_record, tmp_path, caplog, case):
    record = copy.deepcopy(cache_record)
    CACHE_TAMPERING[case](record["result"])
    found, warnings, path = load_planted(tmp_path, record, CacheResult, caplog=caplog)
    assert found == {}, f"{case}: reported as measured"
    assert len(warnings) == 1 and str(path) in warnings[0] and "measured again" in warnings[0]


def test_an_untouched_record_is_reused(cache_record, tmp_path, caplog):
    found, warnings, _ = load_planted(tmp_path, copy.deepcopy(cache_record), CacheResult, caplog=caplog)
    assert list(found) == ["dynamic"] and warnings == []
    assert found["dynamic"].perplexity == cache_record["result"]["perplexity"]


RECORD_TAMPERING = {
    "label of another cache": lambda r: r.update(label="window:window=16"),
    "other settings": lambda r: r["settings"].update(seed=r["settings"]["seed"] + 1),
    "other weights": lambda r: r["settings"].update(model_weights="0" * 64),
    "digest changed": lambda r: r.update(digest="0" * 16),
    "digest missing": lambda r: r.pop("digest"),
    "result not an object": lambda r: r.update(result=[1, 2]),
    "extra key": lambda r: r.update(note="x"),
}


@pytest.mark.parametrize("case", list(RECORD_TAMPERING))
def test_a_record_of_other_settings_or_relabelled_is_skipped(cache_record, tmp_path, caplog, case):
    record = copy.deepcopy(cache_record)
    folder = PartialResults(tmp_path, copy.deepcopy(record["settings"]))  # where the untampered record lies
    RECORD_TAMPERING[case](record)
    folder.folder.mkdir(parents=True)
    path = folder._path(cache_record["label"])
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.eval.results"):
        assert folder.load(CacheResult) == {}
    assert [str(path) in r.getMessage() for r in caplog.records] == [True]


DAMAGED = {
    "not JSON": "{not json",
    "empty": "",
    "a JSON list": "[1, 2, 3]",
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "not UTF-8": b"\xff\xfe{}",
    "a 5000-digit integer": '{"settings": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_files_are_skipped_with_one_warning(cache_record, tmp_path, caplog, case):
    found, warnings, path = load_planted(tmp_path, cache_record, CacheResult, DAMAGED[case], caplog)
    assert found == {} and len(warnings) == 1 and str(path) in warnings[0]


def load_in_time(partial: PartialResults, kind: type, seconds: float = 20.0):
    found: list = []
    thread = threading.Thread(target=lambda: found.append(partial.load(kind)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "load() hangs"
    return found[0]


@pytest.mark.parametrize("plant", ["fifo", "dev-zero link", "link to a valid record", "folder", "over the cap"])
def test_planted_files_among_partial_results_do_not_hang_and_the_rest_is_reused(cache_record, tmp_path, caplog, plant):
    partial = PartialResults(tmp_path, cache_record["settings"], max_bytes=1_000_000)
    partial.folder.mkdir(parents=True)
    partial._path("dynamic").write_text(json.dumps(cache_record))
    planted = partial._path("window:window=16")
    if plant == "fifo":
        os.mkfifo(planted)
    elif plant == "dev-zero link":
        planted.symlink_to("/dev/zero")
    elif plant == "link to a valid record":
        other = tmp_path / "elsewhere.json"
        other.write_text(json.dumps({**cache_record, "label": "window:window=16"}))
        planted.symlink_to(other)
    elif plant == "folder":
        planted.mkdir()
    else:
        with open(planted, "wb") as handle:  # sparse: 2 GB claimed, nothing written
            handle.truncate(2 * 10**9)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.eval.results"):
        found = load_in_time(partial, CacheResult)
    assert list(found) == ["dynamic"]
    assert [str(planted) in r.getMessage() for r in caplog.records] == [True]


TASK_TAMPERING = {
    "accuracy 7.5": _set("accuracy", 7.5),
    "accuracy negative": _set("accuracy", -0.1),
    "accuracy NaN": _set("accuracy", math.nan),
    "accuracy planted": lambda r: r.update(accuracy=1.0 if r["accuracy"] < 1 else 0.0),
    "mean_cache_bytes negative": _set("mean_cache_bytes", -1.0),
    "mean_cache_bytes planted": _scale("mean_cache_bytes", 0.5),
    "decode_tokens_per_s NaN": _set("decode_tokens_per_s", math.nan),
    "decode_tokens_per_s planted": lambda r: r.update(decode_tokens_per_s=1e9),
    "a sample's score 2": _set("samples.0.score", 2.0),
    "a sample's score NaN": _set("samples.0.score", math.nan),
    "a sample's cache_bytes negative": _set("samples.0.cache_bytes", -1),
    "a sample's index repeated": _set("samples.1.index", 0),
    "a sample's task other": _set("samples.0.task", "word"),
    "a sample's seed other": _set("samples.0.seed", 99),
    "a sample's new_tokens past the budget": _set("samples.0.new_tokens", 10**6),
    "a sample's decode_tokens past new_tokens": lambda r: r["samples"][0].update(decode_tokens=10**6),
    "a sample's depth 1.5": lambda r: r["samples"][0].update(depths=[1.5]),
    "a sample's seconds inf": _set("samples.0.seconds", math.inf),
    "a sample's field missing": lambda r: r["samples"][0].pop("score"),
    "a sample not an object": _set("samples.0", "x"),
    "samples shortened": lambda r: r.update(samples=r["samples"][:1]),
    "samples empty": lambda r: r.update(samples=[]),
    "spec relabelled": _set("spec", "window:window=16"),
    "cache of another strategy": _set("cache", "window"),
    "task other": _set("task", "word"),
    "unknown field": _set("secret", 1),
}


@pytest.mark.parametrize("case", list(TASK_TAMPERING))
def test_each_tampered_field_of_a_task_result_is_skipped_with_one_warning(task_record, tmp_path, caplog, case):
    record = copy.deepcopy(task_record)
    TASK_TAMPERING[case](record["result"])
    found, warnings, path = load_planted(tmp_path, record, TaskResult, caplog=caplog)
    assert found == {}, f"{case}: reported as measured"
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_an_untouched_task_record_is_reused(task_record, tmp_path, caplog):
    found, warnings, _ = load_planted(tmp_path, copy.deepcopy(task_record), TaskResult, caplog=caplog)
    assert list(found) == ["passkey/dynamic"] and warnings == []


def test_a_tampered_result_is_measured_again_on_the_command_line(workdir, tmp_path):
    """As a user sees it: one warning line per bad file (a tampered record, a FIFO), the run does not hang, the
    bad cache is measured again and the reported figure is the measured one."""
    output = tmp_path / "out"
    command = [sys.executable, "-m", "hf_kvcache.cli", *eval_args(workdir / "tiny", workdir / "text.txt", output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = {r["cache"]: r["perplexity"] for r in results_of(output)["results"]}
    [path] = [p for p in partial_files(output) if json.loads(p.read_text())["label"] == "dynamic"]
    record = json.loads(path.read_text())
    record["result"]["perplexity"] = 7.5
    path.write_text(json.dumps(record))
    fifo = path.with_name("planted.json")
    os.mkfifo(fifo)
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "skipping partial result" in line]
    assert len(warnings) == 2 and any(str(path) in w for w in warnings) and any(str(fifo) in w for w in warnings)
    run = results_of(output)
    assert run["distribution"]["reused"] == ["window:window=16"]
    assert run["results"][0]["perplexity"] == pytest.approx(measured["dynamic"], rel=1e-5) != 7.5
