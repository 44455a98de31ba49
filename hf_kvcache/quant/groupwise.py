"""Group-wise asymmetric (min/max, scale + zero point) quantization with packed codes.

`quantize(x, bits, reduce_dim, group_size)` groups `x` along `reduce_dim` in runs of `group_size`
elements that share one scale and one zero point (the group minimum). KIVI uses it twice:

- keys per channel: `reduce_dim=-2` (tokens), one statistic per channel for each block of tokens;
- values per token: `reduce_dim=-1` (channels), one statistic per token for each channel group.

Codes are always packed along the channel dimension, so every token keeps whole bytes.

With `outliers=k`, the k elements of each group farthest from the group's median are kept apart in full
precision (dense-and-sparse, KVQuant, Hooper et al. 2024, https://arxiv.org/abs/2401.18079): they take
no part in the group's range, so one extreme token no longer widens the step of every other token of
its block; dequantization puts them back exactly.

With `codebook="normal"` the levels between a group's minimum and maximum are not evenly spaced but sit
at the quantiles of a normal distribution (denser near the middle, as NF4 does: QLoRA, Dettmers et al.
2023, https://arxiv.org/abs/2305.14314), rescaled so that the end levels stay the group's minimum and
maximum; the statistics and the code width are those of the uniform grid.
"""

import functools
from dataclasses import dataclass

import torch

from hf_kvcache.quant.packing import pack_codes, unpack_codes

CODEBOOKS = ("uniform", "normal")


@functools.lru_cache(maxsize=8)
def codebook_steps(bits: int, codebook: str) -> torch.Tensor | None:
    """Each code's level in steps above the minimum ([2**bits] float32, 0 to 2**bits - 1); None: uniform."""
    if codebook == "uniform":
        return None
    count = 1 << bits
    quantiles = torch.special.ndtri((torch.arange(count, dtype=torch.float64) + 0.5) / count)
    return ((quantiles - quantiles[0]) / (quantiles[-1] - quantiles[0]) * (count - 1)).float()


def code_levels(codes: torch.Tensor, bits: int, codebook: str, dtype: torch.dtype) -> torch.Tensor:
    """Unpacked `codes` as their levels in steps above the minimum, in `dtype`."""
    steps = codebook_steps(bits, codebook)
    return codes.to(dtype) if steps is None else steps.to(codes.device, dtype)[codes.long()]


@dataclass
class QuantizedTensor:
    """Packed codes plus the per-group scale and minimum that turn them back into numbers."""

    codes: torch.Tensor  # uint8, [..., tokens, packed channels]
    scale: torch.Tensor  # compute dtype, one entry per group
    minimum: torch.Tensor  # compute dtype, same shape as scale
    bits: int
    reduce_dim: int
    group_size: int
    # Outliers kept apart: [*scale's groups up to the group axis, outliers, *the rest], e.g. keys per channel
    # [batch, heads, blocks, outliers, channels]; the index is the element's position inside its group.
    outlier_values: torch.Tensor | None = None  # compute dtype
    outlier_index: torch.Tensor | None = None  # uint8
    codebook: str = "uniform"

    @property
    def nbytes(self) -> int:
        outliers = 0 if self.outlier_values is None else self.outlier_values.nbytes + self.outlier_index.nbytes
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes + outliers


def _grouped(x: torch.Tensor, reduce_dim: int, group_size: int) -> torch.Tensor:
    """View `x` with `reduce_dim` split into (groups, group_size); the group axis stays at `reduce_dim`."""
    dim = reduce_dim % x.dim()
    shape = (*x.shape[:dim], x.shape[dim] // group_size, group_size, *x.shape[dim + 1 :])
    return x.reshape(shape)


def quantize(
    x: torch.Tensor, bits: int, reduce_dim: int, group_size: int, outliers: int = 0, codebook: str = "uniform"
) -> QuantizedTensor:
    """Quantize `x` to `bits` with one (scale, minimum) per `group_size` run along `reduce_dim`, keeping
    the `outliers` elements of each group farthest from its median apart in full precision; each element
    gets the nearest level of `codebook` ("uniform" or "normal", see the module docstring)."""
    if x.shape[reduce_dim] % group_size:
        raise ValueError(f"size {x.shape[reduce_dim]} along dim {reduce_dim} is not a multiple of {group_size}")
    if not 0 <= outliers < group_size:
        raise ValueError(f"outliers={outliers} must be at least 0 and less than the group size {group_size}")
    dim = reduce_dim % x.dim()
    grouped = _grouped(x.float(), dim, group_size)
    outlier_values = outlier_index = None
    if outliers:
        median = grouped.median(dim=dim + 1, keepdim=True).values
        index = (grouped - median).abs().topk(outliers, dim=dim + 1).indices
        outlier_values, outlier_index = grouped.gather(dim + 1, index).to(x.dtype), index.to(torch.uint8)
        grouped = grouped.scatter(dim + 1, index, median.expand_as(index).contiguous())  # out of the range
    minimum = grouped.amin(dim=dim + 1, keepdim=True)
    maximum = grouped.amax(dim=dim + 1, keepdim=True)
    levels = (1 << bits) - 1
    # Statistics are stored in the input dtype; codes are computed from the stored (rounded) values so
    # that dequantization reproduces the nearest level exactly.
    scale = ((maximum - minimum) / levels).to(x.dtype)
    minimum = minimum.to(x.dtype)
    steps = (grouped - minimum.float()) / scale.float().clamp_min(1e-12)
    if (table := codebook_steps(bits, codebook)) is None:
        codes = steps.round_().clamp_(0, levels)
    else:
        codes = torch.bucketize(steps, ((table[1:] + table[:-1]) / 2).to(steps.device))  # nearest level
    codes = codes.to(torch.uint8).reshape(x.shape)
    return QuantizedTensor(
        codes=pack_codes(codes, bits),
        scale=scale.squeeze(dim + 1),
        minimum=minimum.squeeze(dim + 1),
        bits=bits,
        reduce_dim=dim,
        group_size=group_size,
        outlier_values=outlier_values,
        outlier_index=outlier_index,
        codebook=codebook,
    )


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Numbers back from codes: code * scale + minimum, in the dtype of the scales; outliers put back."""
    codes = unpack_codes(q.codes, q.bits)
    grouped = _grouped(code_levels(codes, q.bits, q.codebook, q.scale.dtype), q.reduce_dim, q.group_size)
    group_axis = q.reduce_dim + 1
    values = torch.addcmul(q.minimum.unsqueeze(group_axis), grouped, q.scale.unsqueeze(group_axis))
    if q.outlier_values is not None:
        values.scatter_(group_axis, q.outlier_index.long(), q.outlier_values)
    return values.reshape(codes.shape)
