"""KIVI-style quantized cache: keys per channel, values per token, recent tokens in full precision."""

from transformers import PreTrainedConfig

from hf_kvcache.caches.base import KVCache, KVLayer, Storage
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.quant.packing import check_bits
from hf_kvcache.registry import register_cache
from hf_kvcache.validation import check_int


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

    Blocks are quantized once, when complete, and never re-quantized. `crop` removes the newest tokens at
    any depth (the remaining codes keep their statistics), so assisted and prompt-lookup decoding work.

    Source: KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750.

    Raises:
        ValueError: `bits` not in 2/3/4/8, a `group_size` that does not divide some layer's channels, a layer
            kind no cache can hold (linear attention, state-space), naming the layer.
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
    ):
        check_bits(bits)  # None (full precision) is not a quantized cache
        check_int("sink_tokens", sink_tokens)
        self.sink_tokens = sink_tokens
        storage = Storage(bits, group_size, residual_length, rotate, key_bits=key_bits, key_group_size=key_group_size)
        super().__init__(config, storage)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> KVLayer:
        return KVLayer(layer, storage, head_tokens=self.sink_tokens)


register_cache("quantized", QuantizedCache, "KIVI-style quantized keys (per channel) and values (per token)")
