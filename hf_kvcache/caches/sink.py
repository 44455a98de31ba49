"""Attention-sink (StreamingLLM) cache: the first `sink_tokens` tokens plus the last `window` tokens.

Sink keys are kept as first rotated and, on every read, rotated by the total shift that puts them
right before the window (`Rope.shift` of each layer), so positions inside the cache stay bounded.
"""

import torch
from transformers import PreTrainedConfig

from hf_kvcache.caches.base import KVCache, KVLayer, Storage, WindowLayer
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.registry import register_cache
from hf_kvcache.validation import check_bool, check_int


class SinkLayer(WindowLayer):
    """A window layer whose head (the sinks) is re-rotated to sit just before the window.

    The rotation is the layer's own (`geometry.rope`): a layer without RoPE (`positions == "none"`)
    keeps its sinks as they are, which is exact, since its keys carry no position; with `rerotate=False`
    every layer keeps them at their original positions.
    """

    def __init__(self, geometry: LayerGeometry, storage: Storage, window: int, sink_tokens: int, rerotate: bool):
        super().__init__(geometry, storage, window=window, head_tokens=sink_tokens)
        self.rope = geometry.rope if rerotate else None

    def head_states(self, kv_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Stored token i is labelled position kv_offset + i; sink i was rotated for position i.
        keys, values = self.head.keys, self.head.values
        if self.rope is None:
            return keys, values
        if self.rope.slot == "keys":
            return self.rope.shift(keys, kv_offset), values
        return keys, self.rope.shift(values, kv_offset)


class SinkCache(KVCache):
    """StreamingLLM: keeps `sink_tokens` initial tokens and the `window` most recent ones per layer.

    Source: Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
    https://arxiv.org/abs/2309.17453.

    Args:
        config: the model config (decoder LM with rotary embeddings, unless `rerotate=False`).
        sink_tokens: initial tokens kept for the whole generation (full precision).
        window: recent tokens kept.
        bits: None for full precision, or 2/3/4/8 to hold the window in `QuantizedCache`'s format
            (`group_size`, `residual_length`, `rotate` as there). Sinks stay in full precision.
        rerotate: re-rotate sink keys to sit just before the window, each layer with its own RoPE
            (layers without RoPE need none). With False, sinks keep the rotation of their original
            positions (for models whose positions are not rotary: GPT-2, ALiBi).

    Raises:
        ValueError: bad parameters; `rerotate=True` on a model without RoPE, or with a RoPE that cannot be
            shifted (multimodal 3-D RoPE, an unknown rope_type), naming the layer.

    A query of a multi-token forward sees the sinks, the window kept before the forward, and every
    earlier token of the same forward. Left padding is supported with sdpa and eager attention: padding
    sinks stay masked, so a padded row has fewer real sinks (its first `sink_tokens` positions count).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        sink_tokens: int = 4,
        window: int = 1020,
        bits: int | None = None,
        group_size: int | None = None,
        residual_length: int = 128,
        rotate: bool = True,
        rerotate: bool = True,
    ):
        check_int("sink_tokens", sink_tokens)
        check_int("window", window, minimum=1)
        check_bool("rerotate", rerotate)
        if window < sink_tokens:
            raise ValueError(
                f"window={window} is smaller than sink_tokens={sink_tokens}: `window` counts the recent tokens "
                "kept besides the sinks (the cache holds sink_tokens + window tokens). Use window >= sink_tokens, "
                "e.g. sink_tokens=4, window=1020."
            )
        self.sink_tokens, self.window, self.rerotate = sink_tokens, window, rerotate
        super().__init__(config, Storage(bits, group_size, residual_length, rotate))

    def layer_for(self, layer: LayerGeometry):
        if self.rerotate and layer.is_attention and self.sink_tokens:
            if layer.positions == "absolute":
                raise ValueError(
                    f"SinkCache: {self.geometry.model_type} {layer.describe()} has no rotary position embedding "
                    "(its positions are absolute embeddings or ALiBi biases), so sink keys cannot be re-rotated; "
                    "pass rerotate=False to keep them at their original positions"
                )
            if layer.positions == "rope" and layer.rope is None:
                raise ValueError(
                    f"SinkCache: {self.geometry.model_type} {layer.describe()} cannot re-rotate its sinks: "
                    f"{layer.rope_problem}; pass rerotate=False to keep them at their original positions"
                )
        return super().layer_for(layer)

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> KVLayer:
        return SinkLayer(layer, storage, self.window, self.sink_tokens, self.rerotate)

    def windowed_layer(self, layer: LayerGeometry, storage: Storage, model_window: int) -> KVLayer:
        # The model masks keys further than its window; keep sinks + window inside it.
        window = min(self.window, model_window - self.sink_tokens)
        if window < 1:
            raise ValueError(
                f"sink_tokens={self.sink_tokens} leaves no room in the model's sliding window of "
                f"{model_window + 1} tokens ({layer.describe()}); use fewer sink tokens"
            )
        sink_layer = SinkLayer(layer, storage, window, self.sink_tokens, self.rerotate)
        sink_layer.is_sliding = True
        return sink_layer


register_cache("sink", SinkCache, "StreamingLLM: `sink_tokens` first tokens + last `window` tokens, re-rotated")
