"""Every bad value of every `hf-kvcache eval` option ends in a one-line error (after the usage, for
argparse's own refusals) and exit status 2, never a traceback and never a run, and so does an option of the
other mode or more processes than the machine runs; a saved partial result with any field replaced is either
skipped with one warning or reused only when well formed (fuzzed with hypothesis)."""

import copy
import json
import logging
import math
import os
import tempfile

import pytest
from conftest import save_tiny_model_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache.cli import main
from hf_kvcache.eval.results import CacheResult, PartialResults

BAD_CACHE_SPECS = [
    "nope",
    "quantized:bits=5",
    "quantized:bits=4.0",
    "window:window=0",
    "sink:window=abc",
    "tova:budget=-1",
    "h2o:recent=9999",
    "snapkv:pooling=median",
    "quantized:bits=2,group_size=7",
    "quantized:rotate=maybe",
    ":",
]
BAD_VALUES = {
    "--max-tokens": st.one_of(st.integers(-5, 1), st.integers(10**6, 10**9), st.sampled_from(["x", "1.5", ""])),
    "--chunk-size": st.one_of(st.integers(-5, 0), st.sampled_from(["x", "2.0", ""])),
    "--decode-tokens": st.one_of(st.integers(-5, 0), st.sampled_from(["many", "0.5"])),
    "--mode": st.text(min_size=1, max_size=6).filter(lambda v: v not in ("chunk", "token") and not v.startswith("-")),
    "--dtype": st.sampled_from(["float8", "int4", "fp32", "Float32"]),
    "--device": st.sampled_from(["cuda:7", "mps", "tpu", "cpu:x", "gpu"]),
    "--cache": st.sampled_from(BAD_CACHE_SPECS),
    "--dataset": st.sampled_from(["missing.txt", "data.csv", "wikitext3", "folder.txt", "empty.txt"]),
    "--output": st.sampled_from(["text.txt", "text.txt/sub"]),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    save_tiny_model_folder(folder / "model")
    (folder / "text.txt").write_text("0123456789 " * 60, encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "folder.txt").mkdir()
    return folder


@pytest.mark.parametrize("option", list(BAD_VALUES))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bad_option_values_end_in_one_short_error(workdir, option, data, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    value = str(data.draw(BAD_VALUES[option], label=option))
    argv = ["eval", "--model", str(workdir / "model"), "--dataset", "text.txt", "--max-tokens", "40"]
    argv += ["--no-progress", "--output", str(workdir / "out"), f"{option}={value}"]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own refusal: usage and one error line
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2, f"{option}={value!r} was accepted:\n{captured.out[-500:]}"
    lines = captured.err.strip().splitlines()  # argparse's own refusals print the usage first
    assert "Traceback" not in captured.err and lines[-1].startswith("hf-kvcache eval: error:")
    assert len(lines) == 1 or lines[0].startswith("usage:")


TASK_ONLY = {"--context-tokens": "300", "--samples": "2", "--max-new-tokens": "4"}
PERPLEXITY_ONLY = {
    "--dataset": "text.txt",
    "--max-tokens": "40",
    "--segment-tokens": "8",
    "--mode": "chunk",
    "--chunk-size": "16",
    "--decode-tokens": "2",
}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.sampled_from(["perplexity", "long-context", "passkey", "variable_tracking", "retrieval"]), data=st.data()
)
def test_an_option_of_the_other_mode_is_refused_naming_it_and_the_mode(workdir, task, data, monkeypatch, capsys):
    """Options a task never reads were ignored; a user who passes one meant something by it."""
    monkeypatch.chdir(workdir)
    foreign = TASK_ONLY if task in ("perplexity", "long-context") else PERPLEXITY_ONLY
    option = data.draw(st.sampled_from(sorted(foreign)), label="option")
    argv = [
        "eval",
        "--task",
        task,
        "--model",
        str(workdir / "model"),
        "--no-progress",
        "--output",
        str(workdir / "out"),
    ]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, option, foreign[option]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and lines[0].startswith("usage:")
    assert lines[-1] == f"hf-kvcache eval: error: {option} does not apply to --task {task}; " + lines[-1].split("; ")[1]


@pytest.mark.parametrize("task", ["perplexity", "long-context"])
def test_chunk_size_in_token_mode_is_refused(workdir, task, capsys):
    argv = ["eval", "--task", task, "--model", str(workdir / "model"), "--chunk-size", "16", "--no-progress"]
    with pytest.raises(SystemExit):
        main([*argv, *(["--mode", "token"] if task == "perplexity" else [])])
    assert "--chunk-size does not apply to --mode token" in capsys.readouterr().err


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(min_value=(os.cpu_count() or 1) + 1, max_value=10**9))
def test_more_processes_than_the_machine_runs_are_refused(workdir, count, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.chdir(workdir)
    argv = ["eval", "--model", str(workdir / "model"), "--dataset", "text.txt", "--num-processes", str(count)]
    assert main([*argv, "--no-progress", "--output", str(workdir / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"hf-kvcache eval: error: --num-processes={count} must be an integer between 1 and {os.cpu_count()} "
        "(the CPU cores of this machine, os.cpu_count())"
    )


# Saved partial results, fuzzed: one field of a real record replaced by any JSON value.

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved_record(workdir, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("record")
    argv = ["eval", "--model", str(workdir / "model"), "--dataset", str(workdir / "text.txt"), "--max-tokens", "40"]
    assert main([*argv, "--cache", "dynamic", "--decode-tokens", "2", "--no-progress", "--output", str(output)]) == 0
    [path] = (output / "partial").rglob("*.json")
    return json.loads(path.read_text())


def well_formed(result: CacheResult) -> bool:
    """What a reused result must be, whatever the file held: finite figures in range, the right cache."""
    figures = [result.mean_nll, *result.nll, result.decode_tokens_per_s, result.prefill_tokens_per_s]
    return (
        result.cache == "dynamic"
        and all(isinstance(v, float | int) and math.isfinite(v) and v >= 0 for v in figures)
        and result.perplexity >= 1
        and math.isclose(result.perplexity, math.exp(result.mean_nll), rel_tol=1e-5)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in result.memory_bytes)
        and result.cache_bytes == result.memory_bytes[-1]
        and isinstance(result.peak_memory_bytes, int)
        and result.peak_memory_bytes >= 0
        and result.ratios == {}
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_fuzzed_partial_record_is_skipped_with_one_warning_or_reused_well_formed(saved_record, tmp_path, data):
    record = copy.deepcopy(saved_record)
    field_name = data.draw(st.sampled_from(sorted(record["result"])), label="field")
    record["result"][field_name] = data.draw(JSON_VALUES, label="value")
    partial = PartialResults(tempfile.mkdtemp(dir=tmp_path), record["settings"])
    partial.folder.mkdir(parents=True)
    path = partial._path("dynamic")
    path.write_text(json.dumps(record))
    logger = logging.getLogger("hf_kvcache.eval.results")
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: warnings.append(r.getMessage())
    logger.addHandler(handler)
    try:
        found = partial.load(CacheResult)
    finally:
        logger.removeHandler(handler)
    if found:
        assert warnings == [] and well_formed(found["dynamic"]), f"{field_name}={record['result'][field_name]!r}"
    else:
        assert len(warnings) == 1 and str(path) in warnings[0]
