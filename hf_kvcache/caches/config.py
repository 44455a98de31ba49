"""What a cache needs to know about a model, read (and checked) from its config."""

from dataclasses import dataclass

from transformers import PreTrainedConfig

# transformers layer types whose cache keeps a bounded window of recent tokens.
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")
FULL_LAYER_TYPES = ("full_attention",)


@dataclass(frozen=True)
class ModelGeometry:
    """Per-model facts shared by every cache: layer kinds, KV heads and head size."""

    layer_types: tuple[str, ...]
    layer_windows: tuple[int | None, ...]  # the model's own window per layer (None for full attention)
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)


def model_geometry(config: PreTrainedConfig) -> ModelGeometry:
    """Read layer types, KV heads and head dim from a decoder LM config, or raise a ValueError."""
    if not isinstance(config, PreTrainedConfig):
        raise ValueError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"config is an encoder-decoder config ({config.model_type}); hf_kvcache caches support decoder-only LMs"
        )
    text = config.get_text_config(decoder=True)
    missing = [name for name in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not hasattr(text, name)]
    if missing:
        raise ValueError(
            f"config ({type(config).__name__}) is not a decoder language-model config: it has no {', '.join(missing)}"
        )
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads

    # Local import: this helper is internal to transformers and only needed here.
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    unsupported = sorted(set(layer_types) - set(WINDOWED_LAYER_TYPES) - set(FULL_LAYER_TYPES))
    if unsupported:
        raise ValueError(
            f"config has layer types {unsupported} that hf_kvcache caches do not support; supported layer types: "
            f"{', '.join(FULL_LAYER_TYPES + WINDOWED_LAYER_TYPES)}"
        )
    windows = tuple(kwargs.get("sliding_window") for kwargs in layer_kwargs)
    return ModelGeometry(tuple(layer_types), windows, kv_heads, head_dim)
