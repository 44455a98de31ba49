"""Masks for caches that keep other tokens than transformers assumes.

The sdpa and eager mask functions are wrapped (through transformers' own `AttentionMaskInterface.register`)
so that the layer announced by `KVCache.get_mask_sizes` can correct two assumptions:

- Padding of non-contiguous kept tokens (attention sinks): transformers looks up the padding status of
  stored token `j` at its *labelled* position `kv_offset + j`. A layer's head holds each row's first real
  tokens (its sinks) and its body the rest, so in a left-padded batch labels and true positions differ;
  the cache records each forward's 2D padding mask (`record_padding`, read by the layers as they store
  the new tokens) and the layer writes the true padding status onto its labels (`relabel_padding_mask`).
- A cache built from another model's config: transformers passes the model's config to the mask
  function, so the cache compares it (once per config object) with the geometry it was built for, and
  refuses a different RoPE, window or layer layout before any wrong attention is computed.
- Chunked attention (Llama 4): SDPA's mask may be skipped (left to `is_causal`) when fewer keys than the
  chunk size are attended, which holds for a cache that keeps whole chunks but not for a smaller window,
  whose keys can still straddle a chunk boundary. For a chunked layer the mask is always built.

Masks for any other cache or model pass through unchanged. The other mask functions transformers ships
(flash attention, flex attention) get the same config check; where a correction would change the mask (true
padding of kept tokens, a chunked layer whose kept keys do not start at position 0) they refuse the forward,
naming the implementation, before any attention runs: their masks are built in ways this module does not
verify (flash drops padding by index, flex compiles a block mask, neither runs on this project's CPU CI).
"""

import threading
from collections.abc import Callable

import torch
from transformers.masking_utils import AttentionMaskInterface

from hf_kvcache.scoring import CAPTURE_PREFIX

_announced = threading.local()
CORRECTING_IMPLEMENTATIONS = ("sdpa", "eager")  # mask functions that take the corrections


def announce(layer: object, kv_offset: int, cache: object = None) -> None:
    """Called right before transformers builds the mask for `layer` (of `cache`) with this `kv_offset`."""
    _announced.request = (layer, kv_offset, cache)


def _corrected(mask_function: Callable, implementation: str) -> Callable:
    corrects = implementation in CORRECTING_IMPLEMENTATIONS

    def mask_with_corrections(*args, attention_mask=None, kv_offset=0, **kwargs):
        layer, expected_offset, cache = getattr(_announced, "request", None) or (None, None, None)
        _announced.request = None
        if expected_offset == kv_offset:
            check_model_config = getattr(cache, "check_model_config", None)
            if check_model_config and kwargs.get("config") is not None:
                check_model_config(kwargs["config"])
            record_padding = getattr(cache, "record_padding", None)
            if record_padding:
                record_padding(attention_mask if isinstance(attention_mask, torch.Tensor) else None)
            relabel = getattr(layer, "relabel_padding_mask", None)
            chunked = getattr(getattr(layer, "geometry", None), "kind", None) == "chunked_attention"
            if relabel and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                relabelled = relabel(attention_mask, kv_offset)
                if not corrects and not torch.equal(relabelled, attention_mask):
                    _refuse(cache, implementation, "its kept tokens' padding is not where their labels say")
                attention_mask = relabelled
            if chunked and corrects:
                kwargs["allow_is_causal_skip"] = False
            elif chunked and kv_offset > 0:
                _refuse(cache, implementation, "a chunked-attention layer keeps keys that do not start a chunk")
        return mask_function(*args, attention_mask=attention_mask, kv_offset=kv_offset, **kwargs)

    mask_with_corrections.wrapped = mask_function
    return mask_with_corrections


def _refuse(cache: object, implementation: str, reason: str) -> None:
    raise ValueError(
        f"{type(cache).__name__} cannot serve attn_implementation={implementation!r} here: {reason}, and only the "
        "sdpa and eager mask functions take the correction. Load the model with attn_implementation='sdpa' "
        "(or 'eager')."
    )


def install_mask_corrections() -> None:
    """Wrap every mask function transformers ships (idempotent): sdpa and eager correct, the others refuse
    where a correction would be needed. hf_kvcache's own entries (score capture) call the wrapped ones."""
    for name, current in list(AttentionMaskInterface._global_mapping.items()):
        if not hasattr(current, "wrapped") and not name.startswith(CAPTURE_PREFIX):
            AttentionMaskInterface.register(name, _corrected(current, name))
