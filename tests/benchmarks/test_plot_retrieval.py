"""benchmarks/plot_retrieval.py: runs merged per template and budget, other prompts refused, the table and PNG."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_retrieval.py"
SETTINGS = {"task": "passkey", "samples": 2, "budgets": [128], "prompt_tokens": 800, "new_tokens": 8, "seed": 0}


def run_file(path: Path, rows: list[tuple], settings: dict = SETTINGS) -> Path:
    passkey = [
        {"template": template, "budget": budget, "accuracy": accuracy, "mean_cache_bytes": 2**20 * (budget or 9)}
        for template, budget, accuracy in rows
    ]
    path.write_text(json.dumps({"settings": settings, "passkey": passkey}))
    return path


@pytest.fixture(scope="module")
def script() -> dict:
    return runpy.run_path(str(SCRIPT), run_name="plot_retrieval")


def test_runs_merge_into_one_row_per_template_and_a_figure(script, tmp_path, capsys):
    first = run_file(tmp_path / "a.json", [("dynamic", None, 1.0), ("tova:budget={budget}", 128, 0.25)])
    second = run_file(tmp_path / "b.json", [("tova:budget={budget}", 512, 0.75), ("tova:budget={budget}", 128, 0.5)])
    script["main"]([str(first), str(second), "--output", str(tmp_path / "sweep.png")])
    printed = capsys.readouterr().out
    assert "| `dynamic` | 100% | 100% | 9.00 / 9.00 |" in printed
    assert "| `tova:budget=B` | 25% | 75% | 128.00 / 512.00 |" in printed  # the first file's 128 row wins
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_runs_on_other_prompts_are_refused(script, tmp_path):
    first = run_file(tmp_path / "a.json", [("dynamic", None, 1.0)])
    other = run_file(tmp_path / "b.json", [("dynamic", None, 1.0)], {**SETTINGS, "samples": 50})
    with pytest.raises(ValueError, match="other prompts"):
        script["merged_rows"]([first, other])
    (tmp_path / "c.json").write_text(json.dumps({"settings": SETTINGS}))
    with pytest.raises(ValueError, match="no 'passkey' rows"):
        script["merged_rows"]([tmp_path / "c.json"])
