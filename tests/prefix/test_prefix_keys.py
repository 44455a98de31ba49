"""Chain keys, model fingerprints and the block codec (checksum, identity and shape checks)."""

import pytest
import torch
from conftest import make_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from hf_kvcache import BitProfile, QuantizedCache
from hf_kvcache.prefix.codec import CorruptBlock, decode_block, encode_block
from hf_kvcache.prefix.keys import block_keys, cache_signature, model_fingerprint


def test_chain_keys_cover_every_earlier_token():
    tokens = list(range(100, 140))
    keys = block_keys("fp", tokens, 8)
    assert len(keys) == 5 and len(set(keys)) == 5
    assert block_keys("fp", tokens[:39], 8) == keys[:4]  # a partial block has no key
    assert block_keys("fp", tokens[:16] + [7] * 24, 8)[:2] == keys[:2]  # same prefix, same keys
    changed = [*tokens[:3], 999, *tokens[4:]]
    assert not set(block_keys("fp", changed, 8)) & set(keys)  # a change in block 0 changes every key
    assert not set(block_keys("other", tokens, 8)) & set(keys)
    assert not set(block_keys("fp", tokens, 4)) & set(keys)


def test_cache_signature_tells_quantized_settings_and_bit_profiles_apart():
    """KV computed after a restore depends on every setting of the cache, per-layer widths included."""
    config = tiny_config("llama")
    layers = config.num_hidden_layers
    caches = [
        QuantizedCache(config, bits=2),
        QuantizedCache(config, bits=2, key_outliers=1),
        QuantizedCache(config, bits=2, codebook="normal"),
        QuantizedCache(config, profile=BitProfile.uniform(layers, 2)),
        QuantizedCache(config, profile=BitProfile((3,) + (2,) * (layers - 1), (2,) * layers)),
    ]
    signatures = [cache_signature(cache) for cache in caches]
    assert len(set(signatures)) == len(caches)
    assert cache_signature(QuantizedCache(config, bits=2, key_outliers=1)) == signatures[1]


def test_fingerprint_tells_models_apart():
    model = make_tiny_model("llama")
    assert model_fingerprint(model) == model_fingerprint(make_tiny_model("llama"))
    assert model_fingerprint(model) != model_fingerprint(make_tiny_model("llama", seed=1))
    assert model_fingerprint(model) != model_fingerprint(make_tiny_model("qwen2"))
    deeper = tiny_config("llama")
    deeper.num_hidden_layers = 3
    assert model_fingerprint(model) != model_fingerprint(AutoModelForCausalLM.from_config(deeper))
    fingerprint = model_fingerprint(model)
    with torch.no_grad():  # a fine-tune moves every weight a little; the last parameter is sampled
        list(model.parameters())[-1].add_(1e-3)
    assert model_fingerprint(model) != fingerprint
    assert model_fingerprint(model.to(torch.bfloat16)) != model_fingerprint(model.to(torch.float32))


def test_fingerprint_covers_every_weight_adapters_and_attention():
    """Any weight, not a sample: one element of a middle v_proj changed in place, a checkpoint loaded into the
    same object, an adapter's new parameters, another attention implementation: each a new fingerprint."""
    model = make_tiny_model("llama", layers=3)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[5, 7] += 1e-3
    edited = model_fingerprint(model)
    assert edited != before
    model.load_state_dict(make_tiny_model("llama", seed=3, layers=3).state_dict())
    assert model_fingerprint(model) not in (before, edited)
    reloaded = model_fingerprint(model)
    adapter = torch.nn.Linear(16, 4, bias=False)
    model.model.layers[2].self_attn.k_proj.register_module("lora_A", adapter)
    assert model_fingerprint(model) != reloaded
    eager = make_tiny_model("llama", "eager", layers=3)
    assert model_fingerprint(eager) != model_fingerprint(make_tiny_model("llama", "sdpa", layers=3))


def test_fingerprint_hashes_each_tensor_once_until_it_changes(monkeypatch):
    from hf_kvcache.prefix import keys

    model = make_tiny_model("llama")
    model_fingerprint(model)
    hashed = []
    monkeypatch.setattr(keys, "_bytes_of", lambda tensor: hashed.append(tensor) or memoryview(b"x"))
    model_fingerprint(model)
    assert hashed == []  # nothing changed: every tensor's digest is reused
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model_fingerprint(model)
    assert len(hashed) == 1  # only the changed tensor is read in full again


def random_block(dtype=torch.float32, layers=3, tokens=8):
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(2, tokens, 16, generator=generator).to(dtype),
            torch.randn(2, tokens, 16, generator=generator).to(dtype),
        )
        for _ in range(layers)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_round_trip_is_exact(dtype):
    block = random_block(dtype)
    decoded = decode_block(encode_block("ab" * 32, "fp", block), "ab" * 32, "fp", 8)
    assert len(decoded) == len(block)
    for (k, v), (k2, v2) in zip(block, decoded):
        assert k2.dtype == dtype and torch.equal(k, k2) and torch.equal(v, v2)


def test_codec_refuses_foreign_stale_and_damaged_blocks():
    data = encode_block("ab" * 32, "fp", random_block())
    for key, fingerprint, tokens, reason in [
        ("cd" * 32, "fp", 8, "key"),
        ("ab" * 32, "other", 8, "fingerprint"),
        ("ab" * 32, "fp", 4, "tokens"),
    ]:
        with pytest.raises(CorruptBlock, match=reason):
            decode_block(data, key, fingerprint, tokens)
    flipped = bytearray(data)
    flipped[-5] ^= 0x01  # one bit of the last tensor's data
    with pytest.raises(CorruptBlock, match="checksum"):
        decode_block(bytes(flipped), "ab" * 32, "fp", 8)
    for length in (0, 5, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptBlock):
            decode_block(data[:length], "ab" * 32, "fp", 8)
    with pytest.raises(CorruptBlock):
        decode_block(b"\x10" + b"\x00" * 7 + b"not json at all!", "ab" * 32, "fp", 8)
