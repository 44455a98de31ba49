"""hf_kvcache: KV-cache strategies for Hugging Face transformers, as drop-in `Cache` objects."""

from hf_kvcache.caches.quantized import QuantizedCache

__all__ = ["QuantizedCache"]
__version__ = "0.1.0"
