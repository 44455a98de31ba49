"""Keys of the prefix store: a model fingerprint and a chain hash over fixed-size token blocks.

Block i's key hashes the key of block i-1 with block i's tokens, so it stands for every token up to
the end of block i. The chain starts from the model fingerprint and the block size, so a store never
hands one model's KV to another, nor a block to a prompt that differs anywhere before it.
"""

import hashlib
import itertools
import json
from collections.abc import Sequence

import torch
import transformers
from accelerate.utils import align_module_device, has_offloaded_params
from transformers import PreTrainedModel

from hf_kvcache.version import __version__

# Bump when the stored layout changes: old entries then become unreachable misses.
LAYOUT_VERSION = "hf_kvcache.prefix/3"
_SAMPLES_PER_TENSOR = 1024

_DIGEST_ATTRIBUTE = "_hf_kvcache_digest"  # kept on each tensor: ((data pointer, autograd version), digest)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def _tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of all of `tensor`'s bytes; recomputed only when its storage or autograd version changes."""
    stamp = (tensor.data_ptr(), tensor._version)
    cached = getattr(tensor, _DIGEST_ATTRIBUTE, None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256(_bytes_of(tensor)).hexdigest()
    setattr(tensor, _DIGEST_ATTRIBUTE, (stamp, digest))
    return digest


def _sample_digest(tensor: torch.Tensor) -> bytes:
    """A strided sample of `tensor`, read on every lookup: edits through `.data` do not bump the version."""
    flat = tensor.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].contiguous().cpu()
    return sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b""


def _tensor_entry(name: str, tensor: torch.Tensor) -> bytes:
    if tensor.device.type == "meta":
        raise ValueError(
            f"cannot fingerprint the model: its tensor {name!r} is a `meta` placeholder that accelerate does not load "
            "(no offloading hook holds its weights); load the model with its weights"
        )
    return f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{_tensor_digest(tensor)}".encode() + _sample_digest(tensor)


def _offloaded_entries(model: PreTrainedModel) -> dict[str, bytes]:
    """Entries of the tensors accelerate offloads (kept on `meta` outside their module's forward), read
    through the offloading hook one module at a time, on the CPU."""
    entries: dict[str, bytes] = {}
    for prefix, module in model.named_modules():
        if not has_offloaded_params(module):
            continue
        with align_module_device(module, torch.device("cpu")):
            for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
                full_name = f"{prefix}.{name}" if prefix else name
                entries.setdefault(full_name, _tensor_entry(full_name, tensor))
    return entries


def weights_digest(model: PreTrainedModel) -> str:
    """Hash of every parameter and buffer: names, shapes, dtypes and all bytes (adapters included, offloaded
    weights read through accelerate)."""
    offloaded = _offloaded_entries(model)
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(offloaded.get(name) or _tensor_entry(name, tensor))
    return digest.hexdigest()


def model_fingerprint(model: PreTrainedModel) -> str:
    """A hex digest of what determines a model's KV: config, dtype, attention implementation, every weight
    and buffer (all bytes: any change, an adapter or another checkpoint at the same path is a new
    fingerprint), and library versions.

    Cost: every tensor's bytes are hashed once (sha256; measured 0.35 s for the packaged 135M-parameter fp32
    model's 538 MB on one CPU core, 1.5 GB/s, so about 11 s for an 8B-parameter bf16 model's 16 GB) and again
    only when the tensor changes (its autograd version or storage); each lookup then costs the re-read of a
    1,024-element sample of every tensor (4.6 ms on the packaged model), which also catches most edits made
    through `.data`, which autograd does not count.
    """
    identity = {
        "layout": LAYOUT_VERSION,
        "config": model.config.to_dict(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(model.dtype),
        "weights": weights_digest(model),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "hf_kvcache": __version__},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def cache_signature(cache: object | None) -> str:
    """What in a cache changes the KV a model computes after a restore: later tokens attend to what the
    cache holds (quantized codes, an evicted window), so their KV depends on the cache's class and settings.
    None stands for a cache that keeps every token exactly (`DynamicCache`)."""
    if cache is None or type(cache).__name__ == "DynamicCache":
        return "DynamicCache"
    settings = {
        name: value
        for name, value in sorted(vars(cache).items())
        if isinstance(value, bool | int | float | str | type(None)) and not name.startswith("_")
    }
    for value in ("storage", "policy", "profile"):  # values (dataclasses) whose repr lists every setting
        if getattr(cache, value, None) is not None:
            settings[value] = repr(getattr(cache, value))
    return f"{type(cache).__module__}.{type(cache).__qualname__}:{json.dumps(settings, sort_keys=True)}"


def block_keys(fingerprint: str, token_ids: Sequence[int], block_size: int) -> list[str]:
    """Chain keys of the complete `block_size`-token blocks of `token_ids` (a trailing partial block has none)."""
    tokens = torch.as_tensor(list(token_ids), dtype=torch.int64)
    previous = hashlib.sha256(f"{fingerprint}:block_size={block_size}".encode()).hexdigest()
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.sha256(previous.encode())
        digest.update(tokens[start : start + block_size].numpy().astype("<i8").tobytes())
        previous = digest.hexdigest()
        keys.append(previous)
    return keys
