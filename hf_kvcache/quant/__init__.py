"""Low-bit storage primitives: code packing, group-wise asymmetric quantization, Hadamard rotation."""

from hf_kvcache.quant.groupwise import QuantizedTensor, dequantize, quantize
from hf_kvcache.quant.hadamard import hadamard_matrix
from hf_kvcache.quant.packing import SUPPORTED_BITS, pack_codes, unpack_codes

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dequantize",
    "hadamard_matrix",
    "pack_codes",
    "quantize",
    "unpack_codes",
]
