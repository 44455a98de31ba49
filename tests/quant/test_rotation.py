import pytest
import torch

from hf_kvcache.quant import hadamard_matrix


@pytest.mark.parametrize("size", [1, 2, 16, 64, 128])
def test_hadamard_is_symmetric_and_orthonormal(size):
    h = hadamard_matrix(size, torch.float64, "cpu")
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, torch.eye(size, dtype=torch.float64), atol=1e-12)


def test_non_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(96, torch.float32, "cpu")
