"""Per-layer bit profiles: the exact knapsack, the JSON file, QuantizedCache(profile=...), the calibration."""

import inspect
import itertools
import json
import random
import warnings

import pytest
import torch
from conftest import make_tiny_model, tiny_config
from helpers import chunked_logits, dynamic_logits, random_ids
from transformers import DynamicCache

from hf_kvcache import QuantizedCache
from hf_kvcache.caches.storage import FullPrecisionStore
from hf_kvcache.calibration.bit_profiles import (
    NOT_SETTINGS,
    OneLayerQuantizedCache,
    calibrate_bit_profile,
    calibration_passes,
    calibration_settings,
)
from hf_kvcache.quant.profile import BitProfile, choose_bits, summed_sensitivity
from hf_kvcache.registry import build_cache

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny caches where most of a 48-token text is quantized (as tests/caches/test_quantized.py).
SETTINGS = {"group_size": 8, "residual_length": 8, "sink_tokens": 2}


def random_table(rng: random.Random, layers: int, choices: int) -> list[list[float]]:
    return [[rng.uniform(-0.1, 1.0) for _ in range(choices)] for _ in range(layers)]


def brute_force(keys, values, choices, average_bits) -> float:
    """The least summed sensitivity over every assignment of (key, value) widths within the budget."""
    layers = len(keys)
    per_layer = list(itertools.product(range(len(choices)), repeat=2))
    best = float("inf")
    for assignment in itertools.product(per_layer, repeat=layers):
        bits = sum(choices[k] + choices[v] for k, v in assignment)
        if bits <= 2 * layers * average_bits + 1e-9:
            best = min(best, sum(keys[layer][k] + values[layer][v] for layer, (k, v) in enumerate(assignment)))
    return best


# --- the knapsack ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_choose_bits_is_the_brute_force_optimum_within_the_budget(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 3)
    choices = rng.choice([(2, 3, 4), (2, 4, 8), (3, 8)])
    average_bits = rng.choice([min(choices), max(choices), round(rng.uniform(min(choices), max(choices)), 2)])
    keys, values = random_table(rng, layers, len(choices)), random_table(rng, layers, len(choices))
    key_bits, value_bits = choose_bits(keys, values, choices, average_bits)
    assert len(key_bits) == len(value_bits) == layers
    assert (sum(key_bits) + sum(value_bits)) / (2 * layers) <= average_bits + 1e-9
    found = summed_sensitivity((key_bits, value_bits), keys, values, choices)
    assert found == pytest.approx(brute_force(keys, values, choices, average_bits), abs=1e-12)


def test_choose_bits_at_the_extremes_of_the_budget():
    keys = [[3.0, 2.0, 1.0]] * 4
    values = [[1.0, 0.5, 0.0]] * 4
    assert choose_bits(keys, values, (2, 3, 4), 2) == ((2,) * 4, (2,) * 4)
    assert choose_bits(keys, values, (2, 3, 4), 4) == ((4,) * 4, (4,) * 4)
    # 2.5 bits on average over 4 layers: 4 spare bits, all spent on the keys (each bit saves 1.0 there, 0.5 on values)
    key_bits, value_bits = choose_bits(keys, values, (2, 3, 4), 2.5)
    assert sum(key_bits) == 12 and value_bits == (2,) * 4


def test_choose_bits_prefers_fewer_bits_among_equal_losses():
    flat = [[0.0, 0.0, 0.0]] * 3
    assert choose_bits(flat, flat, (2, 3, 4), 3.5) == ((2,) * 3, (2,) * 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"average_bits": 1.5}, r"average_bits=1\.5 must be between 2 and 4"),
        ({"average_bits": 4.5}, r"average_bits=4\.5 must be between 2 and 4"),
        ({"average_bits": "3"}, r"average_bits='3'"),
        ({"choices": (2, 5)}, r"choices\[1\]=5 is not supported; accepted values: 2, 3, 4, 8"),
        ({"choices": (2, 2)}, r"lists a width twice"),
        ({"choices": ()}, r"choices=\(\) must be a non-empty"),
        ({"keys": [[0.0, 1.0]]}, r"key_sensitivity\[0\]=\[0\.0, 1\.0\] must hold one number per width"),
        ({"values": [[0.0, 1.0, float("nan")]]}, r"value_sensitivity\[0\]\[2\]=nan must be a finite number"),
    ],
)
def test_choose_bits_refuses_bad_inputs_naming_them(kwargs, message):
    arguments = {"keys": [[0.0, 1.0, 2.0]], "values": [[0.0, 1.0, 2.0]], "choices": (2, 3, 4), "average_bits": 3}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        choose_bits(arguments["keys"], arguments["values"], arguments["choices"], arguments["average_bits"])


# --- the profile and its file ---------------------------------------------------------------------
def measured_profile() -> BitProfile:
    rng = random.Random(0)
    keys, values = random_table(rng, 3, 3), random_table(rng, 3, 3)
    key_bits, value_bits = choose_bits(keys, values, (2, 3, 4), 2.5)
    return BitProfile(
        key_bits,
        value_bits,
        model="tiny",
        choices=(2, 3, 4),
        key_sensitivity=keys,
        value_sensitivity=values,
        cache_settings={**SETTINGS, "rotate": True},
        budget_bits=2.5,
        source="a text",
        tokens=48,
        chunk=8,
        reference_nll=5.5,
        seconds=1.25,
    )


def test_profile_round_trips_through_a_human_readable_file(tmp_path):
    profile = measured_profile()
    path = profile.save(tmp_path / "sub" / "profile.json")
    assert BitProfile.load(path) == profile
    text = path.read_text(encoding="utf-8")
    assert json.loads(text)["average_bits"] == profile.average_bits <= 2.5
    assert sum(line.lstrip().startswith('{"layer": ') for line in text.splitlines()) == 3  # one line per layer
    assert '"choices": [2, 3, 4]' in text


def test_average_bits_and_uniform_profiles():
    assert BitProfile((2, 4), (3, 3)).average_bits == 3.0
    uniform = BitProfile.uniform(3, bits=2, key_bits=4)
    assert uniform.key_bits == (4, 4, 4) and uniform.value_bits == (2, 2, 2) and uniform.average_bits == 3
    assert uniform.estimated_loss is None


def test_with_budget_chooses_again_from_the_measured_tables():
    profile = measured_profile()
    richer = profile.with_budget(3.5)
    assert (richer.key_bits, richer.value_bits) == choose_bits(
        profile.key_sensitivity, profile.value_sensitivity, (2, 3, 4), 3.5
    )
    assert richer.budget_bits == 3.5 and richer.key_sensitivity == profile.key_sensitivity
    narrow = profile.with_budget(3, choices=(2, 4))
    assert set(narrow.key_bits + narrow.value_bits) <= {2, 4}
    with pytest.raises(ValueError, match=r"width\(s\) \[8\] were not measured"):
        profile.with_budget(3, choices=(2, 8))
    with pytest.raises(ValueError, match="no measured sensitivities"):
        BitProfile.uniform(2, 4).with_budget(3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_bits": (2, 5)}, r"key_bits\[1\]=5 is not supported; accepted values: 2, 3, 4, 8"),
        ({"value_bits": (4.0, 4)}, r"value_bits\[0\]=4\.0 is not supported"),
        ({"value_bits": (4,)}, r"key_bits has 2 layers but value_bits has 1"),
        ({"key_bits": ()}, r"key_bits=\(\) must be a non-empty sequence"),
        ({"choices": (2, 3)}, r"key_sensitivity\[0\]=.* must hold one number per width of choices \(2\)"),
        ({"key_sensitivity": [[0.0, 0.0, 0.0]]}, r"key_sensitivity must hold one row per layer \(2 rows\)"),
        ({"choices": (), "value_sensitivity": None}, r"key_sensitivity needs the `choices`"),
        ({"metric": "ppl"}, r"metric='ppl' is not supported; accepted values: kl, nll"),
    ],
)
def test_profile_refuses_bad_fields_naming_them(kwargs, message):
    table = [[0.0, 0.0, 0.0]] * 2
    arguments = {"key_bits": (2, 4), "value_bits": (2, 4), "choices": (2, 3, 4)}
    arguments |= {"key_sensitivity": table, "value_sensitivity": table, **kwargs}
    with pytest.raises(ValueError, match=message):
        BitProfile(**arguments)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"bad\.json: not JSON"),
        ('{"format": "something else"}', r"bad\.json: not a bit profile"),
        ('{"format": "hf_kvcache bit profile", "version": 1}', r"bad\.json: missing field 'layers'"),
        (
            '{"format": "hf_kvcache bit profile", "version": 1, "layers": [{"layer": 0, "key_bits": 5, "value_bits": 2}]}',
            r"bad\.json: key_bits\[0\]=5 is not supported",
        ),
    ],
)
def test_load_refuses_a_malformed_file_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        BitProfile.load(path)


# --- QuantizedCache(profile=...) ------------------------------------------------------------------
def test_cache_holds_each_layer_at_its_profile_widths():
    model = make_tiny_model("llama", layers=3)
    profile = BitProfile(key_bits=(2, 4, 3), value_bits=(3, 2, 8))
    cache = QuantizedCache(model.config, profile=profile, compile_attention=False, **SETTINGS)
    chunked_logits(model, random_ids(model, 1, 48), cache, chunk=8)
    for layer, key_bits, value_bits in zip(cache.layers, profile.key_bits, profile.value_bits):
        assert (layer.storage.key_bits, layer.storage.bits) == (key_bits, value_bits)
        assert (layer.body.key_bits, layer.body.value_bits) == (key_bits, value_bits)
        assert layer.body.quantized_length >= 24


def test_a_uniform_profile_equals_the_uniform_cache_in_logits(tmp_path):
    model = make_tiny_model("llama", layers=3)
    ids = random_ids(model, 2, 48)
    uniform = chunked_logits(model, ids, QuantizedCache(model.config, bits=2, key_bits=3, **SETTINGS), chunk=8)
    path = BitProfile.uniform(3, bits=2, key_bits=3).save(tmp_path / "uniform.json")
    for profile in (BitProfile.uniform(3, bits=2, key_bits=3), str(path), path):
        logits = chunked_logits(model, ids, QuantizedCache(model.config, profile=profile, **SETTINGS), chunk=8)
        assert torch.equal(logits, uniform)
    assert (uniform - dynamic_logits(model, ids, chunk=8)).abs().max() > 0  # really quantized


def test_registry_spec_takes_a_profile_path(tmp_path):
    model = make_tiny_model("llama", layers=2)
    path = BitProfile((4, 2), (3, 8)).save(tmp_path / "p.json")
    cache = build_cache(f"quantized:profile={path},group_size=8", model.config)
    assert [(layer.storage.key_bits, layer.storage.bits) for layer in cache.layers] == [(4, 3), (2, 8)]


def test_cache_refuses_a_profile_for_another_layer_count_naming_both():
    model = make_tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match=r"widths for 30 layers .* but the config has 2 layers"):
        QuantizedCache(model.config, profile=BitProfile.uniform(30, 2))


def test_cache_refuses_key_bits_with_a_profile_and_bad_profile_values(tmp_path):
    config = make_tiny_model("llama", layers=2).config
    with pytest.raises(ValueError, match=r"key_bits=4 and profile"):
        QuantizedCache(config, key_bits=4, profile=BitProfile.uniform(2, 2))
    with pytest.raises(ValueError, match=r"profile=3 must be a BitProfile, the path of its JSON file, or None"):
        QuantizedCache(config, profile=3)
    with pytest.raises(FileNotFoundError, match=r"bit profile .*missing\.json: cannot read it"):
        QuantizedCache(config, profile=str(tmp_path / "missing.json"))


def test_cache_warns_when_its_settings_differ_from_the_calibration():
    config = make_tiny_model("llama", layers=2).config
    profile = BitProfile(
        (2, 2), (2, 2), cache_settings={"residual_length": 8, "group_size": 8, "rotate": True, "later_setting": 1}
    )
    with pytest.warns(UserWarning, match=r"calibrated with residual_length=8 \(cache: 128\); its widths are used"):
        QuantizedCache(config, profile=profile, group_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizedCache(config, profile=profile, group_size=8, residual_length=8)


def test_cache_compares_every_calibration_setting():
    """A setting `calibrate_bit_profile` records but `QuantizedCache` does not compare would go unnoticed."""
    config = make_tiny_model("llama", layers=2).config
    for name in calibration_settings():
        profile = BitProfile((2, 2), (2, 2), cache_settings={name: "another value"})
        with pytest.warns(UserWarning, match=rf"calibrated with {name}='another value'"):
            QuantizedCache(config, profile=profile)


def test_cache_refuses_profile_widths_a_layer_cannot_pack():
    config = tiny_config("llama", layers=2)
    config.hidden_size, config.head_dim = 48, 12  # 12 channels: not a whole number of 3-bit words
    QuantizedCache(config, bits=4, group_size=4)
    with pytest.raises(ValueError, match=r"bits=3: layer 1 \(full_attention\) has 12 key channels"):
        QuantizedCache(config, profile=BitProfile((4, 3), (4, 4)), group_size=4)


# --- the calibration ------------------------------------------------------------------------------
def test_one_layer_cache_quantizes_only_that_layers_keys_or_values():
    model = make_tiny_model("llama", layers=2)
    ids = random_ids(model, 1, 48)
    exact, quantized = DynamicCache(config=model.config), QuantizedCache(model.config, bits=2, **SETTINGS)
    chunked_logits(model, ids, exact, chunk=8)
    chunked_logits(model, ids, quantized, chunk=8)
    sinks = SETTINGS["sink_tokens"]  # held apart, in full precision: compare the body's tokens
    exact_keys, exact_values = exact.layers[0].keys[:, :, sinks:], exact.layers[0].values[:, :, sinks:]
    quantized_keys, quantized_values = quantized.layers[0].body.read()  # layer 0: the same inputs everywhere
    assert not torch.equal(quantized_keys, exact_keys) and not torch.equal(quantized_values, exact_values)
    for half in ("keys", "values"):
        cache = OneLayerQuantizedCache(model.config, 0, half, 2, **SETTINGS)
        chunked_logits(model, ids, cache, chunk=8)
        keys, values = cache.layers[0].body.read()
        if half == "keys":
            assert torch.equal(keys, quantized_keys) and torch.equal(values, exact_values)
        else:
            assert torch.equal(keys, exact_keys) and torch.equal(values, quantized_values)
        assert cache.layers[1].storage.bits is None and isinstance(cache.layers[1].body, FullPrecisionStore)
    cache = OneLayerQuantizedCache(model.config, 1, "keys", 2, **SETTINGS)
    chunked_logits(model, ids, cache, chunk=8)
    assert torch.equal(cache.layers[0].body.read()[0], exact_keys)  # the layers before it: untouched


def test_calibration_measures_every_layer_and_width_and_keeps_the_budget():
    model = make_tiny_model("llama", layers=3)
    ids = random_ids(model, 1, 48)
    passes = []
    profile = calibrate_bit_profile(model, ids, 2.5, chunk=8, progress=passes.append, source="random", **SETTINGS)
    assert len(passes) == calibration_passes(model.config, (2, 3, 4)) == 3 * 2 * 3
    assert profile.num_layers == 3 and profile.choices == (2, 3, 4) and profile.average_bits <= 2.5
    assert (profile.key_bits, profile.value_bits) == choose_bits(
        profile.key_sensitivity, profile.value_sensitivity, (2, 3, 4), 2.5
    )
    assert profile.cache_settings["residual_length"] == 8 and profile.cache_settings["key_group_size"] is None
    assert set(profile.cache_settings) == set(inspect.signature(QuantizedCache).parameters) - set(NOT_SETTINGS)
    assert profile.tokens == 48 and profile.chunk == 8 and profile.source == "random" and profile.seconds > 0
    assert profile.metric == "kl"
    for table in (profile.key_sensitivity, profile.value_sensitivity):  # KL divergences (float32 logits)
        assert all(value >= -1e-6 for row in table for value in row)
    # This random model's attention is nearly uniform: its keys barely matter (KL ~1e-8), its values do.
    assert all(row[0] > row[1] > row[2] > 0 for row in profile.value_sensitivity)
    reference = dynamic_logits(model, ids, chunk=8)
    nll = torch.nn.functional.cross_entropy(reference[0, :-1], ids[0, 1:]).item()
    assert profile.reference_nll == pytest.approx(nll, abs=1e-5)
    QuantizedCache(model.config, profile=profile, **SETTINGS)  # usable at once, without a warning


def test_calibration_by_nll_measures_the_nll_increase():
    model = make_tiny_model("llama", layers=2)
    ids = random_ids(model, 1, 48)
    profile = calibrate_bit_profile(model, ids, 3, choices=(2, 8), chunk=8, metric="nll", **SETTINGS)
    assert profile.metric == "nll"
    cache = OneLayerQuantizedCache(model.config, 1, "values", 2, **SETTINGS)
    logits = chunked_logits(model, ids, cache, chunk=8)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert profile.value_sensitivity[1][0] == pytest.approx(nll - profile.reference_nll, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"average_bits": 8}, r"average_bits=8 must be between 2 and 4"),
        ({"metric": "mse"}, r"metric='mse' is not supported; accepted values: kl, nll"),
        ({"choices": (1, 2)}, r"choices\[0\]=1 is not supported"),
        ({"chunk": 0}, r"chunk=0 must be an integer >= 1"),
        ({"group_size": 7}, r"group_size=7 must divide"),
        ({"bits": 2}, r"'bits' is not a QuantizedCache setting"),
        ({"window": 2}, r"'window' is not a QuantizedCache setting"),
        (  # a text too short to quantize anything would measure nothing and choose the narrowest widths
            {},
            r"the calibration text has 16 tokens, but with sink_tokens=4, residual_length=128 and key blocks of "
            r"\d+ tokens nothing is quantized before token \d+: calibrate on more than",
        ),
    ],
)
def test_calibration_refuses_bad_inputs_before_any_pass(kwargs, message):
    model = make_tiny_model("llama", layers=2)
    passes = []
    arguments = {"average_bits": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        calibrate_bit_profile(model, random_ids(model, 1, 16), progress=passes.append, **arguments)
    assert passes == []
