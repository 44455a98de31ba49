"""The shared arithmetic of every hf_kvcache cache: tokens seen vs stored, mask sizes, batch ops.

A `KVLayer` keeps an optional full-precision *head* (the first `head_tokens` tokens: attention sinks,
never quantized) and a *body* store (full precision or quantized, see `storage.py`). A strategy states
only what differs: which tokens to evict after an update (`evict`) and how head keys are presented
(`head_keys`, for sink re-rotation). `KVCache` assembles one layer per model layer from the config.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from hf_kvcache.caches.config import WINDOWED_LAYER_TYPES, ModelGeometry, model_geometry
from hf_kvcache.caches.masking import announce
from hf_kvcache.caches.storage import FullPrecisionStore, KVStore, QuantizedStore, TokenQuantizedStore
from hf_kvcache.quant.packing import SUPPORTED_BITS, packed_size


def check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")


@dataclass(frozen=True)
class Storage:
    """How kept tokens are held: full precision (`bits=None`), KIVI-quantized, or with `token_wise`
    quantized per token (keys too), so that single tokens can be kept or dropped per head."""

    bits: int | None = None
    group_size: int = 32
    residual_length: int = 128
    rotate: bool = True
    token_wise: bool = False

    def validate(self, head_dim: int) -> None:
        if self.bits is None:
            return
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; accepted values: "
                f"{', '.join(map(str, SUPPORTED_BITS))} (or None for full precision)"
            )
        divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
        if not isinstance(self.group_size, int) or self.group_size not in divisors:
            raise ValueError(
                f"group_size={self.group_size!r} must divide head_dim={head_dim}; accepted values: "
                f"{', '.join(map(str, divisors))}"
            )
        check_non_negative(residual_length=self.residual_length)
        packed_size(head_dim, self.bits)
        if self.rotate and head_dim & (head_dim - 1):
            raise ValueError(f"rotate=True needs a power-of-two head_dim, this model has head_dim={head_dim}")

    def new_store(self, template: torch.Tensor) -> KVStore:
        if self.bits is None:
            return FullPrecisionStore(template)
        store = TokenQuantizedStore if self.token_wise else QuantizedStore
        return store(template, self.bits, self.group_size, self.residual_length, self.rotate)


FULL_PRECISION = Storage()


class KVLayer(CacheLayerMixin):
    """One layer's cache: a full-precision head, a body store, and the count of tokens seen.

    `update` returns every stored token plus all new ones (new ones in full precision), then lets the
    strategy evict. Mask sizes follow the transformers contract: `(stored + query, seen - stored)`.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, storage: Storage, head_tokens: int = 0):
        super().__init__()
        self.storage = storage
        self.head_tokens = head_tokens
        self.seen_tokens = 0
        self.head: FullPrecisionStore | None = None
        self.body: KVStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        template = key_states[:, :, :0, :]
        self.head = FullPrecisionStore(template)
        self.body = self.storage.new_store(template)
        self.is_initialized = True

    # --- token accounting -------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        return len(self.head) + len(self.body) if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_tokens
        return stored + query_length, self.seen_tokens - stored

    def get_max_length(self) -> int:
        return -1

    # --- reading and writing ----------------------------------------------------------------------
    def head_keys(self, kv_offset: int) -> torch.Tensor:
        """Head keys as attention sees them when stored token 0 is labelled position `kv_offset`."""
        return self.head.keys

    def evict(self) -> None:
        """Drop tokens after an update; the base layer keeps everything."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv_offset = self.seen_tokens - self.stored_tokens
        body_keys, body_values = zip(*self.body.parts())  # one concatenation for all pieces
        keys = torch.cat([self.head_keys(kv_offset), *body_keys, key_states], dim=-2)
        values = torch.cat([self.head.values, *body_values, value_states], dim=-2)
        self.seen_tokens += key_states.shape[-2]
        self._append(key_states, value_states)
        self.evict()
        return keys, values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        to_head = min(self.head_tokens - len(self.head), key_states.shape[-2]) if len(self.body) == 0 else 0
        if to_head > 0:
            self.head.append(key_states[:, :, :to_head], value_states[:, :, :to_head])
        if to_head < key_states.shape[-2]:
            self.body.append(key_states[:, :, to_head:], value_states[:, :, to_head:])

    # --- what generate needs ----------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest `-tokens_to_remove` tokens (or keep the first `tokens_to_remove` if > 0)."""
        if not self.is_initialized:
            return
        count = self.seen_tokens - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        if count <= 0:
            return
        if self.seen_tokens != self.stored_tokens:
            raise ValueError(
                f"{type(self).__name__} cannot crop after it has evicted tokens: the {self.seen_tokens - self.stored_tokens} "
                "evicted tokens are gone. Use a cache without eviction for assisted decoding."
            )
        from_body = min(count, len(self.body))
        self.body.drop_newest(from_body)
        self.head.drop_newest(count - from_body)
        self.seen_tokens -= count

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self.head.map_batch(fn)
            self.body.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        self.head = self.body = None
        self.seen_tokens = 0
        self.is_initialized = False

    def offload(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    prefetch = offload

    def memory_bytes(self) -> int:
        """Bytes held: codes, scales, minimums and full-precision tensors, as allocated."""
        return self.head.nbytes() + self.body.nbytes() if self.is_initialized else 0


class WindowLayer(KVLayer):
    """Keeps the head plus the `window` most recent tokens."""

    is_croppable = False

    def __init__(self, storage: Storage, window: int, head_tokens: int = 0):
        super().__init__(storage, head_tokens)
        self.window = window

    def get_max_length(self) -> int:
        return self.head_tokens + self.window

    def evict(self) -> None:
        excess = len(self.body) - self.window
        if excess > 0:
            self.body.drop_oldest(excess)


class KVCache(Cache):
    """A `transformers.Cache` of `KVLayer`s, one per model layer, built from the model config.

    Subclasses give the layer for full-attention layers (`full_attention_layer`). Layers the model
    itself runs with a sliding window (or chunked attention) keep the model's window of
    `window - 1` tokens, exactly as transformers' `DynamicSlidingWindowLayer` does, in the same storage.
    """

    def __init__(self, config: PreTrainedConfig, storage: Storage):
        self.geometry: ModelGeometry = model_geometry(config)
        storage.validate(self.geometry.head_dim)
        self.storage = storage
        layers = [
            self.windowed_layer(window - 1) if layer_type in WINDOWED_LAYER_TYPES else self.full_attention_layer()
            for layer_type, window in zip(self.geometry.layer_types, self.geometry.layer_windows)
        ]
        super().__init__(layers=layers)

    def full_attention_layer(self) -> KVLayer:
        raise NotImplementedError

    def windowed_layer(self, model_window: int) -> KVLayer:
        layer = WindowLayer(self.storage, window=model_window)
        layer.is_sliding = True
        return layer

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        kv_length, kv_offset = super().get_mask_sizes(query_length, layer_idx)
        if layer_idx < len(self.layers):
            announce(self.layers[layer_idx], kv_offset)
        return kv_length, kv_offset

    def memory_bytes(self) -> int:
        """Bytes this cache really holds, summed over layers."""
        return sum(layer.memory_bytes() for layer in self.layers)

    @property
    def seen_tokens(self) -> int:
        return self.get_seq_length()

    @property
    def stored_tokens(self) -> int:
        return max((layer.stored_tokens for layer in self.layers), default=0)
