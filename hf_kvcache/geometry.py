"""Per-layer model geometry, resolved once from the config: the one place that reads a model's layout.

Layers differ within one model (DESIGN.md section 3): attention kind and window, KV heads, key and
value sizes (Gemma 4's global layers, DeepSeek-V3's latent MLA cache), the RoPE of each layer kind
(Gemma 3: local base 1e4, global 1e6), layers without RoPE (SmolLM3's `no_rope_layers`, Cohere 2's and
EXAONE 4's global layers), the RoPE channel layout, and attention extras (learned sink logits,
softcapping, scaling). Caches, sink re-rotation and score capture read `LayerGeometry`; nothing else
reads `config.head_dim` or a global RoPE.
"""

import importlib
import warnings
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedConfig, cache_utils

from hf_kvcache.rope import Rope, inverse_frequencies

# transformers layer types, as `get_layer_types_and_kwargs` reports them.
FULL_ATTENTION = "full_attention"
WINDOWED_KINDS = ("sliding_attention", "chunked_attention")
ATTENTION_KINDS = (FULL_ATTENTION, *WINDOWED_KINDS)
SHARED_KIND = "dummy"  # a layer that stores nothing: it reads another layer's KV, or has no attention
# transformers' own cache layer class for each layer kind (5.25; older versions map fewer kinds)
_TRANSFORMERS_LAYERS: dict[str, type] = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})
_RECURRENT_MIXIN = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
# Why a layer kind that holds per-token state beside its KV (or none at all) is not served.
_UNSERVED_REASONS = {
    "indexed_attention": (
        "its sparse attention reads only the tokens an indexer selects, by per-token indexer keys the cache holds "
        "beside the KV; quantizing or evicting the KV without those keys in lockstep would change which tokens it "
        "reads, and hf_kvcache does not hold indexer keys"
    ),
    "compressed_sparse_attention": "it keeps compressed KV blocks of its own design, not per-token keys and values",
    "heavily_compressed_attention": "it keeps compressed KV blocks of its own design, not per-token keys and values",
}


def recurrent_layer_class(kind: str) -> type | None:
    """transformers' cache layer for `kind` when that layer holds only a recurrent state (linear attention,
    Mamba, short convolutions: no per-token keys and values), else None. Read from transformers itself, so a
    new recurrent kind is recognised without a list here."""
    layer_class = _TRANSFORMERS_LAYERS.get(kind)
    if layer_class is None or _RECURRENT_MIXIN is None or not issubclass(layer_class, _RECURRENT_MIXIN):
        return None
    return None if issubclass(layer_class, cache_utils.CacheLayerMixin) else layer_class


# The RoPE pair layout is read from the model's own code: its modeling module's `rotate_half` (or GPT-J's
# `rotate_every_two`), applied to a probe (`_pair_layout`). These families rotate without such a function
# (complex multiplication, or an inline split), checked by the per-family shift test in tests/test_geometry.py.
ROPE_LAYOUT_WITHOUT_ROTATE_FUNCTION = {
    "llama4": "interleaved",
    "llama4_text": "interleaved",
    "deepseek_v2": "interleaved",
    "gpt_oss": "half",
}
# Models whose RoPE predates `rope_parameters`: `rotary_dim` channels, base 10000 (GPT-J's sinusoids).
ROTARY_DIM_MODELS = ("gptj", "codegen")
# Models whose global (non-sliding) layers use no RoPE when the model also has sliding layers.
NOPE_GLOBAL_LAYER_MODELS = ("cohere2", "cohere2_moe", "flint", "exaone4", "exaone4_5", "exaone_moe", "kolibri1")
# Models with learned per-head sink logits that join the softmax (GPT-OSS).
LEARNED_SINK_MODELS = ("gpt_oss",)


@dataclass(frozen=True, eq=False)
class LayerGeometry:
    """What a cache must know about one model layer.

    `kind`: a transformers layer type ("full_attention", "sliding_attention", "chunked_attention",
    "dummy" for a layer that stores nothing, a recurrent kind such as "linear_attention" or "conv", held
    exactly as transformers holds it, or a kind no hf_kvcache cache serves such as "indexed_attention").
    `layer_kwargs`: what transformers passes to its own cache layer for this kind (`number_of_states`). `window`: the model's own window (sliding/chunked layers). `key_dim`/`value_dim`:
    channels of the cached key and value tensors. `positions`: "rope" (see `rope`), "none" (keys carry no
    position: re-rotation is the identity) or "absolute" (positions enter elsewhere, e.g. GPT-2's
    position embeddings or ALiBi: cached keys cannot be moved). `rope_problem`: why this layer's RoPE
    cannot be re-rotated, when it cannot.
    """

    index: int
    kind: str
    window: int | None
    kv_heads: int
    key_dim: int
    value_dim: int
    positions: str
    rope: Rope | None = None
    rope_problem: str | None = None
    softcap: float | None = None
    learned_sinks: bool = False
    layer_kwargs: dict = field(default_factory=dict)

    @property
    def is_attention(self) -> bool:
        return self.kind in ATTENTION_KINDS

    @property
    def keeps_recurrent_state(self) -> bool:
        """A layer with a running state and no per-token KV (linear attention, Mamba, convolution)."""
        return recurrent_layer_class(self.kind) is not None

    @property
    def is_windowed(self) -> bool:
        return self.kind in WINDOWED_KINDS

    def describe(self) -> str:
        return f"layer {self.index} ({self.kind})"


@dataclass(frozen=True)
class ModelGeometry:
    """Every layer's `LayerGeometry`, in model order, the model type they were read from, and the layers that
    attend to another input (Mllama's `cross_attention_layers`)."""

    model_type: str
    layers: tuple[LayerGeometry, ...]
    cross_attention_layers: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def difference(self, other: "ModelGeometry") -> str | None:
        """The first fact in which `other` differs from this geometry, described, or None if they agree."""
        if self.num_layers != other.num_layers:
            return f"{self.num_layers} layers here, {other.num_layers} in the model"
        for mine, theirs in zip(self.layers, other.layers):
            for name in ("kind", "window", "kv_heads", "key_dim", "value_dim", "positions"):
                if getattr(mine, name) != getattr(theirs, name):
                    return f"{mine.describe()}: {name} {getattr(mine, name)} here, {getattr(theirs, name)} in the model"
            if (mine.rope is None) != (theirs.rope is None) or (
                mine.rope is not None
                and (
                    (mine.rope.layout, mine.rope.slot) != (theirs.rope.layout, theirs.rope.slot)
                    or not torch.equal(mine.rope.inv_freq, theirs.rope.inv_freq)
                )
            ):
                return f"{mine.describe()}: its rotary embedding (frequencies or layout) differs from the model's"
        return None

    @property
    def cached_layers(self) -> tuple[LayerGeometry, ...]:
        """The layers that hold KV of their own (not those that read another layer's)."""
        return tuple(layer for layer in self.layers if layer.kind != SHARED_KIND)

    @property
    def cached_kv_sizes(self) -> tuple[tuple[int, int, int], ...]:
        """(kv_heads, key channels, value channels) of every cached layer."""
        return tuple((layer.kv_heads, layer.key_dim, layer.value_dim) for layer in self.cached_layers)

    @property
    def recurrent_layers(self) -> tuple[LayerGeometry, ...]:
        """The layers that keep a running state instead of per-token KV (hybrid models)."""
        return tuple(layer for layer in self.layers if layer.keeps_recurrent_state)

    def refuse_unserved(self, cache_name: str) -> None:
        """Raise a ValueError naming the first layer whose kind no hf_kvcache cache can hold, and why."""
        if self.cross_attention_layers:
            raise ValueError(
                f"{cache_name} cannot serve {self.model_type}: its cross-attention layers "
                f"{list(self.cross_attention_layers)} keep another input's keys and values (an image's) in the cache, "
                "and the model reads them from the cache's layers directly. Use transformers' DynamicCache for it."
            )
        for layer in self.layers:
            if layer.is_attention or layer.kind == SHARED_KIND or layer.keeps_recurrent_state:
                continue
            reason = _UNSERVED_REASONS.get(layer.kind)
            if reason is None:
                layer_class = _TRANSFORMERS_LAYERS.get(layer.kind)
                if (
                    layer_class is not None
                    and _RECURRENT_MIXIN is not None
                    and issubclass(layer_class, _RECURRENT_MIXIN)
                ):
                    reason = (
                        "it holds a recurrent state and attention KV in one layer, which hf_kvcache does not split "
                        "into a state held as transformers holds it and KV held by the cache"
                    )
                else:
                    reason = "transformers' caches know no such layer kind here"
            raise ValueError(
                f"{cache_name} cannot serve {self.model_type} {layer.describe()}: {reason}. hf_kvcache caches serve "
                f"layers of kind {', '.join(ATTENTION_KINDS)} with their strategy and hold recurrent layers (linear "
                "attention, Mamba, convolution) as transformers does. Use transformers' DynamicCache for this model."
            )
        if not any(layer.is_attention for layer in self.layers):
            raise ValueError(
                f"{cache_name} cannot serve {self.model_type}: it has no attention layer (layer kinds "
                f"{', '.join(sorted({layer.kind for layer in self.layers}))}), so there are no keys and values for a "
                "KV-cache strategy to hold. Use transformers' DynamicCache for this model."
            )


def layers_without_per_token_kv(config: PreTrainedConfig) -> list[str]:
    """The layer kinds of `config`'s decoder that hold more than per-token keys and values of attention (a
    recurrent state, indexer keys, compressed blocks): a cache filled with restored KV alone would be wrong
    there. Empty for a plain attention model."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return sorted({kind for kind in layer_types if kind not in ATTENTION_KINDS and not _stores_nothing(kind)})


def _stores_nothing(kind: str) -> bool:
    """A layer kind transformers keeps no cache for (KV shared with another layer; older names "moe", "mlp")."""
    return kind == SHARED_KIND or _TRANSFORMERS_LAYERS.get(kind) is getattr(cache_utils, "DummyLayer", None)


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    if not isinstance(config, PreTrainedConfig):
        raise ValueError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"config is an encoder-decoder config ({config.model_type}): hf_kvcache caches cannot serve it, they "
            "serve decoder-only LMs"
        )
    text = config.get_text_config(decoder=True)
    missing = [] if hasattr(text, "num_hidden_layers") else ["num_hidden_layers"]
    if not missing:  # per-layer attributes are read from a layer's view (heterogeneous configs refuse the global)
        first_layer = _layer_configs(text)[0]
        missing = [name for name in ("num_attention_heads", "hidden_size") if not hasattr(first_layer, name)]
    if missing:
        raise ValueError(
            f"config ({type(config).__name__}) is not a decoder language-model config with attention: it has no "
            f"{', '.join(missing)} (state-space models such as Mamba keep a recurrent state, not per-token keys "
            "and values; use transformers' own cache for them)"
        )
    return text


def _layer_configs(text: PreTrainedConfig) -> list[PreTrainedConfig]:
    """One config view per layer (transformers' heterogeneous per-layer configs, else the config itself)."""
    views = getattr(text, "per_layer_config", None)
    return list(views) if views is not None else [text] * text.num_hidden_layers


def _caches_mla_latent(text: PreTrainedConfig) -> bool:
    """DeepSeek-style multi-head latent attention whose cache holds the compressed latent (transformers 5.24:
    the key slot holds the position-free latent, the value slot the shared rotated key part)."""
    first_layer = _layer_configs(text)[0]
    if getattr(first_layer, "kv_lora_rank", None) is None or getattr(first_layer, "qk_rope_head_dim", None) is None:
        return False
    try:
        modeling = importlib.import_module(f"transformers.models.{text.model_type}.modeling_{text.model_type}")
    except ImportError:
        return False
    return any(hasattr(cls, "expand_kv") for cls in vars(modeling).values() if isinstance(cls, type))


def _has_rope(text: PreTrainedConfig, index: int, kind: str, layer_types: list[str]) -> bool:
    """Whether layer `index` applies RoPE, for a model that has RoPE at all."""
    if (flags := getattr(text, "no_rope_layers", None)) is not None:
        return bool(flags[index])
    if text.model_type in NOPE_GLOBAL_LAYER_MODELS and "sliding_attention" in layer_types:
        return kind == "sliding_attention" or bool(getattr(text, "force_rope", False))
    params = getattr(text, "rope_parameters", None) or {}
    return not (kind in params and params[kind] is None)  # RoPE parameters per layer kind, none for this one (Ergo)


def _positions(text: PreTrainedConfig) -> str:
    """Whether the model rotates keys ("rope"; some layers may still skip it) or not ("absolute")."""
    if getattr(text, "alibi", False):  # Falcon with ALiBi still carries RoPE parameters it does not use
        return "absolute"
    has_rope = bool(getattr(text, "rope_parameters", None)) or text.model_type in ROTARY_DIM_MODELS
    return "rope" if has_rope else "absolute"


def _rope_parameters(text: PreTrainedConfig, kind: str) -> tuple[dict, str | None]:
    """This layer kind's RoPE parameters and the layer type they were filed under (None: shared by all)."""
    if text.model_type in ROTARY_DIM_MODELS:
        return {"rope_type": "default", "rope_theta": 10000.0}, None
    params = getattr(text, "rope_parameters", None) or {}
    nested_kind = kind if kind in params else FULL_ATTENTION
    if isinstance(params.get(nested_kind), dict):
        return params[nested_kind], nested_kind
    return params, None


def _rope(text: PreTrainedConfig, kind: str, rotated_dim: int, slot: str) -> tuple[Rope | None, str | None]:
    """The layer's `Rope`, or None and the reason it cannot be re-rotated."""
    params, layer_type = _rope_parameters(text, kind)
    if "mrope_section" in params or params.get("rope_type") == "mrope":
        return None, "multimodal RoPE (3-D positions, Qwen2-VL style) cannot be shifted by one token offset"
    try:
        inv_freq = inverse_frequencies(text, params, rotated_dim, layer_type)
    except (ValueError, KeyError, TypeError) as error:
        return None, f"its RoPE ({params.get('rope_type', 'default')}) could not be resolved: {error}"
    layout, problem = _pair_layout(text)
    if layout is None:
        return None, problem
    return Rope(inv_freq, layout=layout, slot=slot), None


def _modeling_module(config: PreTrainedConfig) -> object | None:
    """The modeling module beside the config's class (`...configuration_x` -> `...modeling_x`), if importable."""
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _pair_layout(text: PreTrainedConfig) -> tuple[str | None, str | None]:
    """("half" | "interleaved", None) as the model's own rotate function pairs channels, or (None, why not)."""
    module = _modeling_module(text)
    rotate = getattr(module, "rotate_half", None) or getattr(module, "rotate_every_two", None)
    if rotate is None:
        if text.model_type in ROPE_LAYOUT_WITHOUT_ROTATE_FUNCTION:
            return ROPE_LAYOUT_WITHOUT_ROTATE_FUNCTION[text.model_type], None
        return None, (
            f"its rotary code could not be read: the modeling module of {text.model_type} has no rotate_half or "
            "rotate_every_two function, so the channel pairs its RoPE rotates are unknown"
        )
    probe = torch.arange(1.0, 9.0).view(1, 1, 1, 8)
    rotated = rotate(probe.clone())
    if torch.equal(rotated, torch.cat([-probe[..., 4:], probe[..., :4]], dim=-1)):
        return "half", None
    if torch.equal(rotated, torch.stack([-probe[..., 1::2], probe[..., 0::2]], dim=-1).flatten(-2)):
        return "interleaved", None
    return (
        None,
        f"its rotary code ({module.__name__}.{rotate.__name__}) pairs channels in a layout hf_kvcache does not know",
    )


def _kv_heads(text: PreTrainedConfig, layer: PreTrainedConfig) -> int:
    """KV heads of the cached tensors."""
    if text.model_type == "falcon":  # multi-query (Falcon-7B) caches 1 head; the new architecture all heads
        if layer.new_decoder_architecture or not layer.multi_query:
            return layer.num_attention_heads if layer.new_decoder_architecture else layer.num_kv_heads
        return 1
    return getattr(layer, "num_key_value_heads", None) or layer.num_attention_heads


def _channels(text: PreTrainedConfig, layer: PreTrainedConfig, mla_latent: bool) -> tuple[int, int, int, int, str]:
    """KV heads, key and value channels of the cached tensors, rotated channels, and the slot they sit in."""
    if mla_latent:
        return 1, layer.kv_lora_rank, layer.qk_rope_head_dim, layer.qk_rope_head_dim, "values"
    kv_heads = _kv_heads(text, layer)
    head_dim = getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads
    rotated = (getattr(layer, "rotary_dim", None) or head_dim) if text.model_type in ROTARY_DIM_MODELS else head_dim
    return kv_heads, head_dim, head_dim, rotated, "keys"


def model_geometry(config: PreTrainedConfig) -> ModelGeometry:
    """Resolve every layer's geometry from a decoder LM config, or raise a ValueError naming what is wrong."""
    text = _text_config(config)
    # Local import: this helper is internal to transformers (it also maps KV-sharing layers to "dummy").
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    has_rope = _positions(text) == "rope"
    mla_latent = _caches_mla_latent(text)
    layers = []
    for index, (kind, kwargs, layer) in enumerate(zip(layer_types, layer_kwargs, _layer_configs(text))):
        if _stores_nothing(kind):
            kind = SHARED_KIND
        kv_heads, key_dim, value_dim, rotated_dim, slot = _channels(text, layer, mla_latent)
        rope, rope_problem, positions = None, None, "absolute"
        if has_rope:
            positions = "rope" if _has_rope(text, index, kind, layer_types) else "none"
            if positions == "rope":
                rope, rope_problem = _rope(text, kind, rotated_dim, slot)
        layers.append(
            LayerGeometry(
                index=index,
                kind=kind,
                window=kwargs.get("sliding_window"),
                kv_heads=kv_heads,
                key_dim=key_dim,
                value_dim=value_dim,
                positions=positions,
                rope=rope,
                rope_problem=rope_problem,
                softcap=getattr(layer, "attn_logit_softcapping", None),
                learned_sinks=text.model_type in LEARNED_SINK_MODELS,
                layer_kwargs=dict(kwargs),
            )
        )
    return ModelGeometry(text.model_type, tuple(layers), tuple(getattr(text, "cross_attention_layers", None) or ()))


def RopeRotator(config: PreTrainedConfig, layer_index: int = 0) -> Rope:
    """Deprecated: the `Rope` of one layer. RoPE differs per layer (Gemma 3's local and global bases, NoPE
    layers); use `hf_kvcache.geometry.model_geometry(config).layers[i].rope`.

    Raises:
        ValueError: the layer has no RoPE that can be shifted (the reason is named).
    """
    warnings.warn(
        "RopeRotator(config) is deprecated: RoPE differs per layer; use "
        "hf_kvcache.geometry.model_geometry(config).layers[i].rope",
        DeprecationWarning,
        stacklevel=2,
    )
    layer = model_geometry(config).layers[layer_index]
    if layer.rope is None:
        reason = layer.rope_problem or f"its positions are {layer.positions!r}, not rotary"
        raise ValueError(f"{layer.describe()} has no RoPE to shift: {reason}")
    return layer.rope
