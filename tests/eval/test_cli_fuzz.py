"""Every bad value of every `hf-kvcache eval` option ends in a one-line error (after the usage, for
argparse's own refusals) and exit status 2, never a traceback and never a run (fuzzed with hypothesis)."""

import pytest
from conftest import save_tiny_model_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache.cli import main

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
