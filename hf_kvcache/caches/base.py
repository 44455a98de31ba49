"""The shared arithmetic of every hf_kvcache cache: tokens seen vs stored, mask sizes, batch ops.

A `KVLayer` keeps an optional full-precision *head* (the first `head_tokens` tokens: attention sinks,
never quantized) and a *body* store (full precision or quantized, see `storage.py`). A strategy states
only what differs: which tokens to evict after an update (`evict`) and how head keys are presented
(`head_keys`, for sink re-rotation). `KVCache` assembles one layer per model layer from the config.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

try:  # transformers >= 5.22: a layer that reads another layer's KV (Gemma 4) stores nothing
    from transformers.cache_utils import DummyLayer
except ImportError:  # older versions drop such layers from the layer list instead
    DummyLayer = None

from hf_kvcache.attention import routing
from hf_kvcache.caches.masking import corrected_mask
from hf_kvcache.caches.storage import (
    FullPrecisionStore,
    KVStore,
    QuantizedStore,
    TokenQuantizedStore,
    gather_tokens,
)
from hf_kvcache.geometry import SHARED_KIND, LayerGeometry, ModelGeometry, model_geometry, recurrent_layer_class
from hf_kvcache.quant.groupwise import CODEBOOKS
from hf_kvcache.quant.packing import check_bits, packed_size
from hf_kvcache.validation import check_bool, check_choice, check_int, check_optional_int

DEFAULT_GROUP_SIZE = 32
# What only codes use: refused with `bits=None` unless left at their defaults.
CODE_SETTINGS = ("group_size", "residual_length", "rotate", "key_bits", "key_group_size", "key_outliers", "codebook")


def largest_group(channels: int, at_most: int = DEFAULT_GROUP_SIZE) -> int:
    """The largest group of at most `at_most` channels that divides `channels`."""
    return max(d for d in range(1, min(channels, at_most) + 1) if channels % d == 0)


@dataclass(frozen=True)
class Storage:
    """How kept tokens are held: full precision (`bits=None`), KIVI-quantized, or with `token_wise`
    quantized per token (keys too), so that single tokens can be kept or dropped per head.

    `group_size=None` picks, per layer, the largest group of at most 32 channels that divides the
    layer's value channels (and key channels when `token_wise`): 32 for head sizes 64/96/128/256, 20 for 80,
    24 for 72. `key_bits` and `key_group_size` (None: `bits`, `group_size`) set the keys apart: their code
    width, and their block of tokens (KIVI's per-channel keys) or group of channels (`token_wise`).
    `key_outliers` key elements per channel and key block, those farthest from the block's median, are
    kept apart in full precision (`hf_kvcache.quant.quantize`); `codebook` ("uniform" or "normal") places
    the code levels. `for_layer` checks the settings against one layer and fills the groups in.

    Raises:
        ValueError: a setting of the wrong type or out of range (named, with what is accepted; `token_wise`
            and `rotate` must be True or False); with `bits=None` (full precision, no codes), any of
            `CODE_SETTINGS` other than its default, all of them named (they would be ignored).
    """

    bits: int | None = None
    group_size: int | None = None
    residual_length: int = 128
    rotate: bool = True
    token_wise: bool = False
    key_bits: int | None = None
    key_group_size: int | None = None
    key_outliers: int = 0
    codebook: str = "uniform"

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_bits(self.bits, hint="or None for full precision")
        if self.key_bits is not None:
            check_bits(self.key_bits, name="key_bits")
        check_optional_int("group_size", self.group_size, minimum=1)
        check_optional_int("key_group_size", self.key_group_size, minimum=1)
        check_int("key_outliers", self.key_outliers)
        check_choice("codebook", self.codebook, CODEBOOKS)
        check_int("residual_length", self.residual_length)
        check_bool("rotate", self.rotate)
        check_bool("token_wise", self.token_wise)
        if self.bits is None:
            defaults = {field.name: field.default for field in dataclasses.fields(Storage)}
            ignored = [name for name in CODE_SETTINGS if getattr(self, name) != defaults[name]]
            if ignored:
                given = ", ".join(f"{name}={getattr(self, name)!r}" for name in ignored)
                raise ValueError(
                    f"{given} {'apply' if len(ignored) > 1 else 'applies'} only to quantized storage, but "
                    "bits=None stores full precision (no codes): pass bits (2, 3, 4 or 8) to quantize, or leave "
                    f"{', '.join(ignored)} at {'their defaults' if len(ignored) > 1 else 'its default'}"
                )

    def grouped_channels(self, layer: LayerGeometry) -> int:
        """The channel count every group must divide: values, and keys too when keys are grouped per token."""
        return math.gcd(layer.value_dim, layer.key_dim) if self.token_wise else layer.value_dim

    def for_layer(self, layer: LayerGeometry) -> "Storage":
        """This storage with the group size resolved for `layer`; a ValueError names the layer if it cannot hold it."""
        if self.bits is None:
            return self
        channels = self.grouped_channels(layer)
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        group_size = self.group_size
        if group_size is None:
            group_size = largest_group(channels)
        elif group_size not in divisors:
            raise ValueError(
                f"group_size={group_size!r} must divide the {channels} grouped channels of {layer.describe()} "
                f"(key channels {layer.key_dim}, value channels {layer.value_dim}); accepted values: "
                f"{', '.join(map(str, divisors))}, or None to choose per layer"
            )
        key_group = self.key_group_size or group_size
        if self.key_outliers and (self.token_wise or not self.key_outliers < key_group <= 256):
            raise ValueError(
                f"key_outliers={self.key_outliers!r} needs KIVI's per-channel key blocks (not token_wise) of more "
                f"than key_outliers and at most 256 tokens (an outlier's position is one byte); {layer.describe()} "
                f"has key blocks of {key_group} tokens"
            )
        if self.token_wise and self.key_group_size is not None and layer.key_dim % self.key_group_size:
            raise ValueError(
                f"key_group_size={self.key_group_size!r} must divide the {layer.key_dim} key channels of "
                f"{layer.describe()}"
            )
        for name, size, bits in (
            ("key", layer.key_dim, self.key_bits or self.bits),
            ("value", layer.value_dim, self.bits),
        ):
            try:
                packed_size(size, bits)
            except ValueError as error:
                raise ValueError(f"bits={bits}: {layer.describe()} has {size} {name} channels: {error}") from None
        return dataclasses.replace(self, group_size=group_size)

    @property
    def keeps_any_tokens(self) -> bool:
        """Whether single tokens can be kept or dropped per batch row and head (`KVStore.gather`), as the
        store kind declares: full precision and per-token quantization can; KIVI's per-channel key blocks
        cannot."""
        return self.store_type.keeps_any_tokens

    def store_from_state(self, state: dict[str, torch.Tensor]) -> KVStore:
        """A store holding `state` (from `KVStore.state()` of a store made by this storage)."""
        store = self.new_store(*(state[name] for name in self.store_type.template_names))
        store.load_state(state)
        return store

    @property
    def store_type(self) -> type[KVStore]:
        if self.bits is None:
            return FullPrecisionStore
        return TokenQuantizedStore if self.token_wise else QuantizedStore

    def new_store(self, keys: torch.Tensor, values: torch.Tensor) -> KVStore:
        """An empty store for tensors shaped like `keys`/`values`; call on a `for_layer` result."""
        if self.bits is None:
            return FullPrecisionStore(keys, values)
        return self.store_type(
            keys,
            values,
            self.bits,
            self.group_size,
            self.residual_length,
            self.rotate,
            self.key_bits,
            self.key_group_size,
            self.key_outliers,
            self.codebook,
        )


FULL_PRECISION = Storage()


class KVLayer(CacheLayerMixin):
    """One layer's cache: a full-precision head, a body store, and the count of tokens seen.

    `update` returns the attended tokens plus all new ones (new ones in full precision), then lets the
    strategy evict. Mask sizes follow the transformers contract: `(attended + query, seen - attended)`.
    `crop` removes the newest tokens at any depth, as long as no token it would have to bring back was
    evicted (assisted decoding turns on `activate_past_recording`, which defers eviction until `crop`).
    """

    is_sliding = False
    is_croppable = True
    tracks_padding = True  # policy layers keep their own per-head record

    def __init__(self, geometry: LayerGeometry, storage: Storage, head_tokens: int = 0):
        super().__init__()
        self.geometry, self.storage, self.head_tokens = geometry, storage, head_tokens
        self.seen_tokens = 0
        self.record_past = False
        self.head: FullPrecisionStore | None = None
        self.body: KVStore | None = None
        self.incoming_mask: torch.Tensor | None = None  # this forward's 2D padding mask, set by the cache
        # bool [batch or 1, head / body tokens], False for padding; None while no padding was ever held
        self.head_real: torch.Tensor | None = None
        self.body_real: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.check_shapes(key_states, value_states)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head = FullPrecisionStore(key_states, value_states)
        self.body = self.storage.new_store(key_states, value_states)
        self.is_initialized = True

    def check_shapes(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The first update must match the geometry the cache was built for (a cache built from another
        model's config would otherwise serve wrongly rotated or wrongly grouped KV)."""
        layer = self.geometry
        received = (key_states.shape[1], key_states.shape[-1], value_states.shape[-1])
        if received != (layer.kv_heads, layer.key_dim, layer.value_dim):
            raise ValueError(
                f"{layer.describe()} of this cache was built from a config with {layer.kv_heads} KV heads, "
                f"{layer.key_dim} key and {layer.value_dim} value channels, but the model passed keys "
                f"{tuple(key_states.shape)} and values {tuple(value_states.shape)}. Build the cache from the "
                "config of the model it is used with (`model.config`)."
            )

    # --- token accounting -------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        return len(self.head) + len(self.body) if self.is_initialized else 0

    @property
    def attended_tokens(self) -> int:
        """Stored tokens the next forward attends (all of them, unless eviction is deferred for a rollback)."""
        return self.stored_tokens

    def evicted_after(self, seen: int) -> int:
        """How many tokens this layer has dropped after seeing `seen` tokens (none: it keeps everything)."""
        return 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        attended = self.attended_tokens
        return attended + query_length, self.seen_tokens - attended

    def get_max_length(self) -> int:
        return -1

    # --- reading and writing ----------------------------------------------------------------------
    def head_states(self, kv_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head keys and values as attention sees them when stored token 0 is labelled position `kv_offset`."""
        return self.head.keys, self.head.values

    def evict(self) -> None:
        """Drop tokens after an update; the base layer keeps everything."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv_offset = self.seen_tokens - self.attended_tokens
        body_keys, body_values = zip(*self.body.parts())  # one concatenation for all pieces
        if skipped := self.stored_tokens - self.attended_tokens:  # kept only so that `crop` can restore them
            body_keys, body_values = (torch.cat(parts, dim=-2)[:, :, skipped:] for parts in (body_keys, body_values))
            body_keys, body_values = [body_keys], [body_values]
        head_keys, head_values = self.head_states(kv_offset)
        keys = torch.cat([head_keys, *body_keys, key_states], dim=-2)
        values = torch.cat([head_values, *body_values, value_states], dim=-2)
        self.seen_tokens += key_states.shape[-2]
        self._append(key_states, value_states)
        if not self.record_past:
            self.evict()
        return keys, values

    def _incoming_real(self, count: int, device: torch.device) -> torch.Tensor:
        """bool [batch, count]: which of the `count` tokens just seen are real, from the forward's 2D mask
        (all of them without one, e.g. a restored prefix, or when the mask is not this forward's)."""
        mask, self.incoming_mask = self.incoming_mask, None
        if mask is None or mask.shape[-1] != self.seen_tokens:
            return torch.ones((1, count), dtype=torch.bool, device=device)
        return mask[:, -count:].to(device=device, dtype=torch.bool)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Each row's first `head_tokens` real tokens go to the head (its attention sinks: in a left-padded
        batch a row's first positions are padding), every other token to the body, in order. Padding
        tokens reach a quantized body as a copy of a real token of their row, so that they never widen a
        block's range (they are masked: their values do not matter)."""
        count = key_states.shape[-2]
        real = self._incoming_real(count, key_states.device).expand(key_states.shape[0], -1)
        to_head = min(self.head_tokens - len(self.head), count) if len(self.body) == 0 else 0
        order = torch.sort((~real).byte(), dim=-1, stable=True).indices  # each row's real tokens first
        head_index, body_index = (part.sort(dim=-1).values for part in (order[:, :to_head], order[:, to_head:]))
        for index, store, target in ((head_index, self.head, "head_real"), (body_index, self.body, "body_real")):
            if index.shape[-1] == 0:
                continue
            keys, values = gather_tokens(key_states, index[:, None]), gather_tokens(value_states, index[:, None])
            index_real = real.gather(1, index)
            if store is self.body and self.storage.bits is not None and not bool(index_real.all()):
                keys, values = (_padding_as_first_real(t, index_real) for t in (keys, values))
            store.append(keys, values)
            held = getattr(self, target)
            if self.tracks_padding and (held is not None or not bool(index_real.all())):
                if held is None:  # no padding until now: nothing was recorded
                    held = index_real.new_ones((len(index_real), len(store) - index.shape[-1]))
                setattr(self, target, torch.cat([held.expand(len(index_real), -1), index_real], dim=-1))

    def relabel_padding_mask(self, attention_mask: torch.Tensor, kv_offset: int) -> torch.Tensor:
        """The 2D padding mask with the attended tokens' labels (kv_offset + i) given their true padding
        status: transformers looks padding up by label, and a row's sinks, or tokens kept after its
        padding was dropped, do not sit at their labels."""
        if not self.is_initialized or (self.head_real is None and self.body_real is None):
            return attention_mask  # no padding was ever held: the labels are the positions
        skipped = self.stored_tokens - self.attended_tokens
        batch = attention_mask.shape[0]
        parts = [
            attention_mask.new_ones((batch, len(store)), dtype=torch.bool)
            if record is None
            else record.expand(batch, -1)
            for record, store in ((self.head_real, self.head), (self.body_real, self.body))
        ]
        attended_real = torch.cat(parts, dim=-1)[:, skipped:]
        relabelled = attention_mask.clone()
        relabelled[:, kv_offset : kv_offset + attended_real.shape[-1]] = attended_real.to(attention_mask.dtype)
        return relabelled

    # --- what generate needs ----------------------------------------------------------------------
    def activate_past_recording(self, **kwargs) -> None:
        """Defer eviction until the next `crop`, so that a rollback (assisted decoding) restores it exactly.
        Keywords transformers passes for other layer kinds (5.25: `recurrent_states_to_keep`) do not apply."""
        self.record_past = True

    def crop(self, tokens_to_remove: int, **kwargs) -> None:
        """Remove the newest `-tokens_to_remove` tokens (or keep the first `tokens_to_remove` if > 0), then
        apply any deferred eviction. Raises a ValueError if a token that should come back was evicted."""
        if not self.is_initialized:
            return
        count = self.seen_tokens - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        if count > 0:
            remaining = self.seen_tokens - count
            evicted = self.seen_tokens - self.stored_tokens
            if evicted > self.evicted_after(remaining):
                raise ValueError(
                    f"{type(self).__name__} cannot remove the newest {count} tokens of {self.geometry.describe()}: "
                    f"{evicted - self.evicted_after(remaining)} of the tokens it would have to bring back were "
                    "evicted. Assisted decoding works because it calls `activate_past_recording()` first, which "
                    "defers eviction until `crop`; do the same before a forward you may roll back."
                )
            from_body = min(count, len(self.body))
            self.body.drop_newest(from_body)
            self.head.drop_newest(count - from_body)
            self._forget_padding(head=slice(0, len(self.head)), body=slice(0, len(self.body)))
            self.seen_tokens = remaining
        self.evict()

    def _forget_padding(self, head: slice, body: slice) -> None:
        """Keep the padding record of the head and body tokens still held (`head`/`body`: their ranges)."""
        if self.head_real is not None:
            self.head_real = self.head_real[:, head]
        if self.body_real is not None:
            self.body_real = self.body_real[:, body]

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self.head.map_batch(fn)
            self.body.map_batch(fn)
            for name in ("head_real", "body_real"):
                record = getattr(self, name)
                if record is not None and record.shape[0] > 1:  # one row: shared by the whole batch
                    setattr(self, name, fn(record))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        self.head = self.body = None
        self.head_real = self.body_real = self.incoming_mask = None
        self.seen_tokens = 0
        self.record_past = False
        self.is_initialized = False

    def offload(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    prefetch = offload

    def memory_bytes(self) -> int:
        """Bytes held: codes, scales, minimums, full-precision tensors and padding records, as allocated."""
        if not self.is_initialized:
            return 0
        records = sum(t.nbytes for t in (self.head_real, self.body_real) if t is not None)
        return self.head.nbytes() + self.body.nbytes() + records


def _state_bytes(layer: object) -> int:
    """Bytes of a transformers recurrent layer's conv and recurrent states."""
    states = [*getattr(layer, "conv_states", {}).values(), *getattr(layer, "recurrent_states", {}).values()]
    return sum(t.nbytes for t in states if isinstance(t, torch.Tensor))


def _padding_as_first_real(tensor: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`tensor` [batch, heads, tokens, channels] with every padding token (`real` [batch, tokens] False)
    replaced by the first real token of its row (zeros for a row without one)."""
    first = real.byte().argmax(dim=-1)
    fill = tensor[torch.arange(len(first)), :, first][:, :, None] * real.any(dim=-1)[:, None, None, None]
    return torch.where(real[:, None, :, None], tensor, fill)


class WindowLayer(KVLayer):
    """Keeps the head plus the `window` most recent tokens."""

    def __init__(self, geometry: LayerGeometry, storage: Storage, window: int, head_tokens: int = 0):
        super().__init__(geometry, storage, head_tokens)
        self.window = window

    @property
    def attended_tokens(self) -> int:
        return len(self.head) + min(len(self.body), self.window) if self.is_initialized else 0

    def evicted_after(self, seen: int) -> int:
        return max(0, seen - self.head_tokens - self.window)

    def get_max_length(self) -> int:
        return self.head_tokens + self.window

    def evict(self) -> None:
        excess = len(self.body) - self.window
        if excess > 0:
            self.body.drop_oldest(excess)
            self._forget_padding(head=slice(None), body=slice(excess, None))


class KVCache(Cache):
    """A `transformers.Cache` of `KVLayer`s, one per model layer, built from the per-layer geometry.

    Subclasses give the layer for full-attention layers (`full_attention_layer`). Layers the model
    itself runs with a sliding window (or chunked attention) keep the model's window of
    `window - 1` tokens, exactly as transformers' `DynamicSlidingWindowLayer` does, in the same storage.
    Layers that store nothing (KV shared with another layer) get transformers' `DummyLayer`. Layers that
    keep a running state instead of per-token KV (linear attention, Mamba, convolutions in hybrid models)
    get transformers' own layer for their kind, so they behave exactly as with `DynamicCache` (rollback in
    assisted decoding included): a strategy (quantization, windows, eviction, budgets) applies to the
    attention layers only. Layer kinds no hf_kvcache cache can hold are refused at construction.
    """

    def __init__(self, config: PreTrainedConfig, storage: Storage):
        self.geometry: ModelGeometry = model_geometry(config)
        self.geometry.refuse_unserved(type(self).__name__)
        self.storage = storage
        self._padding_mask: torch.Tensor | None = None
        self._checked_config: PreTrainedConfig | None = config
        self.forward_context = routing.ForwardContext()
        routing.install()
        super().__init__(layers=[self.layer_for(layer) for layer in self.geometry.layers])

    def layer_for(self, layer: LayerGeometry) -> CacheLayerMixin:
        if layer.kind == SHARED_KIND:
            return DummyLayer()
        if layer.keeps_recurrent_state:
            return recurrent_layer_class(layer.kind)(**layer.layer_kwargs)
        storage = self.storage.for_layer(layer)
        if layer.is_windowed:
            return self.windowed_layer(layer, storage, layer.window - 1)
        return self.full_attention_layer(layer, storage)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> KVLayer:
        raise NotImplementedError

    def windowed_layer(self, layer: LayerGeometry, storage: Storage, model_window: int) -> KVLayer:
        window_layer = WindowLayer(layer, storage, window=model_window)
        window_layer.is_sliding = True
        return window_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"{type(self).__name__} was built from a config with {len(self.layers)} layers, but the model updates "
                f"layer {layer_idx}. Build the cache from the config of the model it is used with (`model.config`)."
            )
        routing.drop_mask_request()  # the forward's masks are built: none of its requests outlives them
        if isinstance(self.layers[layer_idx], KVLayer):
            self.layers[layer_idx].incoming_mask = self._padding_mask
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.forward_context.hand_over(keys)  # raises when the previous layer's route was never taken
        return keys, values

    def record_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Called with each forward's 2D padding mask [batch, seen + new] (None: no padding) before any layer
        updates: layers read which new tokens are padding from it."""
        self._padding_mask = attention_mask

    def load(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Append stored KV of tokens no attention runs over now (a prefix restored from a store): held as an
        update would hold it (quantized, windowed), but no attention scores are awaited for it."""
        KVLayer.update(self.layers[layer_idx], key_states, value_states)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # transformers builds every mask of a forward before its first layer runs: nothing of an earlier
        # forward (one interrupted between a layer's update and its attention) may count any more
        kv_length, kv_offset = super().get_mask_sizes(query_length, layer_idx)
        if layer_idx < len(self.layers):
            layer = self.mask_layer(layer_idx)
            self.forward_context.begin(layer.get_seq_length())
            routing.request_mask(routing.MaskRequest(self, layer, kv_offset))
        return kv_length, kv_offset

    def prepare_mask(
        self,
        request: routing.MaskRequest,
        implementation: str,
        attention_mask: torch.Tensor | None,
        kv_offset: int,
        config: PreTrainedConfig | None,
    ) -> tuple[torch.Tensor | None, dict]:
        """Called by the mask function `implementation` that follows `get_mask_sizes`: records the attention
        implementation the model's config names, and returns the padding mask to build from and the mask
        function's extra keyword arguments (`masking.corrected_mask`)."""
        self.forward_context.implementation = getattr(config, "_attn_implementation", None)
        if kv_offset != request.kv_offset:
            return attention_mask, {}
        return corrected_mask(self, request.layer, implementation, attention_mask, kv_offset, config)

    def mask_layer(self, layer_idx: int) -> CacheLayerMixin:
        """The layer whose mask sizes transformers reads for `layer_idx`: that layer, or for a recurrent layer
        (hybrid models ask with index 0) the first attention layer, as `Cache.get_mask_sizes` redirects."""
        if isinstance(self.layers[layer_idx], CacheLayerMixin):
            return self.layers[layer_idx]
        return next(layer for layer in self.layers if isinstance(layer, CacheLayerMixin))

    def check_model_config(self, config: PreTrainedConfig) -> None:
        """Refuse a model whose config gives another geometry than the one this cache was built from (a
        different RoPE, window or layer layout would serve wrongly rotated or windowed KV). Checked once per
        config object: a cache built from `model.config` costs nothing."""
        if config is self._checked_config:
            return
        difference = self.geometry.difference(model_geometry(config))
        if difference:
            raise ValueError(
                f"{type(self).__name__} was built from a config that does not match this model ({difference}). "
                "Build the cache from the config of the model it is used with (`model.config`)."
            )
        self._checked_config = config

    def memory_bytes(self) -> int:
        """Bytes this cache really holds, summed over layers: attention KV and recurrent state (see
        `memory_breakdown`)."""
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes held, apart: `attention` (the attention layers' KV and bookkeeping, what the strategy manages)
        and `recurrent_state` (hybrid models' linear-attention / Mamba / convolution states, held as
        transformers holds them)."""
        attention = sum(layer.memory_bytes() for layer in self.layers if isinstance(layer, KVLayer))
        recurrent = sum(_state_bytes(layer) for layer in self.layers if not isinstance(layer, CacheLayerMixin))
        return {"attention": attention, "recurrent_state": recurrent}

    @property
    def seen_tokens(self) -> int:
        return self.get_seq_length()

    @property
    def stored_tokens(self) -> int:
        return max((layer.stored_tokens for layer in self.layers if isinstance(layer, KVLayer)), default=0)
