"""Padding masks for caches whose kept tokens are not contiguous (attention sinks).

transformers looks up the padding status of stored token `j` at its *labelled* position
`kv_offset + j`. A sink cache labels its sinks just before the window, so in a left-padded batch a
row whose sinks are padding would read "real token" there and attend to padding. The sdpa and eager
mask functions are wrapped (through transformers' own `AttentionMaskInterface.register`) so that a
layer announced by `KVCache.get_mask_sizes` can move the sinks' true padding status onto their labels.
Masks for any other cache or model pass through unchanged.
"""

import threading
from collections.abc import Callable

import torch
from transformers.masking_utils import AttentionMaskInterface

_announced = threading.local()
_WRAPPED_IMPLEMENTATIONS = ("sdpa", "eager")


def announce(layer: object, kv_offset: int) -> None:
    """Called right before transformers builds the mask for `layer` with this `kv_offset`."""
    _announced.request = (layer, kv_offset)


def _relabelled(mask_function: Callable) -> Callable:
    def mask_with_relabelled_padding(*args, attention_mask=None, kv_offset=0, **kwargs):
        layer, expected_offset = getattr(_announced, "request", None) or (None, None)
        _announced.request = None
        relabel = getattr(layer, "relabel_padding_mask", None)
        is_padding_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
        if relabel and expected_offset == kv_offset and is_padding_mask:
            attention_mask = relabel(attention_mask, kv_offset)
        return mask_function(*args, attention_mask=attention_mask, kv_offset=kv_offset, **kwargs)

    mask_with_relabelled_padding.wrapped = mask_function
    return mask_with_relabelled_padding


def install_padding_relabelling() -> None:
    """Wrap the sdpa and eager mask functions once (idempotent)."""
    for name in _WRAPPED_IMPLEMENTATIONS:
        current = AttentionMaskInterface._global_mapping[name]
        if not hasattr(current, "wrapped"):
            AttentionMaskInterface.register(name, _relabelled(current))
