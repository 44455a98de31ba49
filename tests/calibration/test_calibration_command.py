"""`hf-kvcache calibrate` end to end on a tiny model folder, and its one-line errors."""

import pytest
from conftest import save_tiny_model_folder

from hf_kvcache.cli import main
from hf_kvcache.quant.profile import BitProfile
from hf_kvcache.registry import build_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    save_tiny_model_folder(folder / "model")
    (folder / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    return folder


def calibrate_argv(workdir, output, *extra: str) -> list[str]:
    argv = ["calibrate", "--model", str(workdir / "model"), "--dataset", str(workdir / "text.txt"), "--tokens", "48"]
    argv += ["--chunk-size", "8", "--cache-settings", "group_size=8,residual_length=8,sink_tokens=2"]
    return [*argv, "--output", str(output), "--no-progress", *extra]


def test_calibrate_writes_a_loadable_profile_and_prints_the_table(workdir, tmp_path, capsys):
    output = tmp_path / "profiles" / "profile.json"
    assert main(calibrate_argv(workdir, output, "--average-bits", "3", "--choices", "2", "4")) == 0
    printed = capsys.readouterr().out
    assert "KL K2" in printed and "KL V4" in printed and "key bits" in printed
    assert f"quantized:profile={output}" in printed
    profile = BitProfile.load(output)
    assert profile.num_layers == 2 and profile.choices == (2, 4) and profile.average_bits <= 3
    assert profile.tokens == 48 and "text.txt" in profile.source
    assert profile.cache_settings["residual_length"] == 8
    from transformers import AutoConfig

    cache = build_cache(
        f"quantized:profile={output},group_size=8,residual_length=8,sink_tokens=2",
        AutoConfig.from_pretrained(workdir / "model"),
    )
    assert [layer.storage.key_bits for layer in cache.layers] == list(profile.key_bits)

    again = tmp_path / "again.json"
    assert (
        main(
            ["calibrate", "--reuse", str(output), "--average-bits", "2", "--choices", "2", "4", "--output", str(again)]
        )
        == 0
    )
    reused = BitProfile.load(again)
    assert reused.key_bits == reused.value_bits == (2, 2) and reused.key_sensitivity == profile.key_sensitivity
    # without --choices, --reuse chooses among the widths the profile measured (here 2 and 4, not 2 3 4)
    assert main(["calibrate", "--reuse", str(output), "--average-bits", "4", "--output", str(again)]) == 0
    assert set(BitProfile.load(again).key_bits + BitProfile.load(again).value_bits) <= {2, 4}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--average-bits", "5"], "--average-bits=5.0 must be between 2 and 4"),
        (["--choices", "2", "6"], "--choices[1]=6 is not supported"),
        (["--cache-settings", "bits=3"], "--cache-settings bits=3: 'bits' is not a QuantizedCache setting"),
        (
            ["--cache-settings", "foo=1"],
            "--cache-settings foo=1: 'foo' is not a QuantizedCache setting a profile is calibrated with; accepted "
            "settings: group_size, residual_length",
        ),
        (["--cache-settings", "group_size=7"], "group_size=7 must divide"),
        (["--tokens", "100000"], "--tokens 100,000 is more than the"),
        (["--tokens", "1"], "--tokens=1 must be an integer >= 2"),
    ],
)
def test_calibrate_errors_are_one_line(workdir, tmp_path, capsys, extra, message):
    argv = calibrate_argv(workdir, tmp_path / "p.json")
    if extra[0] in argv:  # replace the option's value
        index = argv.index(extra[0])
        argv[index : index + 2] = extra
    else:
        argv += extra
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hf-kvcache calibrate: error: ") and message in error and "\n" not in error
    assert not (tmp_path / "p.json").exists()


def test_calibrate_refuses_options_that_reuse_cannot_apply(tmp_path, capsys):
    path = BitProfile.uniform(2, 2).save(tmp_path / "p.json")
    assert main(["calibrate", "--reuse", str(path), "--tokens", "64", "--output", str(tmp_path / "q.json")]) == 2
    assert "--tokens cannot apply" in capsys.readouterr().err
    assert main(["calibrate", "--reuse", str(path), "--output", str(tmp_path / "q.json")]) == 2
    assert "no measured sensitivities" in capsys.readouterr().err


def test_calibrate_reuse_refuses_a_descending_profile_and_a_fifo_naming_them(tmp_path, capsys):
    """Before, choices [4, 3, 2] were sorted while the tables kept their order: --reuse chose the widths the file
    measured as worst; a FIFO hung the command."""
    import json
    import os

    flat = [[0.0, 0.0, 0.0]] * 2
    good = BitProfile((2, 2), (2, 2), choices=(2, 3, 4), key_sensitivity=flat, value_sensitivity=flat)
    data = json.loads(good.to_json())
    data["choices"] = [4, 3, 2]
    descending = tmp_path / "descending.json"
    descending.write_text(json.dumps(data), encoding="utf-8")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path, message in ((descending, "choices=(4, 3, 2) must be in ascending order"), (fifo, "not a regular file")):
        argv = ["calibrate", "--reuse", str(path), "--average-bits", "3", "--output", str(tmp_path / "q.json")]
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert f"bit profile {path}" in error and message in error and "\n" not in error, error
    assert not (tmp_path / "q.json").exists()
