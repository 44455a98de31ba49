"""Rotary re-rotation of cached keys, built from the model config.

Keys arrive in the cache already rotated for their position. `RopeRotator.shift(keys, delta)` rotates
them as if they sat `delta` positions later, with the model's own frequencies (any RoPE type that
transformers ships in `ROPE_INIT_FUNCTIONS`, plus the default). Only the pure rotation is applied: the
attention scaling some types (yarn, longrope) fold into cos/sin is already in the keys.
"""

import torch
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Models that rotate interleaved channel pairs (GPT-J style) instead of the two halves of the head.
INTERLEAVED_ROPE_MODELS = ("gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "chatglm")


def rope_parameters(config: PreTrainedConfig) -> tuple[dict, str | None]:
    """The RoPE parameters of full-attention layers, and the layer type they were filed under (if any)."""
    text = config.get_text_config(decoder=True)
    params = getattr(text, "rope_parameters", None) or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        return params["full_attention"], "full_attention"
    return params, None


class RopeRotator:
    """Rotates rotary-embedded keys by a position offset (rotate-half convention)."""

    def __init__(self, config: PreTrainedConfig):
        text = config.get_text_config(decoder=True)
        params, layer_type = rope_parameters(config)
        if not params or "rope_theta" not in params:
            raise ValueError(
                f"{text.model_type} has no rotary position embedding (absolute or ALiBi positions), so sink keys "
                "cannot be re-rotated; pass rerotate=False to keep them at their original positions"
            )
        if text.model_type in INTERLEAVED_ROPE_MODELS:
            raise ValueError(
                f"{text.model_type} rotates interleaved channel pairs, which re-rotation does not support; "
                "pass rerotate=False"
            )
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        elif rope_type in ROPE_INIT_FUNCTIONS:
            kwargs = {"layer_type": layer_type} if layer_type else {}
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](text, "cpu", **kwargs)
        else:
            raise ValueError(
                f"rope_type={rope_type!r} is not supported for re-rotation; supported: default, "
                f"{', '.join(ROPE_INIT_FUNCTIONS)}"
            )
        self.rope_type = rope_type
        self.inv_freq = inv_freq.to(torch.float64)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`keys` [..., tokens, head_dim] rotated by `delta` positions (applied once, from the original keys)."""
        if delta == 0:
            return keys
        angles = delta * self.inv_freq.to(keys.device)
        cos = torch.cat([angles.cos(), angles.cos()]).float()
        sin = torch.cat([angles.sin(), angles.sin()]).float()
        rotary, rest = keys[..., : self.rotary_dim].float(), keys[..., self.rotary_dim :]
        first, second = rotary.chunk(2, dim=-1)
        rotated = rotary * cos + torch.cat([-second, first], dim=-1) * sin
        return torch.cat([rotated.to(keys.dtype), rest], dim=-1)
