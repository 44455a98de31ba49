"""Sliding-window cache: keep the last `window` tokens of every layer, for any decoder model."""

from transformers import PreTrainedConfig

from hf_kvcache.caches.base import KVCache, KVLayer, Storage, WindowLayer
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.registry import register_cache
from hf_kvcache.validation import check_int


class SlidingWindowCache(KVCache):
    """Keeps the `window` most recent tokens in every layer, whatever the model config says.

    Kept tokens are contiguous, so positions need no re-rotation and left padding is masked exactly as
    with `DynamicCache`. `bits=2|3|4|8` holds the window in `QuantizedCache`'s format (`group_size`,
    `residual_length`, `rotate` as there); eviction is per token, also inside quantized blocks.
    In a multi-token forward (prefill, chunks), each query sees the window kept before the forward
    plus every earlier token of the same forward; the window is applied after the forward.

    Source: the window-attention baseline of Xiao et al. 2023 (StreamingLLM), https://arxiv.org/abs/2309.17453;
    sliding-window attention as in Beltagy et al. 2020 (Longformer), https://arxiv.org/abs/2004.05150.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        window: int = 1024,
        bits: int | None = None,
        group_size: int | None = None,
        residual_length: int = 128,
        rotate: bool = True,
    ):
        check_int("window", window, minimum=1)
        self.window = window
        super().__init__(config, Storage(bits, group_size, residual_length, rotate))

    def full_attention_layer(self, layer: LayerGeometry, storage: Storage) -> KVLayer:
        return WindowLayer(layer, storage, window=self.window)

    def windowed_layer(self, layer: LayerGeometry, storage: Storage, model_window: int) -> KVLayer:
        return super().windowed_layer(layer, storage, min(model_window, self.window))


register_cache("window", SlidingWindowCache, "keep the last `window` tokens (optionally quantized with bits)")
