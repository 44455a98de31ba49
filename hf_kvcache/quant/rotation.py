"""Orthonormal Hadamard rotation of the head dimension, to spread outlier channels before quantizing."""

import functools

import torch


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def hadamard_matrix(size: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Symmetric orthonormal Sylvester-Hadamard matrix (H @ H = I); `size` must be a power of two."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"rotation needs a head dimension that is a power of two, got head_dim={size}")
    return _hadamard_cpu(size).to(dtype=dtype, device=device)
