"""Compressed blocks: KIVI codes within half a quantization step, their bytes, and a format never read as another."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from transformers import DynamicCache

from hf_kvcache import QuantizedCache
from hf_kvcache.caches.base import largest_group
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.prefix import MemoryBackend, PrefixCache, generate_with_prefix_cache
from hf_kvcache.prefix.codec import BlockFormat, CorruptBlock, decode_block, encode_block
from hf_kvcache.quant import rotation_matrix

KEY = "ab" * 32
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def kv(heads=3, tokens=128, channels=64, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, tokens, channels, generator=generator) * torch.linspace(0.1, 8, channels)  # outliers
    return keys.to(dtype), torch.randn(heads, tokens, channels, generator=generator).to(dtype)


def half_steps(original: torch.Tensor, restored: torch.Tensor, bits: int, token_block: int, channel_group: int):
    """Per element: |error| / (half the group's quantization step), in the rotated basis where codes live.
    Keys are grouped by (channel, block of tokens) when `token_block`, values by (token, group of channels)."""
    rotation = rotation_matrix(original.shape[-1], torch.float64, "cpu")
    x, y = original.double() @ rotation, restored.double() @ rotation
    heads, tokens, channels = x.shape
    if token_block:
        groups = x.reshape(heads, tokens // token_block, token_block, channels)
        spread = groups.amax(2, keepdim=True) - groups.amin(2, keepdim=True)
        spread = spread.expand_as(groups).reshape(x.shape)
    else:
        groups = x.reshape(heads, tokens, channels // channel_group, channel_group)
        spread = groups.amax(3, keepdim=True) - groups.amin(3, keepdim=True)
        spread = spread.expand_as(groups).reshape(x.shape)
    step = spread / ((1 << bits) - 1)
    return (x - y).abs() / (step / 2).clamp_min(1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("channels", [64, 96, 80])
def test_codes_read_back_within_half_a_step(bits, channels):
    """Keys per channel over blocks of 64 tokens, values per token over channel groups, after the rotation."""
    keys, values = kv(channels=channels)
    block_format = BlockFormat(bits, group_size=64)
    data = encode_block(KEY, "f", [(keys, values)] * 2, block_format)
    ((restored_keys, restored_values), _) = decode_block(data, KEY, "f", 128, block_format)
    assert half_steps(keys, restored_keys, bits, token_block=64, channel_group=0).max() <= 1.001
    group = largest_group(channels, 64)
    assert half_steps(values, restored_values, bits, token_block=0, channel_group=group).max() <= 1.001
    assert (restored_keys - keys).abs().max() > 0  # really quantized


@pytest.mark.parametrize(("tokens", "token_block"), [(100, 50), (8, 8), (96, 48)])
def test_key_blocks_divide_the_block(tokens, token_block):
    """Key blocks of the largest divisor of the block's tokens up to `group_size`: every token is quantized."""
    keys, values = kv(tokens=tokens)
    data = encode_block(KEY, "f", [(keys, values)], BlockFormat(4, group_size=64))
    ((restored_keys, _),) = decode_block(data, KEY, "f", tokens, BlockFormat(4, group_size=64))
    assert half_steps(keys, restored_keys, 4, token_block=token_block, channel_group=0).max() <= 1.001
    assert ((restored_keys - keys).abs() > 0).float().mean() > 0.9


@pytest.mark.parametrize(("bits", "most"), [(8, 0.55), (4, 0.30), (2, 0.17)])
def test_bytes_against_fp16_blocks(bits, most):
    """Measured on encoded blocks of 256 tokens, 30 layers, 3 KV heads of 64 channels (the packaged model's shape)."""
    layers = [kv(tokens=256, dtype=torch.float16, seed=seed) for seed in range(30)]
    full = len(encode_block(KEY, "f", layers))
    compressed = len(encode_block(KEY, "f", layers, BlockFormat(bits)))
    assert compressed <= most * full, compressed / full


def test_a_block_is_only_read_in_its_own_format():
    keys, values = kv()
    data = encode_block(KEY, "f", [(keys, values)], BlockFormat(4))
    for other in (BlockFormat(), BlockFormat(8), BlockFormat(4, group_size=32)):
        with pytest.raises(CorruptBlock, match="format="):
            decode_block(data, KEY, "f", 128, other)
    model = make_tiny_model("llama")
    stores = [PrefixCache(MemoryBackend(), block_size=8, bits=bits) for bits in (None, 4)]
    assert len({store.fingerprint(model, None) for store in stores}) == 2  # so their keys differ too


def test_format_is_checked():
    with pytest.raises(ValueError, match=r"bits=5 .*2, 3, 4, 8"):
        PrefixCache(MemoryBackend(), bits=5)
    with pytest.raises(ValueError, match=r"group_size=0 must be an integer >= 1"):
        PrefixCache(MemoryBackend(), bits=4, group_size=0)


@torch.no_grad()
def test_restored_logits_approach_the_exact_ones_with_more_bits():
    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 70)
    exact = model(ids).logits[:, 64:]
    errors = {}
    for bits in (None, 8, 4, 2):
        store = PrefixCache(MemoryBackend(), block_size=32, bits=bits)
        generate_with_prefix_cache(model, ids, store, **GREEDY)
        cache = DynamicCache(config=model.config)
        assert store.restore(model, ids, cache) == 64
        errors[bits] = (model(ids[:, 64:], **{CACHE_KWARG: cache}).logits - exact).abs().max().item()
    assert errors[None] < 1e-5 < errors[8] < errors[4] < errors[2], errors


def test_compressed_blocks_fill_a_quantized_cache():
    model = make_tiny_model("llama")
    store = PrefixCache(MemoryBackend(), block_size=8, bits=4)
    ids = random_ids(model, 1, 45)
    cold = generate_with_prefix_cache(model, ids, store, cache=QuantizedCache(model.config, bits=4), **GREEDY)
    warm = generate_with_prefix_cache(model, ids, store, cache=QuantizedCache(model.config, bits=4), **GREEDY)
    assert cold.shape == warm.shape and store.stats()["hits"] == 5 and store.stats()["errors"] == 0
    other_cache = generate_with_prefix_cache(model, ids, store, cache=QuantizedCache(model.config, bits=2), **GREEDY)
    assert other_cache.shape == cold.shape and store.stats()["hits"] == 5  # another configuration: a miss


def test_layers_of_different_shapes_decode_like_one_layer_at_a_time():
    """Same-shape layers are dequantized as one batch: each must come back as it does alone."""
    layers = [
        kv(heads=heads, channels=channels, seed=seed) for seed, (heads, channels) in enumerate([(3, 64), (2, 96)] * 3)
    ]
    block_format = BlockFormat(4)
    together = decode_block(encode_block(KEY, "f", layers, block_format), KEY, "f", 128, block_format)
    for layer, restored in zip(layers, together):
        (alone,) = decode_block(encode_block(KEY, "f", [layer], block_format), KEY, "f", 128, block_format)
        assert all(torch.equal(a, b) for a, b in zip(restored, alone)) and restored[0].shape == layer[0].shape
