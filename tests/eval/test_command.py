import csv
import json
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import save_tiny_model_folder

from hf_kvcache import models as model_loading
from hf_kvcache.cli import main
from hf_kvcache.eval.results import CSV_COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model_folder(tmp_path / "tiny")


def test_cli_runs_without_deprecation_warnings(tiny_model_dir, tmp_path):
    """`hf-kvcache eval` as a user runs it, with every FutureWarning (transformers' deprecations) an error."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset", str(text), "--max-tokens", "48"]
    argv += ["--cache", "dynamic", "--cache", "sink:sink_tokens=2,window=16", "--mode", "token", "--no-progress"]
    argv += ["--decode-tokens", "2", "--output", str(tmp_path / "out")]
    command = [sys.executable, "-W", "error::FutureWarning", "-m", "hf_kvcache.cli", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FutureWarning" not in done.stderr and "sink:sink_tokens=2,window=16" in done.stdout


def test_demo_runs_without_deprecation_warnings(tiny_model_dir):
    command = [sys.executable, "-W", "error::FutureWarning", "-m", "hf_kvcache.cli", "demo"]
    command += [
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "The lighthouse",
        "--max-new-tokens",
        "4",
        "--bits",
        "8",
        "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quantized 4-bit" in done.stdout and "FutureWarning" not in done.stderr


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    output = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset", str(text), "--max-tokens", "80", "--chunk-size", "16"]
    argv += ["--cache", "dynamic", "--cache", "quantized:bits=4,group_size=16", "--output", str(output)]
    assert main([*argv, "--decode-tokens", "2", "--seed", "3", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "quantized:bits=4,group_size=16" in table and "ppl" in table

    run = json.loads((output / "results.json").read_text())
    assert run["seed"] == 3 and run["mode"] == "chunk" and run["chunk_size"] == 16 and run["max_tokens"] == 80
    assert run["data_source"].startswith("local file") and run["model"] == str(tiny_model_dir)
    assert {"python", "torch", "transformers", "hf_kvcache"} <= set(run["versions"])
    first = run["results"][0]
    assert first["cache"] == "dynamic" and first["tokens"] == 79 and len(first["nll"]) == 79
    assert first["memory_positions"] == [16, 32, 48, 64, 80]

    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS and [row["cache"] for row in rows] == [
        "dynamic",
        "quantized:bits=4,group_size=16",
    ]
    assert float(rows[1]["perplexity"]) == pytest.approx(run["results"][1]["perplexity"])
    assert float(rows[0]["perplexity_ratio"]) == 1.0

    for name in ("log_perplexity.png", "cache_memory.png", "pareto.png"):
        path = output / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = plt.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100
    report = (output / "report.md").read_text()
    assert "| `quantized:bits=4,group_size=16` |" in report and "![" in report and "hf-kvcache eval --model" in report


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "missing.txt"], "dataset file not found: missing.txt"),
        (["--max-tokens", "100000", "--cache", "dynamic"], "--max-tokens 100,000 is more than the 900 tokens"),
        (["--cache", "nope"], "unknown cache 'nope'"),
        (["--cache", "quantized:bits=5,group_size=16"], "bits=5 is not supported"),
        (["--output", "text.txt"], "--output text.txt: is a file, not a folder"),
        (["--output", "text.txt/results"], "--output text.txt/results: cannot write there"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nodevice"], "device="),
        (["--dataset", "latin1.txt"], "dataset file latin1.txt is not UTF-8 text: byte 3"),
        (["--dataset", "broken.jsonl"], "broken.jsonl:3: not valid JSON"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("0123456789" * 90, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n\n{"text": oops}\n', encoding="utf-8")
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset", "text.txt", "--no-progress", *extra]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines() == [f"hf-kvcache eval: error: {error.partition('error: ')[2]}"]
    assert message in error


def test_cli_error_spanning_lines_is_printed_on_one(tiny_model_dir, tmp_path, capsys):
    (tiny_model_dir / "tokenizer.json").unlink()  # transformers' error for this spans three lines
    assert main(["eval", "--model", str(tiny_model_dir), "--no-progress", "--output", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hf-kvcache eval: error:")


def test_cli_missing_model(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"hf-kvcache eval: error: model folder not found: {tmp_path / 'nowhere'}"


def test_cli_hub_model_without_the_hub(capsys, monkeypatch):
    monkeypatch.setattr(model_loading, "hub_reachable", lambda: False)
    assert main(["eval", "--model", "someone/unknown-model", "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("hf-kvcache eval: error: cannot load model 'someone/unknown-model'") and "unreachable" in line
    )


def test_long_context_task_reports_segments(tiny_model_dir, tmp_path, capsys):
    """`--task long-context`: token by token, per-segment perplexity and bytes held (flat for the sink cache)."""
    text = tmp_path / "book.txt"
    text.write_text("It was a warm evening in early July when he left his room. " * 20, encoding="utf-8")
    output = tmp_path / "long"
    argv = ["eval", "--task", "long-context", "--model", str(tiny_model_dir), "--dataset", str(text)]
    argv += [
        "--max-tokens",
        "97",
        "--segment-tokens",
        "32",
        "--cache",
        "dynamic",
        "--cache",
        "sink:sink_tokens=2,window=16",
    ]
    assert main([*argv, "--decode-tokens", "2", "--no-progress", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    run = json.loads((output / "results.json").read_text())
    assert run["mode"] == "token" and [len(r["bucket_perplexity"]) for r in run["results"]] == [3, 3]
    assert "per segment" in printed and "| `65-96` |" in (output / "report.md").read_text()
    dense, sink = run["results"]
    held = {
        r["cache"]: [b for p, b in zip(r["memory_positions"], r["memory_bytes"]) if p in (33, 65, 97)]
        for r in (dense, sink)
    }
    assert held["dynamic"][0] < held["dynamic"][1] < held["dynamic"][2]
    assert held["sink:sink_tokens=2,window=16"][0] == held["sink:sink_tokens=2,window=16"][2]
