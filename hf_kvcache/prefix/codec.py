"""Serialization of one block: every layer's keys and values as safetensors, with a sha256 checksum.

A block holds, per layer, the state of a `KVStore` (`caches/storage.py`) that was given the block's
tokens: full-precision keys and values, or, with `BlockFormat(bits=...)`, `QuantizedCache`'s KIVI
codes (keys per channel over blocks of `group_size` tokens, values per token over groups of channels,
after the rotation) with their scales and minimums. Tensors are named `<layer>.<store tensor>`. The
safetensors metadata holds the block's key, the model fingerprint, the layout version, the format and
a sha256 over all of these and every tensor's name, dtype, shape and bytes. `decode_block` refuses
(with `CorruptBlock`) anything truncated, altered, stale or written for another key, model or format.
"""

import hashlib
import json
import struct
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from hf_kvcache.caches.base import FULL_PRECISION, Storage, largest_group
from hf_kvcache.prefix.keys import LAYOUT_VERSION
from hf_kvcache.quant.packing import check_bits
from hf_kvcache.validation import check_int

BlockKV = list[tuple[torch.Tensor, torch.Tensor]]
_METADATA_START = '{"__metadata__":'


class CorruptBlock(ValueError):
    """A stored block that must not be used: truncated, altered, stale, or for another key or model."""


@dataclass(frozen=True)
class BlockFormat:
    """How a block's KV is stored: full precision (`bits=None`) or `bits`-bit KIVI codes.

    `group_size`: at most, tokens per key block and channels per value group (the largest divisors of the
    block's tokens and of a layer's value channels up to it). Bytes per element at 4 bits: 0.5 for codes plus
    2 x 2 / `group_size` for fp16 statistics, so 64 keeps 4-bit blocks under 0.3x of fp16 blocks.

    Raises:
        ValueError: `bits` not None, 2, 3, 4 or 8; `group_size` not a positive integer.
    """

    bits: int | None = None
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_bits(self.bits, hint="or None for full precision")
        check_int("group_size", self.group_size, minimum=1)

    def describe(self) -> str:
        return "full precision" if self.bits is None else f"{self.bits}-bit KIVI, group_size={self.group_size}"

    def storage(self, tokens: int, value_channels: int) -> Storage:
        """The store settings for a block of `tokens` tokens of a layer with `value_channels`: key blocks of the
        largest divisor of `tokens` up to `group_size` tokens, so every token is quantized."""
        if self.bits is None:
            return FULL_PRECISION
        return Storage(
            self.bits,
            largest_group(value_channels, self.group_size),
            residual_length=0,
            key_group_size=largest_group(tokens, self.group_size),
        )

    def pack(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors for one layer's `(1, kv_heads, tokens, channels)` keys and values."""
        store = self.storage(keys.shape[-2], values.shape[-1]).new_store(keys, values)
        store.append(keys, values)
        return {name: tensor.contiguous() for name, tensor in store.state().items()}

    def unpack(self, state: dict[str, torch.Tensor], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(batch, kv_heads, tokens, channels)` back from `pack`'s tensors (batch 1 per layer)."""
        value_template = state[self.storage(1, 1).store_type.template_names[1]]
        return self.storage(tokens, value_template.shape[-1]).store_from_state(state).read()

    def unpack_layers(self, states: list[dict[str, torch.Tensor]], tokens: int) -> BlockKV:
        """Every layer's `(kv_heads, tokens, channels)` keys and values. Quantized layers of the same shapes are
        stacked along the batch dimension and dequantized in one pass: per-layer passes of a few small tensors
        each cost more in dispatch than in arithmetic."""
        if self.bits is None:
            return [tuple(t[0] for t in self.unpack(state, tokens)) for state in states]
        batch_first = self.storage(1, 1).store_type.tensor_names
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, state in enumerate(states):
            shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(state.items()))
            shared = tuple(tuple(t.tolist()) for name, t in sorted(state.items()) if name not in batch_first)
            groups[shapes + shared].append(index)
        layers: list = [None] * len(states)
        for indices in groups.values():
            first = states[indices[0]]
            stacked = {
                name: torch.cat([states[i][name] for i in indices]) if name in batch_first else tensor
                for name, tensor in first.items()
            }
            keys, values = self.unpack(stacked, tokens)
            for row, index in enumerate(indices):
                layers[index] = (keys[row], values[row])
        return layers


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_block(key: str, fingerprint: str, layers: BlockKV, block_format: BlockFormat = BlockFormat()) -> bytes:
    """Serialize one block; `layers[i]` is layer i's `(keys, values)`, each `(kv_heads, tokens, channels)`."""
    tensors = {}
    for index, (keys, values) in enumerate(layers):
        state = block_format.pack(*(t.detach().to("cpu")[None] for t in (keys, values)))
        tensors |= {f"{index}.{name}": tensor for name, tensor in state.items()}
    tokens = layers[0][0].shape[-2] if layers else 0
    meta = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "layers": str(len(layers))}
    meta |= {"tokens": str(tokens), "format": block_format.describe()}
    return save(tensors, metadata={**meta, "sha256": _checksum(meta, tensors)})


def block_metadata(data: bytes) -> dict[str, str]:
    """A stored block's metadata (layout, key, fingerprint, layers, tokens, format) from its bytes, or from
    just their start (safetensors writes the metadata first); `CorruptBlock` when they hold none."""
    if len(data) < 8:
        raise CorruptBlock(f"{len(data)} bytes is too short for a safetensors header")
    (header_length,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + header_length].decode("utf-8", errors="replace")
    complete = 8 + header_length <= len(data)
    if not complete and not text.startswith(_METADATA_START):
        raise CorruptBlock("truncated safetensors header")
    try:
        if complete:
            header = json.loads(text)
            meta = header.get("__metadata__") if isinstance(header, dict) else None
        else:  # only the start of the header: the metadata object comes first
            meta, _ = json.JSONDecoder().raw_decode(text, len(_METADATA_START))
    except ValueError as error:
        raise CorruptBlock(f"unreadable safetensors header: {error}") from None
    if not isinstance(meta, dict):
        raise CorruptBlock("no hf_kvcache metadata")
    return meta


def _check_identity(meta: dict[str, str], expected: dict[str, str]) -> None:
    for field, value in expected.items():
        if meta.get(field) != value:
            raise CorruptBlock(f"stale or foreign entry: {field}={meta.get(field)!r}, expected {value!r}")


def encode_tensors(key: str, fingerprint: str, kind: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize named tensors of any shapes and dtypes (e.g. a compressed cache's `held_state`) as one entry,
    with the same identity metadata and checksum as a block; `kind` names what they are (a block's format)."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "format": kind}
    return save(tensors, metadata={**meta, "sha256": _checksum(meta, tensors)})


def decode_tensors(data: bytes, key: str, fingerprint: str, kind: str) -> dict[str, torch.Tensor]:
    """The tensors `encode_tensors` wrote, after checking the entry's identity, kind and checksum (`CorruptBlock`
    otherwise)."""
    expected = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "format": kind}
    meta = block_metadata(data)
    _check_identity(meta, expected)
    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CorruptBlock(f"unreadable tensors: {error}") from None
    if meta.get("sha256") != _checksum(expected, tensors):
        raise CorruptBlock("checksum mismatch")
    return tensors


def decode_block(
    data: bytes, key: str, fingerprint: str, block_size: int, block_format: BlockFormat = BlockFormat()
) -> BlockKV:
    """The `(keys, values)` of every layer (dequantized for a quantized format), after checking the block's
    identity, format, checksum and token count."""
    meta = block_metadata(data)
    expected = {
        "layout": LAYOUT_VERSION,
        "key": key,
        "fingerprint": fingerprint,
        "tokens": str(block_size),
        "format": block_format.describe(),
    }
    _check_identity(meta, expected)
    try:
        tensors = load(data)
        layers = int(meta["layers"])
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CorruptBlock(f"unreadable tensors: {error}") from None
    signed = {field: meta[field] for field in ("layout", "key", "fingerprint", "layers", "tokens", "format")}
    if meta.get("sha256") != _checksum(signed, tensors):
        raise CorruptBlock("checksum mismatch")
    states: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        index, _, field = name.partition(".")
        states[index][field] = tensor
    if layers == 0 or sorted(states) != sorted(map(str, range(layers))):
        raise CorruptBlock(f"expected tensors for {layers} layers, found layers {sorted(states)}")
    try:
        blocks = block_format.unpack_layers([states[str(index)] for index in range(layers)], block_size)
    except Exception as error:  # signed by our encoder but unreadable: a layout this version cannot read
        raise CorruptBlock(f"layers cannot be read back: {error}") from None
    for index, (keys, values) in enumerate(blocks):
        if keys.shape[-2] != block_size or values.shape[-2] != block_size:
            raise CorruptBlock(f"layer {index} holds {keys.shape[-2]} tokens, not {block_size}")
    return blocks
