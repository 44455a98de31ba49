"""Serialization of one block: every layer's keys and values as safetensors, with a sha256 checksum or, for a
store with a secret, an HMAC-SHA256 (RFC 2104) keyed by it.

A block holds, per layer, the state of a `KVStore` (`caches/storage.py`) that was given the block's
tokens: full-precision keys and values, or, with `BlockFormat(bits=...)`, `QuantizedCache`'s KIVI
codes (keys per channel over blocks of `group_size` tokens, values per token over groups of channels,
after the rotation) with their scales and minimums. Tensors are named `<layer>.<store tensor>`. The
safetensors metadata holds the block's key, the model fingerprint, the layout version, the format and
a sha256 over all of these and every tensor's name, dtype, shape and bytes (`hmac_sha256`, keyed, with a
secret). `decode_block` refuses (with `CorruptBlock`) anything truncated, altered, stale, written for another key,
model or format, unauthenticated under a secret, or (given the restoring model's `BlockShape`) of another
geometry or dtype, or holding a value that is not finite.

An unkeyed checksum only detects damage: anyone who can write to the store can compute it. A keyed one also
detects entries written without the secret, and a store's keys and fingerprints are derived with it, so
they cannot be computed from the model and the prompt either.
"""

import hashlib
import hmac
import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load, save

from hf_kvcache.caches.base import FULL_PRECISION, Storage, largest_group
from hf_kvcache.prefix.keys import LAYOUT_VERSION
from hf_kvcache.quant.packing import check_bits
from hf_kvcache.validation import check_int

if TYPE_CHECKING:
    from hf_kvcache.prefix.transform_codec import TransformCodec

BlockKV = list[tuple[torch.Tensor, torch.Tensor]]
_METADATA_START = '{"__metadata__":'


class CorruptBlock(ValueError):
    """A stored block that must not be used: truncated, altered, stale, or for another key or model."""


class Unauthenticated(CorruptBlock):
    """An entry without a valid MAC under the store's secret: written without it, or altered."""


@dataclass(frozen=True)
class BlockShape:
    """What a block restored into one model must hold: per layer `(kv_heads, key_dim, value_dim)`, and `dtype`
    (the model's). Read from `geometry.model_geometry`, so layers of different sizes are checked each."""

    layers: tuple[tuple[int, int, int], ...]
    dtype: torch.dtype

    def max_bytes(self, tokens: int) -> int:
        """The most bytes an entry of `tokens` tokens can take in any `BlockFormat`: 4x its full-precision
        tensors (8-bit codes with group_size 1 carry two statistics per element) plus 1 MiB of header."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        elements = sum(heads * tokens * (key_dim + value_dim) for heads, key_dim, value_dim in self.layers)
        return 4 * max(itemsize, 2) * elements + (1 << 20)

    def check(self, layers: BlockKV, tokens: int) -> None:
        """Raise `CorruptBlock` unless `layers` are this shape's, of `tokens` tokens, in its dtype and finite."""
        if len(layers) != len(self.layers):
            raise CorruptBlock(f"holds {len(layers)} layers, the model caches {len(self.layers)}")
        for index, ((keys, values), (heads, key_dim, value_dim)) in enumerate(zip(layers, self.layers)):
            for name, tensor, expected in (
                ("keys", keys, (heads, tokens, key_dim)),
                ("values", values, (heads, tokens, value_dim)),
            ):
                if tuple(tensor.shape) != expected or tensor.dtype != self.dtype:
                    raise CorruptBlock(
                        f"layer {index} {name} are {tensor.dtype} {tuple(tensor.shape)}; the model's are "
                        f"{self.dtype} {expected}"
                    )
                if not torch.isfinite(tensor).all():
                    raise CorruptBlock(f"layer {index} {name} hold values that are not finite")


@dataclass(frozen=True)
class BlockFormat:
    """How a block's KV is stored: full precision (`bits=None`), `bits`-bit KIVI codes, or transform-coded by a
    `codec` (`transform_codec.TransformCodec`).

    `group_size`: at most, tokens per key block and channels per value group (the largest divisors of the
    block's tokens and of a layer's value channels up to it). Bytes per element at 4 bits: 0.5 for codes plus
    2 x 2 / `group_size` for fp16 statistics, so 64 keeps 4-bit blocks under 0.3x of fp16 blocks.

    Raises:
        ValueError: `bits` not None, 2, 3, 4 or 8; `group_size` not a positive integer; both `bits` and `codec`.
    """

    bits: int | None = None
    group_size: int = 64
    codec: "TransformCodec | None" = None

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_bits(self.bits, hint="or None for full precision")
        check_int("group_size", self.group_size, minimum=1)
        if self.codec is not None and self.bits is not None:
            raise ValueError(f"bits={self.bits} and codec=...: a block is stored one way; give one of them")

    def describe(self) -> str:
        if self.codec is not None:
            return self.codec.describe()
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

    def pack(
        self, keys: torch.Tensor, values: torch.Tensor, layer: int = 0, position: int = 0
    ) -> dict[str, torch.Tensor]:
        """The stored tensors for layer `layer`'s `(1, kv_heads, tokens, channels)` keys and values of the prompt's
        tokens from `position` on (both only matter to a codec)."""
        if self.codec is not None:
            return self.codec.encode(layer, keys, values, position)
        store = self.storage(keys.shape[-2], values.shape[-1]).new_store(keys, values)
        store.append(keys, values)
        return {name: tensor.contiguous() for name, tensor in store.state().items()}

    def unpack(self, state: dict[str, torch.Tensor], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(batch, kv_heads, tokens, channels)` back from `pack`'s tensors (batch 1 per layer)."""
        value_template = state[self.storage(1, 1).store_type.template_names[1]]
        return self.storage(tokens, value_template.shape[-1]).store_from_state(state).read()

    def unpack_layers(self, states: list[dict[str, torch.Tensor]], tokens: int, position: int = 0) -> BlockKV:
        """Every layer's `(kv_heads, tokens, channels)` keys and values of a block starting at the prompt's token
        `position`. Quantized layers of the same shapes are stacked along the batch dimension and dequantized in one
        pass: per-layer passes of a few small tensors each cost more in dispatch than in arithmetic."""
        if self.codec is not None:
            return [self.codec.decode(index, state, tokens, position) for index, state in enumerate(states)]
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


def _signature_field(secret: bytes | None) -> str:
    return "sha256" if secret is None else "hmac_sha256"


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor], secret: bytes | None = None) -> str:
    digest = hashlib.sha256() if secret is None else hmac.new(secret, digestmod=hashlib.sha256)
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_signature(
    meta: dict[str, str], signed: dict[str, str], tensors: dict[str, torch.Tensor], secret: bytes | None
) -> None:
    found = meta.get(_signature_field(secret))
    if secret is None:
        if found != _checksum(signed, tensors):
            raise CorruptBlock("checksum mismatch")
    elif not isinstance(found, str) or not hmac.compare_digest(found, _checksum(signed, tensors, secret)):
        raise Unauthenticated("no valid MAC under the store's secret")


def encode_block(
    key: str,
    fingerprint: str,
    layers: BlockKV,
    block_format: BlockFormat = BlockFormat(),
    secret: bytes | None = None,
    position: int = 0,
) -> bytes:
    """Serialize one block; `layers[i]` is layer i's `(keys, values)`, each `(kv_heads, tokens, channels)`, of the
    prompt's tokens from `position` on. `secret`: sign it with an HMAC under this key instead of a plain checksum."""
    tensors = {}
    for index, (keys, values) in enumerate(layers):
        state = block_format.pack(*(t.detach().to("cpu")[None] for t in (keys, values)), index, position)
        tensors |= {f"{index}.{name}": tensor for name, tensor in state.items()}
    tokens = layers[0][0].shape[-2] if layers else 0
    meta = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "layers": str(len(layers))}
    meta |= {"tokens": str(tokens), "format": block_format.describe()}
    return save(tensors, metadata={**meta, _signature_field(secret): _checksum(meta, tensors, secret)})


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
    except (ValueError, RecursionError) as error:  # RecursionError: a deeply nested forged header
        raise CorruptBlock(f"unreadable safetensors header: {type(error).__name__}: {error}") from None
    if not isinstance(meta, dict):
        raise CorruptBlock("no hf_kvcache metadata")
    return meta


def _check_identity(meta: dict[str, str], expected: dict[str, str]) -> None:
    for field, value in expected.items():
        if meta.get(field) != value:
            raise CorruptBlock(f"stale or foreign entry: {field}={meta.get(field)!r}, expected {value!r}")


def encode_tensors(
    key: str, fingerprint: str, kind: str, tensors: dict[str, torch.Tensor], secret: bytes | None = None
) -> bytes:
    """Serialize named tensors of any shapes and dtypes (e.g. a compressed cache's `held_state`) as one entry,
    with the same identity metadata and checksum (or MAC) as a block; `kind` names what they are (a block's
    format)."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "format": kind}
    return save(tensors, metadata={**meta, _signature_field(secret): _checksum(meta, tensors, secret)})


def decode_tensors(
    data: bytes, key: str, fingerprint: str, kind: str, secret: bytes | None = None
) -> dict[str, torch.Tensor]:
    """The tensors `encode_tensors` wrote, after checking the entry's identity, kind and checksum or MAC
    (`CorruptBlock` otherwise; `Unauthenticated` for a missing or wrong MAC)."""
    expected = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "format": kind}
    meta = block_metadata(data)
    _check_identity(meta, expected)
    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CorruptBlock(f"unreadable tensors: {error}") from None
    _check_signature(meta, expected, tensors, secret)
    return tensors


def decode_block(
    data: bytes,
    key: str,
    fingerprint: str,
    block_size: int,
    block_format: BlockFormat = BlockFormat(),
    secret: bytes | None = None,
    shape: BlockShape | None = None,
    position: int = 0,
) -> BlockKV:
    """The `(keys, values)` of every layer (dequantized for a quantized format), after checking the block's
    identity, format, checksum or MAC (with `secret`) and token count, and, given the restoring model's `shape`,
    every layer's geometry, dtype and finiteness. `position`: the prompt's token the block starts at (a codec's
    RoPE and raw tokens depend on it). Raises `CorruptBlock` (`Unauthenticated` for the MAC)."""
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
    _check_signature(meta, signed, tensors, secret)
    states: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        index, _, field = name.partition(".")
        states[index][field] = tensor
    if layers <= 0 or len(states) != layers or sorted(states) != sorted(map(str, range(layers))):
        raise CorruptBlock(f"expected tensors for {layers} layers, found layers {sorted(states)}")
    try:
        blocks = block_format.unpack_layers([states[str(index)] for index in range(layers)], block_size, position)
    except Exception as error:  # signed, but unreadable: a layout this version cannot read, or a forgery
        raise CorruptBlock(f"layers cannot be read back: {error}") from None
    for index, (keys, values) in enumerate(blocks):
        if keys.shape[-2] != block_size or values.shape[-2] != block_size:
            raise CorruptBlock(f"layer {index} holds {keys.shape[-2]} tokens, not {block_size}")
    if shape is not None:
        shape.check(blocks, block_size)
    return blocks
