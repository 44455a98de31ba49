"""`hf-kvcache eval --task ...`: accuracy per cache and task, the same in one process or two, resumable."""

import json
import subprocess
import sys

import pytest
from conftest import save_tiny_model_folder

from hf_kvcache.cli import main
from hf_kvcache.eval import task_runner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tasks") / "tiny")


def task_args(tiny, output, *extra) -> list[str]:
    argv = ["eval", "--task", "passkey", "--model", str(tiny), "--context-tokens", "400", "--samples", "3"]
    return [
        *argv,
        "--cache",
        "dynamic",
        "--cache",
        "window:window=32",
        "--no-progress",
        "--output",
        str(output),
        *extra,
    ]


def test_one_process_and_two_give_the_same_answers(tiny, tmp_path):
    assert main(task_args(tiny, tmp_path / "one")) == 0
    command = [sys.executable, "-m", "hf_kvcache.cli", *task_args(tiny, tmp_path / "two", "--num-processes", "2")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert [(r["spec"], r["accuracy"]) for r in one["results"]] == [(r["spec"], r["accuracy"]) for r in two["results"]]
    for single, shared in zip(one["results"], two["results"]):
        assert [s["generated"] for s in single["samples"]] == [s["generated"] for s in shared["samples"]]
        assert [s["cache_bytes"] for s in single["samples"]] == [s["cache_bytes"] for s in shared["samples"]]
    split = two["distribution"]["processes"]
    assert two["distribution"]["num_processes"] == 2
    assert sorted(i for process in split for i in process["samples"]["passkey/dynamic"]) == [0, 1, 2]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "| `passkey` | window:window=32 |" in report and "pareto_passkey.png" in report
    assert (tmp_path / "two" / "pareto_passkey.png").stat().st_size > 0


def test_tasks_resume(tiny, tmp_path, monkeypatch):
    assert main(task_args(tiny, tmp_path / "out")) == 0
    measured = []
    original = task_runner.evaluate_task
    monkeypatch.setattr(task_runner, "evaluate_task", lambda *a, **k: measured.append(a[2].label) or original(*a, **k))
    assert main(task_args(tiny, tmp_path / "out", "--resume")) == 0
    run = json.loads((tmp_path / "out" / "results.json").read_text())
    assert measured == [] and run["distribution"]["reused"] == ["passkey/dynamic", "passkey/window:window=32"]


def test_bad_task_options_are_one_line(tiny, tmp_path, capsys):
    assert main(task_args(tiny, tmp_path / "bad", "--samples", "0")) == 2
    assert "samples=0 must be an integer >= 1" in capsys.readouterr().err
