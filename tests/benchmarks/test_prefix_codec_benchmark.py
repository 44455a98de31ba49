"""benchmarks/prefix_codec.py on a tiny random model folder: every format measured, the exact format exact."""

import json
import runpy
from pathlib import Path

import pytest
from conftest import save_tiny_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prefix_codec.py"


def test_a_run_measures_every_format_and_writes_its_files(tmp_path, capsys):
    folder = save_tiny_model_folder(tmp_path / "model")
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    output = tmp_path / "results"
    main = runpy.run_path(str(SCRIPT), run_name="prefix_codec_benchmark")["main"]
    argv = ["--model", str(folder), "--prefix-tokens", "80", "--continuation-tokens", "16", "--block-size", "32"]
    argv += ["--bits", "4", "--budgets", "1", "3", "--repeats", "1", "--calibration-text", str(text)]
    result = main([*argv, "--calibration-tokens", "200", "--output", str(output)])
    rows = {row["format"]: row for row in result["rows"]}
    assert list(rows) == ["full precision", "4-bit KIVI", "codec 1 bits", "codec 3 bits"]
    exact = rows["full precision"]
    assert all(row["save ms"] > 0 and row["restore ms"] > 0 for row in rows.values())
    assert exact["first-token max |dlogit|"] == 0 and exact["perplexity"] == pytest.approx(result["exact_perplexity"])
    assert exact["x fp16"] == pytest.approx(2.0, rel=0.1)  # fp32 KV, and the block headers
    assert rows["codec 1 bits"]["bytes/token"] < rows["codec 3 bits"]["bytes/token"] < exact["bytes/token"]
    assert rows["codec 1 bits"]["first-token max |dlogit|"] > rows["codec 3 bits"]["first-token max |dlogit|"] > 0
    assert json.loads((output / "results.json").read_text())["rows"] == result["rows"]
    assert (output / "bytes_vs_perplexity.png").stat().st_size > 0 and (output / "calibration.safetensors").exists()
    assert "codec 3 bits" in capsys.readouterr().out
