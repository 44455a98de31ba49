"""The prefix store's transform codec: bit allocation against an exhaustive search, keys taken out of RoPE against
the model's own pre-RoPE keys, round trips through every backend and tier, calibration files keyed to the model,
and refusals of anything read back that the codec did not write."""

import itertools
import json
import os

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from hf_kvcache.calibration.transform_codec import calibrate_transform_codec
from hf_kvcache.cli import main
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.models import load_model
from hf_kvcache.prefix import (
    CodecCalibration,
    DiskBackend,
    MemoryBackend,
    PrefixCache,
    RedisBackend,
    TieredBackend,
    TransformCodec,
)
from hf_kvcache.prefix.codec import BlockFormat
from hf_kvcache.prefix.transform_codec import allocate_bits, layer_ropes, rotate_to

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 32


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def calibration(llama):
    return calibrate_transform_codec(llama, random_ids(llama, 1, 256, seed=1), chunk=64)


def kv_of(model, ids):
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def round_trip(model, codec, ids, backend=None):
    """(original KV, restored KV) of `ids` saved and restored through a store with `codec`."""
    store = PrefixCache(backend or MemoryBackend(max_bytes=None), block_size=BLOCK, codec=codec)
    layers = kv_of(model, ids)
    assert store.save(model, ids, layers) == ids.shape[1] // BLOCK
    restored = DynamicCache(config=model.config)
    assert store.restore(model, ids, restored) == ids.shape[1] // BLOCK * BLOCK
    return layers, [(layer.keys, layer.values) for layer in restored.layers], store


def exhaustive_allocation(variances: list[float], total: int, max_bits: int) -> float:
    """The least sum(variance x 4^-bits) over every integer allocation of at most `total` bits."""
    best = float("inf")
    for bits in itertools.product(range(max_bits + 1), repeat=len(variances)):
        if sum(bits) <= total:
            best = min(best, sum(v * 4.0**-b for v, b in zip(variances, bits)))
    return best


@pytest.mark.parametrize("variances", [[9.0, 1.0, 0.25, 0.01], [1.0, 1.0, 1.0, 0.5], [100.0, 0.0, 3.0, 2.0]])
@pytest.mark.parametrize("average_bits", [0.25, 1.0, 1.75, 3.0])
def test_bit_allocation_is_the_exhaustive_optimum(variances, average_bits):
    bits = allocate_bits(torch.tensor(variances), average_bits, max_bits=4)
    total = int(average_bits * len(variances))
    assert int(bits.sum()) == total and bits.min() >= 0 and bits.max() <= 4
    error = sum(v * 4.0 ** -int(b) for v, b in zip(variances, bits))
    assert error == pytest.approx(exhaustive_allocation(variances, total, 4), rel=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3-local-rope", "llama-rope-scaling"])
def test_keys_out_of_rope_equal_the_models_own_keys_before_rope(arch):
    """The codec decorrelates keys before RoPE: rotating the cached keys back by their positions gives what the
    layer's key projection (and key norm) produced, read with a hook."""
    model = make_tiny_model(arch)
    ids = random_ids(model, 1, 40)
    captured = {}
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        module = getattr(attention, "k_norm", None) or attention.k_proj
        module.register_forward_hook(lambda _m, _i, output, index=index: captured.__setitem__(index, output))
    layers = kv_of(model, ids)
    for index, (rope, (keys, _)) in enumerate(zip(layer_ropes(model), layers)):
        heads, dim = keys.shape[1], keys.shape[-1]
        output = captured[index]  # [1, tokens, heads x dim], or after a key norm [1, tokens or heads, ...]
        expected = output if output.shape[1] == heads else output.reshape(1, 40, heads, dim).transpose(1, 2)
        taken_out = rotate_to(rope, keys, -torch.arange(40), "keys")
        torch.testing.assert_close(taken_out, expected.float(), atol=1e-5, rtol=1e-5)


def test_principal_components_are_orthonormal_and_carry_the_variances(calibration):
    features = torch.randn(500, 6) @ torch.randn(6, 6) + torch.arange(6.0)
    fitted = type(calibration.keys[0]).fit(features)
    torch.testing.assert_close(fitted.basis.T @ fitted.basis, torch.eye(6), atol=1e-5, rtol=0)
    projected = (features - fitted.mean) @ fitted.basis
    torch.testing.assert_close(projected.var(dim=0), fitted.variances, rtol=1e-4, atol=1e-5)
    assert (fitted.variances[:-1] >= fitted.variances[1:]).all()
    torch.testing.assert_close(projected @ fitted.basis.T + fitted.mean, features, atol=1e-4, rtol=0)


def test_restores_approach_the_kv_as_bits_grow_and_raw_tokens_are_exact(llama, calibration):
    ids = random_ids(llama, 1, 3 * BLOCK + 5, seed=2)
    errors = []
    for average_bits in (1, 2, 4, 6):
        codec = TransformCodec(calibration, llama, average_bits=average_bits, raw_tokens=3)
        original, restored, _ = round_trip(llama, codec, ids)
        error = max(
            float((o[:, :, : 3 * BLOCK] - r).abs().max())
            for (ok, ov), (rk, rv) in zip(original, restored)
            for o, r in ((ok, rk), (ov, rv))
        )
        errors.append(error)
        for (ok, ov), (rk, rv) in zip(original, restored):  # the prompt's first 3 tokens: raw
            assert torch.equal(rk[:, :, :3], ok[:, :, :3]) and torch.equal(rv[:, :, :3], ov[:, :, :3])
    assert errors == sorted(errors, reverse=True) and errors[0] > 10 * errors[-1]
    scale = max(float(t.abs().max()) for pair in kv_of(llama, ids) for t in pair)
    assert errors[-1] < 0.02 * scale


def test_components_without_bits_restore_as_the_calibrated_mean(llama, calibration):
    """With no bit to spend, every coded token is the calibrated mean, put back into RoPE at its position."""
    codec = TransformCodec(calibration, llama, average_bits=0.001, raw_tokens=0)
    assert all(int(codec.bits(kind, layer).sum()) == 0 for kind in ("keys", "values") for layer in range(2))
    ids = random_ids(llama, 1, BLOCK, seed=3)
    _, restored, _ = round_trip(llama, codec, ids)
    for rope, decorrelation, (keys, _) in zip(layer_ropes(llama), calibration.keys, restored):
        heads, dim = keys.shape[1], keys.shape[-1]
        mean = decorrelation.mean.view(heads, 1, dim).expand(heads, BLOCK, dim)
        torch.testing.assert_close(keys[0], rotate_to(rope, mean, torch.arange(BLOCK), "keys"), atol=1e-5, rtol=0)
    for decorrelation, (_, values) in zip(calibration.values, restored):
        heads, dim = values.shape[1], values.shape[-1]
        torch.testing.assert_close(values[0], decorrelation.mean.view(heads, 1, dim).expand(heads, BLOCK, dim))


def test_a_short_block_is_stored_raw(llama, calibration):
    codec = TransformCodec(calibration, llama, average_bits=1, min_block_tokens=BLOCK + 1)
    ids = random_ids(llama, 1, BLOCK, seed=4)
    original, restored, _ = round_trip(llama, codec, ids)
    assert all(torch.equal(o, r) for pair in zip(original, restored) for o, r in zip(*pair))


@pytest.mark.parametrize("where", ["memory", "disk", "redis", "redis-cluster", "memory>disk"])
def test_codec_blocks_through_every_backend_and_tier_restore_what_the_codec_decodes(
    where, llama, calibration, tmp_path, request
):
    if where == "memory":
        backend = MemoryBackend(max_bytes=None)
    elif where == "disk":
        backend = DiskBackend(tmp_path / "store")
    elif where == "redis":
        backend = RedisBackend(request.getfixturevalue("redis_server").url, prefix="codec:")
    elif where == "redis-cluster":
        backend = RedisBackend(request.getfixturevalue("redis_cluster").url, prefix="codec:", cluster=True)
    else:
        backend = TieredBackend(MemoryBackend(max_bytes=None), DiskBackend(tmp_path / "tiered"))
    codec = TransformCodec(calibration, llama, average_bits=2)
    ids = random_ids(llama, 1, 2 * BLOCK, seed=5)
    _, through_memory, _ = round_trip(llama, codec, ids)
    _, through_backend, store = round_trip(llama, codec, ids, backend)
    assert all(torch.equal(a, b) for pair in zip(through_memory, through_backend) for a, b in zip(*pair))
    assert store.stats()["hits"] == 2
    fp16_bytes = sum(2 * t[:, :, :BLOCK].numel() for pair in kv_of(llama, ids) for t in pair)
    assert store.stats()["bytes_stored"] < 2 * fp16_bytes  # tiny heads: the safetensors header is most of it


def test_blocks_of_another_budget_or_format_are_never_restored(llama, calibration):
    backend = MemoryBackend(max_bytes=None)
    ids = random_ids(llama, 1, BLOCK, seed=6)
    two = PrefixCache(backend, block_size=BLOCK, codec=TransformCodec(calibration, llama, average_bits=2))
    assert two.save(llama, ids, kv_of(llama, ids)) == 1
    for other in (PrefixCache(backend, BLOCK, codec=TransformCodec(calibration, llama, average_bits=3)),
                  PrefixCache(backend, BLOCK, bits=4), PrefixCache(backend, BLOCK)):  # fmt: skip
        assert other.restore(llama, ids, DynamicCache(config=llama.config)) == 0
    assert two.restore(llama, ids, DynamicCache(config=llama.config)) == BLOCK


def test_another_models_calibration_is_refused(llama, calibration):
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="calibrated for another model"):
        TransformCodec(calibration, other)
    with pytest.raises(ValueError, match="calibrated for another model"):
        TransformCodec(calibration, make_tiny_model("llama").half())  # a change of dtype counts
    with pytest.raises(ValueError, match="layers of"):
        TransformCodec(calibration, make_tiny_model("phi3"))
    store = PrefixCache(MemoryBackend(max_bytes=None), BLOCK, codec=TransformCodec(calibration, llama))
    ids = random_ids(other, 1, BLOCK)
    with pytest.raises(ValueError, match="calibrated for another model"):
        store.save(other, ids, kv_of(other, ids))
    with pytest.raises(ValueError, match="calibrated for another model"):
        store.restore(other, ids, DynamicCache(config=other.config))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"average_bits": 0}, "average_bits=0 must be a number > 0"),
        ({"average_bits": 7}, "average_bits=7 must be at most 6"),
        ({"raw_tokens": -1}, "raw_tokens=-1 must be an integer >= 0"),
        ({"min_block_tokens": 0}, "min_block_tokens=0"),
        ({"level": 23}, "level=23 must be an integer between 1 and 22"),
    ],
)
def test_bad_settings_are_refused_naming_them(llama, calibration, settings, message):
    with pytest.raises(ValueError, match=message):
        TransformCodec(calibration, llama, **settings)


def test_a_format_is_bits_or_a_codec_not_both(llama, calibration):
    with pytest.raises(ValueError, match="bits=4 and codec"):
        BlockFormat(bits=4, codec=TransformCodec(calibration, llama))
    with pytest.raises(ValueError, match="codec: a CodecCalibration is not accepted; give a TransformCodec"):
        PrefixCache(MemoryBackend(), codec=calibration)
    with pytest.raises(ValueError, match="group_size=32 applies to `bits` blocks"):
        PrefixCache(MemoryBackend(), group_size=32, codec=TransformCodec(calibration, llama))


def test_arguments_of_the_wrong_kind_are_named_and_reprs_stay_short(llama, calibration):
    with pytest.raises(ValueError, match="calibration: a LlamaForCausalLM is not accepted"):
        TransformCodec(llama, calibration)
    with pytest.raises(ValueError, match="model: a NoneType is not accepted"):
        TransformCodec(calibration, None)
    shown = repr(TransformCodec(calibration, llama))
    assert len(shown) < 300 and "transform codec" in shown and "2 layers" in shown


def test_calibration_files_round_trip_and_damaged_ones_are_refused(calibration, tmp_path):
    path = calibration.save(tmp_path / "codec" / "calibration.safetensors")
    loaded = CodecCalibration.load(path)
    assert loaded.model_digest == calibration.model_digest and loaded.tokens == 256
    assert loaded.layer_features == calibration.layer_features
    for mine, theirs in zip(calibration.keys + calibration.values, loaded.keys + loaded.values):
        assert all(torch.equal(getattr(mine, name), getattr(theirs, name)) for name in ("mean", "basis", "variances"))

    tensors = load_file(path)
    with open(path, "rb") as file:
        metadata = json.loads(file.read(int.from_bytes(file.read(8), "little")))["__metadata__"]

    def damaged(name, tensors=tensors, metadata=metadata):
        save_file(tensors, tmp_path / name, metadata=metadata)
        return tmp_path / name

    not_orthonormal = {**tensors, "keys.0.basis": tensors["keys.0.basis"] * 2}
    with pytest.raises(ValueError, match="layer 0 keys: a basis that is not orthonormal"):
        CodecCalibration.load(damaged("scaled.safetensors", not_orthonormal))
    nan = {**tensors, "values.1.mean": tensors["values.1.mean"] * float("nan")}
    with pytest.raises(ValueError, match="layer 1 values: values that are not finite"):
        CodecCalibration.load(damaged("nan.safetensors", nan))
    missing = {name: t for name, t in tensors.items() if name != "values.1.variances"}
    with pytest.raises(ValueError, match="incomplete"):
        CodecCalibration.load(damaged("missing.safetensors", missing))
    with pytest.raises(ValueError, match=r"format 'hf_kvcache\.query_statistics'"):
        CodecCalibration.load(
            damaged("other.safetensors", metadata={**metadata, "format": "hf_kvcache.query_statistics"})
        )
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        CodecCalibration.load(tmp_path / "text.safetensors")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file"):
        CodecCalibration.load(tmp_path / "fifo")


def test_decoding_refuses_codes_the_codec_did_not_write(llama, calibration):
    import zstandard

    codec = TransformCodec(calibration, llama, average_bits=2, raw_tokens=0)
    keys, values = kv_of(llama, random_ids(llama, 1, BLOCK, seed=7))[0]
    state = codec.encode(0, keys, values, position=0)
    decoded = codec.decode(0, state, BLOCK, position=0)
    assert decoded[0].shape == keys[0].shape and decoded[1].shape == values[0].shape
    active = int((codec.bits("keys", 0) > 0).sum())
    bomb = torch.frombuffer(
        bytearray(zstandard.ZstdCompressor().compress(bytes(active * BLOCK * 1000))), dtype=torch.uint8
    )
    short = torch.frombuffer(bytearray(zstandard.ZstdCompressor().compress(bytes(3))), dtype=torch.uint8)
    for altered, message in (
        ({**state, "keys_codes": bomb}, "do not decompress|decompress to"),
        ({**state, "keys_codes": short}, "decompress to 3 bytes"),
        ({**state, "keys_codes": torch.zeros(5, dtype=torch.uint8)}, "do not decompress"),
        ({**state, "raw_keys": state["raw_keys"].half()}, "raw_keys is torch.float16"),
        ({k: v for k, v in state.items() if k != "values_codes"}, "expected"),
    ):
        with pytest.raises(ValueError, match=message):
            codec.decode(0, altered, BLOCK, position=0)
    with pytest.raises(ValueError, match="raw_keys"):  # the block's first tokens are raw at position 0 ...
        TransformCodec(calibration, llama, average_bits=2).decode(0, state, BLOCK, position=0)


def test_the_calibrate_command_writes_a_calibration_a_codec_takes(folder_and_text, tmp_path, capsys):
    folder, text = folder_and_text
    output = tmp_path / "codec.safetensors"
    argv = ["calibrate", "--transform-codec", "--model", str(folder), "--dataset", str(text), "--tokens", "96"]
    assert main([*argv, "--chunk-size", "32", "--output", str(output), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "keys variance kept @1 bits" in printed and f"CodecCalibration.load({str(output)!r})" in printed
    calibration = CodecCalibration.load(output)
    assert calibration.tokens == 96 and "text.txt" in calibration.source
    model, _ = load_model(str(folder))
    TransformCodec(calibration, model)  # keyed to this model's weights
    assert main([*argv, "--average-bits", "3", "--output", str(output)]) == 2
    assert "--transform-codec calibrates no bit profile: --average-bits cannot apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--query-statistics", "--output", str(output)])


def test_values_decode_to_the_components_rounded_to_their_calibrated_steps(llama, calibration):
    """Values (no RoPE) against the codec's arithmetic spelled out in float64: each kept component's coefficient
    rounded to a multiple of sqrt(2 pi e) x its calibrated deviation x 2^-bits, the dropped ones at the mean."""
    codec = TransformCodec(calibration, llama, average_bits=1.5, raw_tokens=0)
    keys, values = kv_of(llama, random_ids(llama, 1, BLOCK, seed=8))[1]
    _, decoded = codec.decode(1, codec.encode(1, keys, values, position=0), BLOCK, position=0)
    decorrelation, bits = calibration.values[1], codec.bits("values", 1)
    features = values[0].transpose(0, 1).reshape(BLOCK, -1).double()
    expected = decorrelation.mean.double().expand(BLOCK, -1).clone()
    for component in range(features.shape[1]):
        if bits[component]:
            direction = decorrelation.basis[:, component].double()
            step = (
                (2 * torch.pi * torch.e) ** 0.5
                * decorrelation.variances[component].double().sqrt()
                / 2 ** int(bits[component])
            )
            coefficient = (features - decorrelation.mean.double()) @ direction
            expected += torch.outer((coefficient / step).round().clamp(-127, 127) * step, direction)
    heads, dim = values.shape[1], values.shape[-1]
    torch.testing.assert_close(decoded, expected.view(BLOCK, heads, dim).transpose(0, 1).float(), atol=1e-4, rtol=0)
