"""Keys of the prefix store: a model fingerprint and a chain hash over fixed-size token blocks.

Block i's key hashes the key of block i-1 with block i's tokens, so it stands for every token up to
the end of block i. The chain starts from the model fingerprint and the block size, so a store never
hands one model's KV to another, nor a block to a prompt that differs anywhere before it.
"""

import hashlib
import json
from collections.abc import Sequence

import torch
import transformers
from transformers import PreTrainedModel

# Bump when the stored layout changes: old entries then become unreachable misses.
LAYOUT_VERSION = "hf_kvcache.prefix/1"
_SAMPLED_PARAMETERS = 4
_SAMPLES_PER_PARAMETER = 4096


def _parameter_digest(model: PreTrainedModel) -> str:
    """Hash of the names, shapes and a strided sample of a few parameter tensors (first, middle, last)."""
    named = list(model.named_parameters())
    if not named:
        return "no-parameters"
    picks = sorted({round(i * (len(named) - 1) / (_SAMPLED_PARAMETERS - 1)) for i in range(_SAMPLED_PARAMETERS)})
    digest = hashlib.sha256()
    for index in picks:
        name, parameter = named[index]
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_PARAMETER)].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: PreTrainedModel) -> str:
    """A hex digest of what determines a model's KV: config, dtype, name, sampled weights, library versions."""
    from hf_kvcache import __version__

    config = model.config.to_dict()
    identity = {
        "layout": LAYOUT_VERSION,
        "config": config,
        "dtype": str(model.dtype),
        "name_or_path": str(getattr(model, "name_or_path", "")),
        "parameters": _parameter_digest(model),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "hf_kvcache": __version__},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


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
