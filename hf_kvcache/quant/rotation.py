"""Orthonormal rotations of the head dimension, applied before quantizing to spread outlier channels.

`rotation_matrix(size)` works for every head size: the Sylvester-Hadamard matrix of the largest power of
two dividing `size`, Kronecker-multiplied with the orthonormal DCT-II matrix of the remaining (odd)
factor. For a power of two that is the plain Hadamard matrix (QuaRot, Ashkboos et al. 2024,
https://arxiv.org/abs/2404.00456; QuIP#, https://arxiv.org/abs/2402.04396); for 96 = 32 x 3 or
80 = 16 x 5 every output channel still mixes every input channel, each with weight at most
sqrt(2 / size), so a single outlier channel is spread over the whole head as with Hadamard.
"""

import functools
import math

import torch


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def _dct_cpu(size: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix, rows are frequencies."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    n = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * n + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix


def power_of_two_factor(size: int) -> int:
    return size & -size


@functools.lru_cache(maxsize=32)
def _rotation_cpu(size: int, dct_size: int) -> torch.Tensor:
    return torch.kron(_hadamard_cpu(size // dct_size), _dct_cpu(dct_size))


def hadamard_matrix(size: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Symmetric orthonormal Sylvester-Hadamard matrix (H @ H = I); `size` must be a power of two."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard matrix needs a size that is a power of two, got size={size}")
    return _hadamard_cpu(size).to(dtype=dtype, device=device)


def rotation_matrix(
    size: int, dtype: torch.dtype, device: torch.device | str, dct_size: int | None = None
) -> torch.Tensor:
    """Orthonormal [size, size] matrix R (R @ R.T = I): Hadamard(size / dct_size) kron DCT(dct_size).

    `dct_size` defaults to the odd factor of `size` (1 for a power of two: plain Hadamard); it must divide
    `size` with a power-of-two quotient. Rotate with `x @ R`, undo with `y @ R.T`.
    """
    dct_size = size // power_of_two_factor(size) if dct_size is None else dct_size
    quotient = size // dct_size if dct_size >= 1 and size % dct_size == 0 else 0
    if size < 1 or quotient < 1 or quotient & (quotient - 1):
        raise ValueError(
            f"dct_size={dct_size} must divide size={size} with a power-of-two quotient; the default is the odd "
            f"factor {size // power_of_two_factor(size) if size >= 1 else 1}"
        )
    return _rotation_cpu(size, dct_size).to(dtype=dtype, device=device)
