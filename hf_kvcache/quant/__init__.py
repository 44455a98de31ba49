"""Low-bit storage primitives: code packing, group-wise asymmetric quantization, orthonormal rotations."""

from hf_kvcache.quant.groupwise import QuantizedTensor, dequantize, quantize
from hf_kvcache.quant.packing import SUPPORTED_BITS, pack_codes, unpack_codes
from hf_kvcache.quant.rotation import hadamard_matrix, rotation_matrix

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dequantize",
    "hadamard_matrix",
    "pack_codes",
    "quantize",
    "rotation_matrix",
    "unpack_codes",
]
