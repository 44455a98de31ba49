"""Runs that scale and survive: several processes give the one-process results, each cache is saved as soon
as it is measured, and --resume measures only what is missing."""

import json
import os
import subprocess
import sys

import pytest
from conftest import save_tiny_model_folder

from hf_kvcache.cli import main
from hf_kvcache.eval import runner
from hf_kvcache.eval.results import CacheResult, PartialResults
from hf_kvcache.models import load_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # most start worker processes

CACHES = ["--cache", "dynamic", "--cache", "quantized:bits=4,group_size=16", "--cache", "window:window=16"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    save_tiny_model_folder(folder / "tiny")
    (folder / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30, encoding="utf-8")
    return folder


def eval_args(workdir, output, *extra) -> list[str]:
    argv = ["eval", "--model", str(workdir / "tiny"), "--dataset", str(workdir / "text.txt"), "--max-tokens", "64"]
    return [
        *argv,
        "--chunk-size",
        "16",
        *CACHES,
        "--decode-tokens",
        "2",
        "--no-progress",
        "--output",
        str(output),
        *extra,
    ]


def results_of(output) -> dict:
    return json.loads((output / "results.json").read_text())


def test_two_processes_give_the_one_process_results(workdir):
    assert main(eval_args(workdir, workdir / "one")) == 0
    command = [sys.executable, "-m", "hf_kvcache.cli", *eval_args(workdir, workdir / "two", "--num-processes", "2")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = results_of(workdir / "one"), results_of(workdir / "two")
    assert [r["cache"] for r in two["results"]] == [r["cache"] for r in one["results"]]
    for single, shared in zip(one["results"], two["results"]):
        assert shared["perplexity"] == pytest.approx(single["perplexity"], rel=1e-4)
        assert shared["nll"] == pytest.approx(single["nll"], rel=1e-4, abs=1e-6)
        assert shared["memory_bytes"] == single["memory_bytes"]
    split = two["distribution"]
    assert split["num_processes"] == 2 and [p["process"] for p in split["processes"]] == [0, 1]
    measured = [cache for process in split["processes"] for cache in process["caches"]]
    assert sorted(measured) == sorted(r["cache"] for r in one["results"]) and all(
        p["caches"] for p in split["processes"]
    )
    assert one["distribution"]["num_processes"] == 1
    assert done.stdout.count("wrote ") == 1  # one result set, written by the main process


def test_each_cache_is_saved_when_measured_and_resume_measures_only_the_rest(workdir, monkeypatch):
    output = workdir / "interrupted"
    measure, calls = runner._measure, []

    def interrupted_after_one(model, spec, *args):
        calls.append(spec.label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run while the second cache is measured
        return measure(model, spec, *args)

    monkeypatch.setattr(runner, "_measure", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(eval_args(workdir, output))
    assert not (output / "results.json").exists() and len(list((output / "partial").rglob("*.json"))) == 1

    calls.clear()
    monkeypatch.setattr(
        runner, "_measure", lambda model, spec, *args: calls.append(spec.label) or measure(model, spec, *args)
    )
    assert main(eval_args(workdir, output, "--resume")) == 0
    run = results_of(output)
    assert calls == ["quantized:bits=4,group_size=16", "window:window=16"]
    assert run["distribution"]["reused"] == ["dynamic"] and len(run["results"]) == 3
    assert run["results"][0]["perplexity"] == pytest.approx(results_of(workdir / "one")["results"][0]["perplexity"])

    calls.clear()  # other settings: nothing is reused
    assert main(eval_args(workdir, output, "--resume", "--seed", "1")) == 0
    assert len(calls) == 3 and results_of(output)["distribution"]["reused"] == []


def test_partial_results_ignore_damaged_and_foreign_files(tmp_path):
    partial = PartialResults(tmp_path, {"model": "a"})
    partial.folder.mkdir(parents=True)
    (partial.folder / "broken.json").write_text("{not json")
    (partial.folder / "foreign.json").write_text(json.dumps({"settings": {"model": "b"}, "label": "x", "result": {}}))
    (partial.folder / "incomplete.json").write_text(
        json.dumps({"settings": {"model": "a"}, "label": "y", "result": {}})
    )
    assert partial.load(CacheResult) == {}


def test_device_map_loads_a_model_over_the_available_devices(workdir):
    model, _ = load_model(workdir / "tiny", device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="pass one of them"):
        load_model(workdir / "tiny", device="cpu", device_map="auto")


def test_bad_process_count_is_one_line(workdir, capsys):
    assert main(eval_args(workdir, workdir / "bad", "--num-processes", "0")) == 2
    assert "--num-processes=0 must be an integer between 1 and " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("death", "how"),
    [("os.kill(os.getpid(), signal.SIGKILL)", "was killed by signal SIGKILL"), ("os._exit(3)", "exited with status 3")],
)
def test_a_dead_worker_is_one_line_naming_it_and_how(workdir, tmp_path, death, how):
    """A worker killed (the OOM killer, a user) or exiting on its own: one line naming which one and how, not
    the launcher's 40-line traceback. Worker 1 dies as it starts (a sitecustomize that only it runs)."""
    (tmp_path / "sitecustomize.py").write_text(
        f'import os, signal\nif os.environ.get("LOCAL_RANK") == "1":\n    {death}\n', encoding="utf-8"
    )
    command = [sys.executable, "-m", "hf_kvcache.cli", *eval_args(workdir, tmp_path / "out", "--num-processes", "2")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("hf-kvcache eval: error: evaluation process 1 of 2 (pid ") and how in lines[0]
