import pytest
import torch

from hf_kvcache.quant import hadamard_matrix, rotation_matrix


@pytest.mark.parametrize("size", [1, 2, 16, 64, 128])
def test_hadamard_is_symmetric_and_orthonormal(size):
    h = hadamard_matrix(size, torch.float64, "cpu")
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, torch.eye(size, dtype=torch.float64), atol=1e-12)


def test_hadamard_of_non_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(96, torch.float32, "cpu")


@pytest.mark.parametrize("size", [64, 72, 80, 96, 112, 120, 256, 3, 1])
def test_rotation_is_orthonormal_for_every_head_size(size):
    r = rotation_matrix(size, torch.float64, "cpu")
    assert torch.allclose(r @ r.T, torch.eye(size, dtype=torch.float64), atol=1e-12)


def test_rotation_of_a_power_of_two_is_hadamard():
    assert torch.equal(rotation_matrix(64, torch.float64, "cpu"), hadamard_matrix(64, torch.float64, "cpu"))


@pytest.mark.parametrize("size", [80, 96, 72])
def test_rotation_spreads_a_single_outlier_channel_over_the_whole_head(size):
    r = rotation_matrix(size, torch.float64, "cpu")
    for channel in (0, size // 2, size - 1):
        spike = torch.zeros(size, dtype=torch.float64)
        spike[channel] = 1.0
        spread = (spike @ r).abs()
        assert spread.max() <= (2 / size) ** 0.5 + 1e-12  # never more than sqrt(2) x Hadamard's 1/sqrt(size)
        assert (spread > 0).float().mean() > 0.6  # most channels take a share


def test_forced_dct_factor_for_the_same_structure_on_a_power_of_two():
    r = rotation_matrix(64, torch.float64, "cpu", dct_size=4)
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(r, hadamard_matrix(64, torch.float64, "cpu"))
    with pytest.raises(ValueError, match="dct_size=3"):
        rotation_matrix(64, torch.float64, "cpu", dct_size=3)
