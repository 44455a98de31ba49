"""Serialization of one block: every layer's keys and values as safetensors, with a sha256 checksum.

Tensors are named `keys.<layer>` and `values.<layer>`, shaped `(kv_heads, block_size, head_dim)`.
The safetensors metadata holds the block's key, the model fingerprint, the layout version and a
sha256 over all of these and every tensor's name, dtype, shape and bytes. `decode_block` refuses
(with `CorruptBlock`) anything truncated, altered, stale or written for another key or model.
"""

import hashlib
import json
import struct

import torch
from safetensors.torch import load, save

from hf_kvcache.prefix.keys import LAYOUT_VERSION

BlockKV = list[tuple[torch.Tensor, torch.Tensor]]


class CorruptBlock(ValueError):
    """A stored block that must not be used: truncated, altered, stale, or for another key or model."""


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_block(key: str, fingerprint: str, layers: BlockKV) -> bytes:
    """Serialize one block; `layers[i]` is layer i's `(keys, values)`, each `(kv_heads, tokens, head_dim)`."""
    tensors = {}
    for index, (keys, values) in enumerate(layers):
        tensors[f"keys.{index}"] = keys.detach().to("cpu").contiguous()
        tensors[f"values.{index}"] = values.detach().to("cpu").contiguous()
    tokens = layers[0][0].shape[-2] if layers else 0
    meta = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "layers": str(len(layers))}
    meta["tokens"] = str(tokens)
    return save(tensors, metadata={**meta, "sha256": _checksum(meta, tensors)})


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptBlock(f"{len(data)} bytes is too short for a safetensors header")
    (header_length,) = struct.unpack("<Q", data[:8])
    if 8 + header_length > len(data):
        raise CorruptBlock("truncated safetensors header")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except ValueError as error:
        raise CorruptBlock(f"unreadable safetensors header: {error}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CorruptBlock("no hf_kvcache metadata")
    return meta


def decode_block(data: bytes, key: str, fingerprint: str, block_size: int) -> BlockKV:
    """The `(keys, values)` of every layer, after checking the block's identity, shape and checksum."""
    meta = _metadata(data)
    expected = {"layout": LAYOUT_VERSION, "key": key, "fingerprint": fingerprint, "tokens": str(block_size)}
    for field, value in expected.items():
        if meta.get(field) != value:
            raise CorruptBlock(f"stale or foreign entry: {field}={meta.get(field)!r}, expected {value!r}")
    try:
        tensors = load(data)
        layers = int(meta["layers"])
        blocks = [(tensors[f"keys.{i}"], tensors[f"values.{i}"]) for i in range(layers)]
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CorruptBlock(f"unreadable tensors: {error}") from None
    if layers == 0 or len(tensors) != 2 * layers:
        raise CorruptBlock(f"expected {2 * layers} tensors for {layers} layers, found {len(tensors)}")
    if any(t.dim() != 3 or t.shape[-2] != block_size for pair in blocks for t in pair):
        raise CorruptBlock(f"tensor shapes do not hold {block_size} tokens")
    signed = {field: meta[field] for field in ("layout", "key", "fingerprint", "layers", "tokens")}
    if meta.get("sha256") != _checksum(signed, tensors):
        raise CorruptBlock("checksum mismatch")
    return blocks
