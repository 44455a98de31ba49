"""Bit profile files are untrusted input: every odd file is refused with a ValueError (or the OSError class)
naming the file and the field, never a RecursionError, a UnicodeDecodeError, a hang or a misread profile."""

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache.files import UnsafeFile
from hf_kvcache.quant.profile import MAX_PROFILE_BYTES, BitProfile, choose_bits


def measured() -> BitProfile:
    rng = random.Random(0)
    keys = [[rng.uniform(0, 1) for _ in range(3)] for _ in range(3)]
    values = [[rng.uniform(0, 1) for _ in range(3)] for _ in range(3)]
    key_bits, value_bits = choose_bits(keys, values, (2, 3, 4), 3)
    return BitProfile(
        key_bits,
        value_bits,
        model="tiny",
        choices=(2, 3, 4),
        key_sensitivity=keys,
        value_sensitivity=values,
        cache_settings={"group_size": 8, "rotate": True},
        budget_bits=3,
        source="text",
        tokens=48,
        chunk=8,
        reference_nll=5.5,
        seconds=1.0,
    )


def document() -> dict:
    return json.loads(measured().to_json())


def written(tmp_path, data, name: str = "p.json"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


def refused(path, message: str, error: type = ValueError) -> None:
    with pytest.raises(error) as caught:
        BitProfile.load(path)
    text = str(caught.value)
    assert f"bit profile {path}" in text, text
    assert message in text, text


def edited(change) -> dict:
    data = document()
    change(data)
    return data


def test_a_saved_profile_still_round_trips(tmp_path):
    assert BitProfile.load(measured().save(tmp_path / "p.json")) == measured()


def test_descending_choices_are_refused_not_reattributed(tmp_path):
    """A profile listing [4, 3, 2] with tables in that column order was read as if measured at [2, 3, 4]:
    `calibrate --reuse` then picked the widths the file calls worst."""

    def reverse(data):
        data["choices"] = [4, 3, 2]
        for row in data["layers"]:
            row["key_sensitivity"].reverse()
            row["value_sensitivity"].reverse()

    refused(written(tmp_path, edited(reverse)), "choices=(4, 3, 2) must be in ascending order")
    refused(written(tmp_path, edited(lambda d: d.update(choices=[2, 4, 4]))), "choices=(2, 4, 4) lists a width twice")
    with pytest.raises(ValueError, match=r"choices=\(4, 2\) must be in ascending order"):
        choose_bits([[0.0, 1.0]], [[0.0, 1.0]], (4, 2), 3)


HOSTILE_TEXTS = {
    "deep nesting": (b"[" * 200_000 + b"]" * 200_000, "not JSON (nested too deeply)"),
    "deep field": (
        b'{"format": "hf_kvcache bit profile", "version": 1, "layers": [], "choices": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        "not JSON (nested too deeply)",
    ),
    "not UTF-8": (b'{"format": "\xff\xfe"}', "not UTF-8 text (byte 0xff at offset 12)"),
    "UTF-16": ('{"format": 1}'.encode("utf-16"), "not UTF-8 text"),
    "huge integer": (b'{"version": ' + b"9" * 5000 + b"}", "not JSON (Exceeds the limit"),
    "empty": (b"", "not JSON"),
    "a list": (b"[1, 2]", "not a bit profile"),
    "version true": (b'{"format": "hf_kvcache bit profile", "version": true}', "bit profile version True"),
}


@pytest.mark.parametrize("case", HOSTILE_TEXTS, ids=list(HOSTILE_TEXTS))
def test_hostile_bytes_are_refused_naming_the_file(tmp_path, case):
    data, message = HOSTILE_TEXTS[case]
    refused(written(tmp_path, data), message)


def test_a_fifo_a_device_a_folder_and_a_huge_file_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # opening it for reading would block forever
    refused(fifo, "is not a regular file", UnsafeFile)
    refused(tmp_path, "is not a regular file", UnsafeFile)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")  # reading it would never end
    refused(zero, "is not a regular file", UnsafeFile)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as file:
        file.truncate(MAX_PROFILE_BYTES + 1)  # sparse: no disk used
    refused(huge, f"more than the {MAX_PROFILE_BYTES} accepted", UnsafeFile)
    refused(tmp_path / "missing.json", "cannot read it (No such file or directory)", FileNotFoundError)


NAN = float("nan")
BAD_FIELDS = {
    "NaN table": (lambda d: d["layers"][1]["key_sensitivity"].__setitem__(2, NAN), "key_sensitivity[1][2]=nan"),
    "Infinity table": (
        lambda d: d["layers"][0]["value_sensitivity"].__setitem__(0, float("inf")),
        "value_sensitivity[0][0]=inf must be a finite number",
    ),
    "string in table": (lambda d: d["layers"][0]["key_sensitivity"].__setitem__(0, "0.1"), "key_sensitivity[0][0]="),
    "short table row": (lambda d: d["layers"][0]["key_sensitivity"].pop(), "key_sensitivity[0]=[0.8444218515250481"),
    "table in some layers": (
        lambda d: d["layers"][2].pop("value_sensitivity"),
        "value_sensitivity is given for some layers but not for layer(s) [2]",
    ),
    "num_layers mismatch": (lambda d: d.update(num_layers=4), "num_layers=4 but the file lists 3 layers"),
    "num_layers string": (lambda d: d.update(num_layers="3"), "num_layers='3' but the file lists 3 layers"),
    "layer numbered twice": (lambda d: d["layers"][2].update(layer=1), "numbered 0, 1, ... once each"),
    "layer as float": (lambda d: d["layers"][2].update(layer=2.0), "numbered 0, 1, ... once each"),
    "layer as bool": (lambda d: d["layers"][1].update(layer=True), "numbered 0, 1, ... once each"),
    "layers an object": (lambda d: d.update(layers={"0": {}}), "layers must be a list of objects"),
    "layer a list": (lambda d: d["layers"].__setitem__(0, [0, 2, 2]), "layers must be a list of objects"),
    "width as bool": (lambda d: d["layers"][0].update(key_bits=True), "key_bits[0]=True is not supported"),
    "width as float": (lambda d: d["layers"][0].update(value_bits=4.0), "value_bits[0]=4.0 is not supported"),
    "choices a string": (lambda d: d.update(choices="234"), "choices='234' must be a list of widths"),
    "choices an object": (lambda d: d.update(choices={"2": 1}), "choices={'2': 1} must be a list of widths"),
    "budget NaN": (lambda d: d.update(budget_bits=NAN), "budget_bits=nan must be a finite number"),
    "budget out of range": (lambda d: d.update(budget_bits=9), "budget_bits=9 must be between 2 and 4"),
    "reference_nll NaN": (lambda d: d["calibration"].update(reference_nll=NAN), "reference_nll=nan must be a finite"),
    "seconds negative": (lambda d: d["calibration"].update(seconds=-1), "seconds=-1 must be a finite number >= 0"),
    "seconds text": (lambda d: d["calibration"].update(seconds="1"), "seconds='1' must be a finite number"),
    "tokens float": (lambda d: d["calibration"].update(tokens=4.5), "tokens=4.5 must be an integer"),
    "source number": (lambda d: d["calibration"].update(source=3), "source=3 must be text"),
    "calibration a list": (lambda d: d.update(calibration=[]), "calibration=[] must be an object"),
    "model a list": (lambda d: d.update(model=["x"]), "model=['x'] must be text"),
    "metric unknown": (lambda d: d.update(metric="ppl"), "metric='ppl' is not supported"),
    "setting nested": (
        lambda d: d["cache_settings"].update(group_size=[8]),
        "cache_settings['group_size']=[8]: every setting must be named",
    ),
    "setting NaN": (lambda d: d["cache_settings"].update(rotate=NAN), "cache_settings['rotate']=nan"),
    "missing widths": (lambda d: d["layers"][0].pop("key_bits"), "missing field 'key_bits'"),
    "huge string width": (lambda d: d["layers"][0].update(key_bits="x" * 100_000), "key_bits[0]='xxxx"),
}


@pytest.mark.parametrize("case", BAD_FIELDS, ids=list(BAD_FIELDS))
def test_bad_fields_are_refused_naming_the_file_and_the_field(tmp_path, case):
    change, message = BAD_FIELDS[case]
    path = written(tmp_path, edited(change))
    with pytest.raises(ValueError) as caught:
        BitProfile.load(path)
    text = str(caught.value)
    assert text.startswith(f"bit profile {path}: ") and message in text, text
    assert len(text) < 800  # a huge value is not repeated in full


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10) | st.floats(allow_nan=True) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_field_replaced_by_any_value_loads_or_is_refused_naming_the_file(tmp_path, data):
    """Fuzzed: one field (top level, calibration, or a layer's) replaced by any JSON value (NaN included) gives
    a valid profile or a ValueError naming the file, nothing else; a profile that loads is a valid one."""
    document_ = document()
    where = data.draw(st.sampled_from(["top", "calibration", "layer"]))
    target = {"top": document_, "calibration": document_["calibration"], "layer": document_["layers"][1]}[where]
    field = data.draw(st.sampled_from(sorted(target)))
    target[field] = data.draw(JSON_VALUES)
    path = written(tmp_path, json.dumps(document_).encode())
    try:
        profile = BitProfile.load(path)
    except ValueError as error:
        assert str(error).startswith(f"bit profile {path}: ")
    else:
        assert profile == BitProfile(**{f: getattr(profile, f) for f in profile.__dataclass_fields__})
        assert list(profile.choices) == sorted(set(profile.choices))
