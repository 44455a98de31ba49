"""benchmarks/plot_long_generation.py: runs per budget merged per cache, other generations refused, table and PNG."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_long_generation.py"
RUN = {"model": "tiny", "prompt_tokens": 8, "temperature": 0.7, "seed": 0, "generated": [1, 2, 3]}


def run_file(path: Path, rows: list[tuple], **changes) -> Path:
    results = [
        {"cache": cache, "agreement": agreement, "mean_kl": 0.1, "first_departure": departure,
         "peak_bytes": 2**20, "decode_tokens_per_s": speed}
        for cache, agreement, departure, speed in rows
    ]  # fmt: skip
    path.write_text(json.dumps({**RUN, **changes, "results": results}))
    return path


@pytest.fixture(scope="module")
def script() -> dict:
    return runpy.run_path(str(SCRIPT), run_name="plot_long_generation")


def test_runs_merge_per_cache_with_the_budget_written_b(script, tmp_path, capsys):
    small = run_file(
        tmp_path / "a.json", [("dynamic", 1.0, None, 20.0), ("sink:sink_tokens=4,window=124", 0.5, 3, 10.0)]
    )
    large = run_file(
        tmp_path / "b.json", [("dynamic", 1.0, None, 10.0), ("sink:sink_tokens=4,window=252", 0.75, 9, 5.0)]
    )
    script["main"](["128=" + str(small), "256=" + str(large), "--output", str(tmp_path / "sweep.png")])
    printed = capsys.readouterr().out
    assert "| `dynamic` | all | 1.000 | 0.100 | none | 1.00 | 1.00x |" in printed
    assert "| `sink:sink_tokens=4,window=B-4` | 128 | 0.500 | 0.100 | 3 | 1.00 | 0.50x |" in printed
    assert "| `sink:sink_tokens=4,window=B-4` | 256 | 0.750 | 0.100 | 9 | 1.00 | 0.50x |" in printed
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert script["template"]("tova:budget=64,statistics=a/b/s.json,compaction_interval=64", 64) == (
        "tova:budget=B,statistics=s.json,compaction_interval=64"
    )


def test_runs_of_another_generation_are_refused(script, tmp_path):
    first = run_file(tmp_path / "a.json", [("dynamic", 1.0, None, 20.0)])
    other = run_file(tmp_path / "b.json", [("dynamic", 1.0, None, 20.0)], generated=[1, 2, 4])
    with pytest.raises(ValueError, match="generated differ"):
        script["merged_rows"]([(128, first), (256, other)])
