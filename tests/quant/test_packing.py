import pytest
import torch

from hf_kvcache.quant import SUPPORTED_BITS, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 7, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, 7, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_every_code_value_survives_packing():
    for bits in SUPPORTED_BITS:
        codes = (torch.arange(64) % 2**bits).to(torch.uint8).reshape(1, 64)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


@pytest.mark.parametrize("bits", [1, 5, 6, 16])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(ValueError, match=r"bits=.*accepted values: 2, 3, 4, 8"):
        pack_codes(torch.zeros(1, 64, dtype=torch.uint8), bits)


def test_three_bits_need_multiples_of_eight_channels():
    with pytest.raises(ValueError, match="multiple of 8 channels"):
        pack_codes(torch.zeros(1, 12, dtype=torch.uint8), 3)
