"""KIVI-style quantized cache: keys per channel, values per token, recent tokens in full precision."""

from transformers import PreTrainedConfig

from hf_kvcache.caches.base import KVCache, KVLayer, Storage, check_non_negative
from hf_kvcache.registry import register_cache


class QuantizedCache(KVCache):
    """A drop-in `Cache` that holds keys and values in `bits`-bit codes (2, 3, 4 or 8).

    Args:
        config: the model config (decoder LM).
        bits: code width; 2, 3, 4 or 8.
        group_size: tokens per key block and channels per value group (must divide the head dim).
        residual_length: recent tokens kept in full precision before their block is quantized.
        sink_tokens: first tokens kept in full precision for the whole generation (attention sinks).
        rotate: apply an orthonormal Hadamard rotation to the head dimension before quantizing.

    Blocks are quantized once, when complete, and never re-quantized.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        bits: int = 4,
        group_size: int = 32,
        residual_length: int = 128,
        sink_tokens: int = 4,
        rotate: bool = True,
    ):
        check_non_negative(sink_tokens=sink_tokens)
        self.sink_tokens = sink_tokens
        super().__init__(config, Storage(bits, group_size, residual_length, rotate))

    def full_attention_layer(self) -> KVLayer:
        return KVLayer(self.storage, head_tokens=self.sink_tokens)


register_cache("quantized", QuantizedCache, "KIVI-style quantized keys (per channel) and values (per token)")
