import pytest
import torch

from hf_kvcache.quant import dequantize, quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("reduce_dim", [-2, -1])
def test_error_is_at_most_half_a_step_per_group(bits, reduce_dim):
    x = torch.randn(2, 3, 32, 64) * torch.linspace(0.1, 10, 64)  # channels of very different ranges
    q = quantize(x, bits, reduce_dim=reduce_dim, group_size=16)
    error = (dequantize(q) - x).abs()
    # Broadcast each group's step (scale) back onto its elements.
    step = q.scale.repeat_interleave(16, dim=q.reduce_dim)
    assert torch.all(error <= step / 2 + 1e-5 * x.abs().max())


def test_statistics_shapes_follow_kivi_layout():
    keys = torch.randn(1, 2, 64, 32)
    per_channel = quantize(keys, 2, reduce_dim=-2, group_size=32)
    per_token = quantize(keys, 2, reduce_dim=-1, group_size=8)
    assert per_channel.scale.shape == (1, 2, 2, 32)  # two blocks of 32 tokens, one stat per channel
    assert per_token.scale.shape == (1, 2, 64, 4)  # one stat per token for each group of 8 channels
    assert per_channel.codes.shape == per_token.codes.shape == (1, 2, 64, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_are_preserved_and_constant_groups_are_exact(dtype):
    x = torch.full((1, 1, 16, 16), 3.25, dtype=dtype)
    q = quantize(x, 4, reduce_dim=-1, group_size=16)
    assert q.scale.dtype == dtype
    assert torch.equal(dequantize(q), x)


def test_length_must_be_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.randn(1, 1, 10, 16), 4, reduce_dim=-2, group_size=16)


@pytest.mark.parametrize("reduce_dim", [-2, -1])
def test_outliers_are_kept_exactly_and_take_no_part_in_the_range(reduce_dim):
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    x[0, 1, 5, 3] = 40.0  # one extreme element
    plain, kept = quantize(x, 2, reduce_dim, 16), quantize(x, 2, reduce_dim, 16, outliers=1)
    # independently: in every group, the element farthest from the group's median reads back exactly
    moved = x.movedim(reduce_dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 16, 16)
    farthest = (grouped - grouped.median(-1, keepdim=True).values).abs().argmax(-1, keepdim=True)
    read = dequantize(kept).movedim(reduce_dim, -1).reshape(grouped.shape)
    assert torch.equal(read.gather(-1, farthest), grouped.gather(-1, farthest))
    # the extreme element no longer sets the step of the other 15 of its group
    errors = [(dequantize(q) - x).pow(2) for q in (plain, kept)]
    group = (0, 1, slice(0, 16), 3) if reduce_dim == -2 else (0, 1, 5, slice(0, 16))
    assert errors[1][group].mean() < errors[0][group].mean() / 20
    assert errors[1].mean() < errors[0].mean()
    groups = x.numel() // 16
    assert kept.nbytes - plain.nbytes == groups * (4 + 1)  # a float32 value and a one-byte position per group


def test_outliers_must_leave_part_of_the_group():
    with pytest.raises(ValueError, match="outliers=16 must be at least 0 and less than the group size 16"):
        quantize(torch.randn(1, 1, 16, 16), 2, reduce_dim=-2, group_size=16, outliers=16)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normal_codebook_keeps_the_range_and_picks_the_nearest_level(bits):
    x = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    q = quantize(x, bits, reduce_dim=-1, group_size=16, codebook="normal")
    read = dequantize(q)
    grouped, read_grouped = x.reshape(1, 2, 32, 2, 16), read.reshape(1, 2, 32, 2, 16)
    # the group's minimum and maximum are levels; every other level lies strictly between them
    assert torch.allclose(read_grouped.amin(-1), grouped.amin(-1), atol=1e-6)
    assert torch.allclose(read_grouped.amax(-1), grouped.amax(-1), atol=1e-5)
    # independently: the levels are normal quantiles rescaled to [minimum, maximum], each element the nearest
    count = 1 << bits
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(count) + 0.5) / count)
    unit = (quantiles - quantiles[0]) / (quantiles[-1] - quantiles[0])
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    levels = (low.unsqueeze(-1) + (high - low).unsqueeze(-1) * unit).expand(*grouped.shape, count)
    nearest = levels.gather(-1, (grouped.unsqueeze(-1) - levels).abs().argmin(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(read_grouped, nearest, atol=1e-5)
    assert q.nbytes == quantize(x, bits, reduce_dim=-1, group_size=16).nbytes  # same codes and statistics
