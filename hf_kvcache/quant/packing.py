"""Pack integer codes of 2, 3, 4 or 8 bits into bytes along the last dimension.

Codes are packed along the channel (last) dimension so that every token owns whole bytes: tokens can
then be sliced, gathered or evicted without touching their neighbours.
"""

import torch

from hf_kvcache.validation import check_choice

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int, name: str = "bits", hint: str = "") -> None:
    check_choice(name, bits, SUPPORTED_BITS, hint)


def packed_size(channels: int, bits: int) -> int:
    """Bytes needed for `channels` codes of `bits` bits (3-bit codes go 8 to 3 bytes)."""
    check_bits(bits)
    if (channels * bits) % 8 or (bits == 3 and channels % 8):
        raise ValueError(f"{channels} channels cannot be packed at {bits} bits; use a multiple of 8 channels")
    return channels * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 `codes` (values < 2**bits) along the last dim into a uint8 tensor of packed bytes."""
    packed_size(codes.shape[-1], bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        per_byte = 8 // bits
        grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)
    # 3 bits: eight codes make one 24-bit word, written as three bytes.
    grouped = codes.reshape(*codes.shape[:-1], -1, 8).to(torch.int32)
    word = (grouped << torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)).sum(dim=-1)
    byte_shifts = torch.arange(0, 24, 8, dtype=torch.int32, device=codes.device)
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes, one per channel."""
    check_bits(bits)
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*packed.shape[:-1], -1)
    grouped = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
    word = (grouped << torch.arange(0, 24, 8, dtype=torch.int32, device=packed.device)).sum(dim=-1)
    codes = (word.unsqueeze(-1) >> torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)) & mask
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)
