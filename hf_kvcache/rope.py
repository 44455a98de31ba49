"""Rotary position embedding of one layer, as far as a cache needs it: re-rotating cached keys.

Keys arrive in the cache already rotated for their position. `Rope.shift(keys, delta)` rotates them as
if they sat `delta` positions later, with that layer's own frequencies (the default RoPE or any type in
transformers' `ROPE_INIT_FUNCTIONS`: linear, dynamic, yarn, longrope, llama3, proportional), on the
first `rotary_dim` channels (partial rotary), in its channel layout (`"half"`: the two halves of the
rotated channels form the pairs, as in Llama; `"interleaved"`: neighbouring channels do, as in GPT-J).
Only the pure rotation is applied: the attention scaling some types (yarn, longrope) fold into cos/sin
is already in the keys.

Source: RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864 (rotation by angle position x
frequency, which composes additively, so a shift by `delta` is one more rotation by delta x frequency).
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


@dataclass(frozen=True, eq=False)
class Rope:
    """One layer's rotary embedding: `inv_freq` [rotary_dim / 2] (float64, radians per position), the pair
    `layout`, and which cached tensor carries it (`slot`: "keys" usually; "values" where a model caches its
    rotated key part in the value slot, as DeepSeek-V3's latent MLA)."""

    inv_freq: torch.Tensor
    layout: str = "half"
    slot: str = "keys"

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`keys` [..., tokens, channels] rotated by `delta` more positions (applied once, from the stored keys)."""
        if delta == 0:
            return keys
        angles = delta * self.inv_freq.to(keys.device)
        return self.rotate(keys, angles.cos(), angles.sin())

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`x` [..., channels] with each rotated channel pair multiplied by [[cos, -sin], [sin, cos]], in this
        layer's layout; `cos`/`sin` [..., rotary_dim / 2] broadcast against x's leading dimensions (averages
        of several rotations give their average matrix). Computed in float32, returned in x's dtype."""
        cos, sin = cos.float(), sin.float()
        rotary = x[..., : self.rotary_dim].float()
        if self.layout == "half":
            first, second = rotary.chunk(2, dim=-1)
            rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        else:
            even, odd = rotary[..., 0::2], rotary[..., 1::2]
            rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        return torch.cat([rotated.to(x.dtype), x[..., self.rotary_dim :]], dim=-1)


def inverse_frequencies(
    text_config: PreTrainedConfig, params: dict, head_dim: int, layer_type: str | None
) -> torch.Tensor:
    """Radians per position of each rotated pair (float64), or a ValueError for an unknown rope_type."""
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim - dim % 2, 2, dtype=torch.float64) / dim
        return 1.0 / (params["rope_theta"] ** exponents)
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope_type={rope_type!r} is not supported for re-rotation; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    kwargs = {"layer_type": layer_type} if layer_type else {}
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](text_config, "cpu", **kwargs)
    return inv_freq.to(torch.float64)


def __getattr__(name: str) -> object:
    """`RopeRotator`, deprecated and now in `hf_kvcache.geometry`, is still found here."""
    if name == "RopeRotator":
        from hf_kvcache import geometry  # only for the deprecated name: geometry builds on this module

        return geometry.RopeRotator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
