"""Every script in examples/ runs (with reduced sizes) and prints the numbers it claims."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    """Run `examples/<name>` with `args`; its stdout (the test fails with stderr on a non-zero exit).

    A FutureWarning is an error: nothing we run may use a name transformers deprecated (`cache=` replaced
    `past_key_values=` in 5.24)."""
    command = [sys.executable, "-W", "error::FutureWarning", str(EXAMPLES / name), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def parse_number(cell: str) -> float | str:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return cell


def tables(output: str) -> list[list[dict]]:
    """Every `format_table` table in `output`, as lists of rows (numbers parsed)."""
    lines = output.splitlines()
    found = []
    for index in range(1, len(lines)):
        if not re.fullmatch(r"-+( +-+)*", lines[index]):
            continue
        columns = re.split(r" {2,}", lines[index - 1].strip())
        rows = []
        for line in lines[index + 1 :]:
            cells = re.split(r" {2,}", line.strip())
            if not line.strip() or len(cells) != len(columns):
                break
            rows.append({column: parse_number(cell) for column, cell in zip(columns, cells)})
        found.append(rows)
    return found


def test_every_example_is_tested():
    """A new example needs its own test below (this list is the tests' inventory)."""
    tested = {
        "chat_and_pipeline.py",
        "compare_caches.py",
        "generate_quantized.py",
        "prefix_reuse.py",
        "score_eviction.py",
        "stream_past_context.py",
    }
    assert set(SCRIPTS) == tested


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_docstring(name, monkeypatch, capsys):
    namespace = runpy.run_path(str(EXAMPLES / name), run_name="example")
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        namespace["parse_args"]()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert namespace["__doc__"].splitlines()[0] in out
    assert "--model" in out


@pytest.mark.real_model
def test_generate_quantized(real_model):
    out = run_example("generate_quantized.py", "--max-tokens", "200", "--max-new-tokens", "6", "--bits", "4", "2")
    [rows] = tables(out)
    by_cache = {row["cache"]: row for row in rows}
    assert list(by_cache) == ["DynamicCache", "QuantizedCache 4-bit", "QuantizedCache 2-bit"]
    assert all(row["new tokens"] == 6 and row["prompt tokens"] == 200 and row["tokens/s"] > 0 for row in rows)
    dynamic, four, two = (row["cache bytes"] for row in rows)
    assert two < four < dynamic  # 200 tokens: more than the 128-token residual, so blocks were quantized
    assert by_cache["DynamicCache"]["same as dynamic"] == "6/6"
    assert out.count("--- QuantizedCache") == 2


@pytest.mark.real_model
def test_stream_past_context(real_model):
    out = run_example(
        "stream_past_context.py", "--max-tokens", "192", "--window", "32", "--segment", "64", "--step", "1"
    )
    [rows] = tables(out)
    assert [row["tokens"] for row in rows] == ["1-64", "65-128", "129-191", "all"]
    segments, overall = rows[:-1], rows[-1]
    # Dense memory grows with the text; both bounded caches hold the same, constant bytes once full.
    assert segments[0]["dense MiB"] < segments[1]["dense MiB"] < segments[2]["dense MiB"]
    assert segments[1]["sink MiB"] == segments[2]["sink MiB"] == segments[2]["window MiB"]
    assert segments[2]["sink MiB"] < segments[2]["dense MiB"] / 4
    low, high = re.search(r"full: min ([\d,]+), max ([\d,]+)", out).groups()
    assert low == high
    # Perplexity stays in the dense model's range; the sinks beat the plain window.
    assert overall["dense ppl"] < overall["sink ppl"] < 2 * overall["dense ppl"]
    assert overall["sink ppl"] < overall["window ppl"]


@pytest.mark.real_model
def test_compare_caches(real_model, tmp_path):
    specs = ["dynamic", "quantized:bits=2,residual_length=32", "window:window=64"]
    args = ["--max-tokens", "160", "--chunk-size", "32", "--decode-tokens", "2", "--output", str(tmp_path)]
    out = run_example("compare_caches.py", *[a for spec in specs for a in ("--cache", spec)], *args)
    [rows] = tables(out)
    assert [row["cache"] for row in rows] == specs
    dynamic, quantized, window = rows
    assert dynamic["ppl x"] == 1 and dynamic["bytes x"] == 1
    assert 0 < quantized["bytes x"] < 0.6 and 0 < window["bytes x"] < 0.6
    assert dynamic["ppl"] > 1 and 0.8 < quantized["ppl x"] < 1.5
    for name in ("results.json", "results.csv", "log_perplexity.png", "cache_memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "log_perplexity.png").read_bytes().startswith(b"\x89PNG")


def check_prefix_rows(rows: list[dict], requests: int, document: int) -> None:
    assert [row["state"] for row in rows] == ["cold"] + ["warm"] * (requests - 1)
    assert [row["restored tokens"] for row in rows] == [0] + [document] * (requests - 1)
    assert all(row["TTFT ms"] > 0 for row in rows)  # times are printed, not compared: a busy machine reorders them


@pytest.mark.real_model
def test_prefix_reuse_memory_and_redis(real_model, redis_server):
    out = run_example(
        "prefix_reuse.py",
        *("--prefix-tokens", "512", "--block-size", "128", "--requests", "3", "--max-new-tokens", "4"),
        *("--redis-url", redis_server.url),
    )
    memory, redis, summary = tables(out)
    check_prefix_rows(memory, 3, 512)
    check_prefix_rows(redis, 3, 512)
    assert [row["backend"] for row in summary] == ["memory", "redis"]
    assert all(row["cold / warm"] > 0 and row["hit rate"] == "67%" for row in summary)
    assert "same tokens as plain generate: True" in out
    assert re.search(r"Answer \(warm store\): '\S", out), "the model answers (chat format), not an empty string"


@pytest.mark.real_model
def test_score_eviction(real_model):
    out = run_example(
        "score_eviction.py", "--samples", "1", "--prompt-tokens", "240", "--budget", "48", "--max-new-tokens", "6"
    )
    samples, summary = tables(out)
    assert len(samples) == 1 and samples[0]["full"].startswith("found")
    caches = [row["cache"] for row in summary]
    assert caches[0] == "DynamicCache (full)" and "SlidingWindowCache(window=48)" in caches[1]
    assert [name.split("(")[0] for name in caches[2:]] == ["HeavyHitterCache", "TOVACache", "SnapKVCache"]
    full, window, h2o, tova, snapkv = (row["mean cache bytes"] for row in summary)
    # window, H2O and TOVA hold exactly `budget` tokens after decoding, the policy caches plus a padding flag and
    # a position per token (H2O also its accumulated attention); SnapKV also keeps the answer's tokens.
    assert window < tova < h2o < 1.1 * window and tova < snapkv < full
    assert summary[0]["accuracy"] == 1


@pytest.mark.real_model
def test_chat_and_pipeline(real_model):
    out = run_example("chat_and_pipeline.py", "--max-new-tokens", "8")
    pipeline_rows, turns = tables(out)
    dynamic, quantized = pipeline_rows
    assert 0 < quantized["bytes held"] < dynamic["bytes held"]  # the pipeline call really used each cache
    assert [row["turn"] for row in turns] == [1, 2, 3]
    assert turns[0]["tokens reused"] == 0 and all(row["tokens reused"] > 0 for row in turns[1:])
    assert all(row["tokens computed"] < row["tokens reused"] for row in turns[1:])
    assert out.count("assistant (") == 3
