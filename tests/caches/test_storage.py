"""TokenQuantizedStore: per-token codes that survive per-head gathers; residual kept in full precision.
QuantizedStore (KIVI) with key outliers kept apart: exact outliers through eviction and crop."""

import pytest
import torch

from hf_kvcache.caches.storage import FullPrecisionStore, QuantizedStore, TokenQuantizedStore
from hf_kvcache.quant import dequantize, hadamard_matrix, quantize

HEAD_DIM, GROUP = 16, 8


def tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, count, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


def round_trip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Each token quantized on its own (rotated) and read back: what a quantized token must read as."""
    rotation = hadamard_matrix(HEAD_DIM, x.dtype, x.device)
    return dequantize(quantize(x @ rotation, bits, reduce_dim=-1, group_size=GROUP)) @ rotation


def new_store(bits: int = 4, residual_length: int = 4) -> TokenQuantizedStore:
    return TokenQuantizedStore(tokens(0, 0), tokens(0, 0), bits, GROUP, residual_length, rotate=True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_tokens_leave_the_residual_quantized_once(bits):
    store = new_store(bits)
    keys, values = tokens(11, 1), tokens(11, 2)
    store.append(keys[:, :, :6], values[:, :, :6])
    store.append(keys[:, :, 6:], values[:, :, 6:])
    assert len(store) == 11 and store.quantized_length == 7 and store.residual_keys.shape[-2] == 4
    read_keys, read_values = store.read()
    assert torch.equal(read_keys[:, :, 7:], keys[:, :, 7:])  # the residual is exact
    assert torch.allclose(read_keys[:, :, :7], round_trip(keys[:, :, :7], bits), atol=1e-5)
    assert torch.allclose(read_values[:, :, :7], round_trip(values[:, :, :7], bits), atol=1e-5)
    assert 0 < (read_keys[:, :, :7] - keys[:, :, :7]).abs().max() < {2: 2.0, 4: 0.5, 8: 0.03}[bits]


def test_gather_keeps_different_tokens_per_head_and_stays_dense():
    store = new_store(residual_length=4)
    keys, values = tokens(10, 3), tokens(10, 4)
    store.append(keys, values)  # tokens 0-5 quantized, 6-9 residual
    indices = torch.tensor([[0, 2, 7, 8, 9], [1, 3, 4, 6, 9], [0, 1, 2, 3, 8]])  # 3, 2 and 1 residual tokens
    indices = torch.stack([indices, indices.flip(0)])  # batch rows differ too
    store.gather(indices)
    read_keys, read_values = store.read()
    expected_keys = torch.stack([keys[b, h, indices[b, h]] for b in range(2) for h in range(3)]).view_as(read_keys)
    expected_values = torch.stack([values[b, h, indices[b, h]] for b in range(2) for h in range(3)])
    # every head keeps at least one residual token, so the newest kept token stays in full precision;
    # the other kept residual tokens are quantized now, exactly as they would have been later
    assert store.residual_keys.shape[-2] == 1 and store.quantized_length == 4
    assert torch.equal(read_keys[:, :, -1], expected_keys[:, :, -1])
    assert torch.allclose(read_keys[:, :, :-1], round_trip(expected_keys[:, :, :-1], 4), atol=1e-5)
    assert torch.allclose(read_values.flatten(0, 1)[:, :-1], round_trip(expected_values[:, :-1], 4), atol=1e-5)


def test_gather_that_keeps_the_whole_residual_only_selects_codes():
    store = new_store(residual_length=4)
    keys, values = tokens(10, 11), tokens(10, 12)
    store.append(keys, values)  # tokens 0-5 quantized, 6-9 residual
    codes_before = store.key_codes.clone()
    indices = torch.tensor([[0, 3, 6, 7, 8, 9], [2, 5, 6, 7, 8, 9], [1, 4, 6, 7, 8, 9]]).expand(2, -1, -1)
    store.gather(indices)
    assert store.quantized_length == 2 and torch.equal(store.residual_keys, keys[:, :, 6:])
    assert torch.equal(
        store.key_codes, codes_before.gather(2, indices[..., :2, None].expand(-1, -1, -1, codes_before.shape[-1]))
    )
    _, read_values = store.read()
    expected = torch.stack([values[b, h, indices[b, h]] for b in range(2) for h in range(3)]).view_as(read_values)
    assert torch.allclose(read_values[:, :, :2], round_trip(expected[:, :, :2], 4), atol=1e-5)
    assert torch.equal(read_values[:, :, 2:], expected[:, :, 2:])


def test_gather_with_one_set_for_all_heads():
    store, reference = new_store(residual_length=2), FullPrecisionStore(tokens(0, 0), tokens(0, 0))
    keys, values = tokens(8, 5), tokens(8, 6)
    store.append(keys, values)
    reference.append(keys, values)
    shared = torch.tensor([[[1, 4, 6, 7]], [[0, 2, 3, 7]]])  # [batch, 1, kept]; residual: tokens 6 and 7
    store.gather(shared)
    reference.gather(shared)
    assert torch.equal(reference.keys, torch.stack([keys[b][:, shared[b, 0]] for b in range(2)]))
    # row 1 keeps one residual token, so only the newest kept token of every row stays in full precision
    assert store.residual_keys.shape[-2] == 1
    quantized = torch.arange(4)[:, None] < 3
    assert torch.allclose(store.read()[0], round_trip(reference.keys, 4).where(quantized, reference.keys), atol=1e-5)


def test_drop_oldest_and_bytes_held():
    store = new_store(bits=4, residual_length=3)
    store.append(tokens(9, 7), tokens(9, 8))
    store.drop_oldest(7)  # all 6 quantized tokens and one residual token
    assert store.quantized_length == 0 and store.residual_keys.shape[-2] == 2
    store.append(tokens(3, 9), tokens(3, 10))
    assert len(store) == 5 and store.quantized_length == 2
    names = TokenQuantizedStore.tensor_names
    assert store.nbytes() == sum(getattr(store, name).nbytes for name in names)
    # per token and head: 8 bytes of 4-bit codes and 2 groups x (scale + min) x 4 bytes, keys and values
    assert store.key_codes.nbytes + store.key_scale.nbytes + store.key_min.nbytes == 2 * 3 * 2 * (8 + 16)


def kivi_round_trip(keys: torch.Tensor, block: int, outliers: int) -> torch.Tensor:
    """Keys quantized per channel over whole blocks of `block` tokens (rotated) and read back."""
    rotation = hadamard_matrix(HEAD_DIM, keys.dtype, keys.device)
    return dequantize(quantize(keys @ rotation, 2, reduce_dim=-2, group_size=block, outliers=outliers)) @ rotation


def test_key_outliers_read_back_through_eviction_and_crop():
    keys, values = tokens(44, 1), tokens(44, 2)
    keys[:, :, 9] *= 30  # an extreme token in the second block
    store = QuantizedStore(tokens(0, 0), tokens(0, 0), 2, GROUP, residual_length=4, rotate=True, key_outliers=2)
    plain = QuantizedStore(tokens(0, 0), tokens(0, 0), 2, GROUP, residual_length=4, rotate=True)
    for part in (slice(0, 30), slice(30, 44)):
        store.append(keys[:, :, part], values[:, :, part])
        plain.append(keys[:, :, part], values[:, :, part])
    assert store.quantized_length == 40
    read, _ = store.read()
    assert torch.allclose(read[:, :, :40], kivi_round_trip(keys[:, :, :40], GROUP, outliers=2), atol=1e-5)
    error, plain_error = ((r[:, :, 8:16] - keys[:, :, 8:16]).abs().mean() for r in (read, plain.read()[0]))
    assert error < plain_error / 5  # the extreme token no longer sets its block's range
    # two float32 values and two one-byte positions per channel of each of the 5 key blocks
    assert store.nbytes() - plain.nbytes() == 2 * 3 * 5 * HEAD_DIM * 2 * (4 + 1)
    # eviction cuts into the oldest block, crop into a middle one, then appends make that block sit inside
    store.drop_oldest(3)
    assert torch.equal(store.read()[0], read[:, :, 3:])
    store.drop_newest(4 + 8 + 3)  # the residual, the newest block and 3 tokens of the one before
    assert torch.equal(store.read()[0], read[:, :, 3:29])
    store.append(keys[:, :, 29:44], values[:, :, 29:44])
    assert torch.equal(store.read()[0][:, :, :26], read[:, :, 3:29])
    store.drop_oldest(10)  # the rest of the first block, 5 tokens of the second
    assert torch.equal(store.read()[0][:, :, :16], read[:, :, 13:29])
    state = store.state()
    restored = QuantizedStore(tokens(0, 0), tokens(0, 0), 2, GROUP, residual_length=4, rotate=True, key_outliers=2)
    restored.load_state(state)
    assert torch.equal(restored.read()[0], store.read()[0])
