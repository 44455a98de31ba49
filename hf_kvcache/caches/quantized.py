"""KIVI-style quantized cache: keys per channel, values per token, recent tokens in full precision."""

import dataclasses
import os

import torch
from transformers import PreTrainedConfig

from hf_kvcache.attention import routing
from hf_kvcache.caches import code_reading
from hf_kvcache.caches.base import KVCache, KVLayer, Storage
from hf_kvcache.geometry import LayerGeometry, model_geometry
from hf_kvcache.quant.packing import check_bits
from hf_kvcache.quant.profile import BitProfile, profile_for_cache
from hf_kvcache.registry import register_cache
from hf_kvcache.validation import check_bool, check_choice, check_int

ATTENTION_MODES = ("auto", "codes", "dequantize")


class CodeReadingLayer(KVLayer):
    """A full-attention layer whose decode steps let attention read the quantized codes (see
    `hf_kvcache.caches.code_reading`): for a query of at most `MAX_QUERY_LENGTH` tokens under `sdpa`, `update`
    appends the new tokens and returns placeholders instead of concatenating the whole cache in full
    precision. Otherwise (prefill, other attention implementations, before the model has shown that its
    attention receives the cache's tensors unchanged) it is a plain `KVLayer`.
    """

    def __init__(
        self,
        geometry: LayerGeometry,
        storage: Storage,
        head_tokens: int,
        forward_context: routing.ForwardContext,
        compiled: bool,
    ):
        super().__init__(geometry, storage, head_tokens)
        self.forward_context, self.compiled = forward_context, compiled
        self.attention_confirmed = False

    def reads_codes(self, key_states: torch.Tensor) -> bool:
        """Whether this update may return placeholders: a short query, in a forward whose mask function
        named `sdpa` (still wrapped), in a layer whose model passed its returned tensors to the wrapper."""
        return (
            self.attention_confirmed
            and key_states.shape[-2] <= code_reading.MAX_QUERY_LENGTH
            and self.forward_context.implementation == "sdpa"
            and self.forward_context.seen == self.seen_tokens
            and routing.installed()
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reads_codes(key_states):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            if not self.attention_confirmed:
                keys = routing.tag(keys, code_reading.ProbeRoute(self))
            return keys, values
        head_keys, head_values = self.head_states(self.seen_tokens - self.attended_tokens)
        view = code_reading.CodeView(
            head_keys,
            head_values,
            self.body.snapshot(),
            key_states,
            value_states,
            self.geometry.learned_sinks,
            self.compiled,
        )
        self.seen_tokens += key_states.shape[-2]
        self._append(key_states, value_states)
        if not self.record_past:
            self.evict()
        return code_reading.placeholders(view)


class QuantizedCache(KVCache):
    """A drop-in `Cache` that holds keys and values in `bits`-bit codes (2, 3, 4 or 8).

    Args:
        config: the model config (decoder LM).
        bits: code width; 2, 3, 4 or 8.
        group_size: tokens per key block and channels per value group (must divide every layer's value
            channels); None picks the largest divisor up to 32 per layer (32 for head sizes 64/96/128).
        residual_length: recent tokens kept in full precision before their block is quantized.
        sink_tokens: first tokens kept in full precision for the whole generation (attention sinks).
        rotate: apply an orthonormal rotation to the channels before quantizing (Hadamard for a power-of-two
            head size, Hadamard x DCT otherwise; see `hf_kvcache.quant.rotation`).
        key_bits: the keys' code width when it differs from the values' (`bits`); None: `bits`.
        key_group_size: tokens per key block when it differs from `group_size` (smaller blocks follow
            the keys' per-channel ranges more closely, for more statistics); None: `group_size`.
        key_outliers: key elements per channel and key block kept apart in full precision, those farthest
            from the block's median (dense-and-sparse, KVQuant: https://arxiv.org/abs/2401.18079); each costs
            one value in the model's dtype and one byte of position. 0 (default): none.
        codebook: where the levels sit between a group's minimum and maximum: "uniform" (default: evenly
            spaced) or "normal" (at normal quantiles, denser near the middle; `hf_kvcache.quant.groupwise`).
        attention: how decode steps attend the quantized tokens. "codes": attention reads the packed codes
            (`hf_kvcache.caches.code_reading`: query-side folding of rotation, scales and minimums; no full-precision
            copy of the cache); "dequantize": every step dequantizes all blocks and concatenates the cache (the
            reference path); "auto" (default): "codes", the faster path at every length measured by
            `benchmarks/decode.py` (results/decode.json: 0.8-1.1x DynamicCache vs 0.2-0.6x on CPU). Codes are read only where certain to be exact: `sdpa`
            models, queries of at most 8 tokens, value groups holding whole packed words (3-bit values need
            groups of a multiple of 8 channels), no `key_outliers`, the uniform codebook; elsewhere the cache dequantizes.
        compile_attention: fuse the code unpacking into the attention reductions with `torch.compile`
            (inductor; compiled once per shape class, eager with one warning if compilation fails).
        profile: per-layer key and value widths (KVTuner-style, `hf_kvcache.quant.profile.BitProfile`, or the
            path of one saved as JSON, e.g. by `hf-kvcache calibrate`); they replace `bits` in every layer, and
            cannot be combined with `key_bits`. A profile calibrated with other settings (group sizes,
            residual_length, sink_tokens, rotate, key_outliers, codebook) is used with a warning naming them.

    Blocks are quantized once, when complete, and never re-quantized. `crop` removes the newest tokens at
    any depth (the remaining codes keep their statistics), so assisted and prompt-lookup decoding work.

    Source: KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750.

    Raises:
        ValueError: `bits` not in 2/3/4/8, a `group_size` that does not divide some layer's channels, a layer
            kind no cache can hold (linear attention, state-space), naming the layer; `attention` not one of
            "auto", "codes", "dequantize"; a `profile` for another layer count (naming both counts), or with
            `key_bits`.
        OSError: a `profile` path that cannot be read.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        bits: int = 4,
        group_size: int | None = None,
        residual_length: int = 128,
        sink_tokens: int = 4,
        rotate: bool = True,
        key_bits: int | None = None,
        key_group_size: int | None = None,
        key_outliers: int = 0,
        codebook: str = "uniform",
        attention: str = "auto",
        compile_attention: bool = True,
        profile: BitProfile | str | os.PathLike | None = None,
    ):
        check_bits(bits)  # None (full precision) is not a quantized cache
        check_int("sink_tokens", sink_tokens)
        check_choice("attention", attention, ATTENTION_MODES)
        check_bool("compile_attention", compile_attention)
        self.sink_tokens = sink_tokens
        self.attention = attention
        self.compile_attention = compile_attention
        settings = dict(group_size=group_size, key_group_size=key_group_size, residual_length=residual_length)
        settings.update(sink_tokens=sink_tokens, rotate=rotate, key_outliers=key_outliers, codebook=codebook)
        self.profile = profile_for_cache(profile, len(model_geometry(config).layers), key_bits, settings)
        storage = Storage(
            bits,
            group_size,
            residual_length,
            rotate,
            key_bits=key_bits,
            key_group_size=key_group_size,
            key_outliers=key_outliers,
            codebook=codebook,
        )
        super().__init__(config, storage)

    def layer_storage(self, layer: LayerGeometry, storage: Storage) -> Storage:
        """`storage` (resolved for `layer`) at the profile's widths for this layer, when there is a profile."""
        if self.profile is None:
            return storage
        widths = dict(bits=self.profile.value_bits[layer.index], key_bits=self.profile.key_bits[layer.index])
        return dataclasses.replace(storage, **widths).for_layer(layer)

    def windowed_layer(self, layer: LayerGeometry, storage: Storage, model_window: int) -> KVLayer:
        return super().windowed_layer(layer, self.layer_storage(layer, storage), model_window)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> KVLayer:
        storage = self.layer_storage(layer, storage)
        reads_codes = (
            code_reading.plane_aligned(storage.bits, storage.group_size)
            and not storage.key_outliers
            and storage.codebook == "uniform"
        )
        if self.attention == "dequantize" or not reads_codes:
            return KVLayer(layer, storage, head_tokens=self.sink_tokens)
        return CodeReadingLayer(layer, storage, self.sink_tokens, self.forward_context, self.compile_attention)


register_cache("quantized", QuantizedCache, "KIVI-style quantized keys (per channel) and values (per token)")
