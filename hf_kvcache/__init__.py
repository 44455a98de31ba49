"""hf_kvcache: KV-cache strategies for Hugging Face transformers, as drop-in `Cache` objects.

Eviction is a policy value (what to keep, `hf_kvcache.policies`) served by one cache with a storage value
(how kept tokens are held, `Storage`): `EvictionCache(model.config, SnapKV(budget=256), Storage(bits=4,
token_wise=True))`. Adding a method takes one file in `hf_kvcache/policies/` and its test: see that
package's docstring.
"""

from hf_kvcache.caches.base import Storage
from hf_kvcache.caches.evicting import EvictionCache, HeavyHitterCache, SnapKVCache, TOVACache
from hf_kvcache.caches.quantized import QuantizedCache
from hf_kvcache.caches.sink import SinkCache
from hf_kvcache.caches.window import SlidingWindowCache
from hf_kvcache.calibration.bit_profiles import calibrate_bit_profile
from hf_kvcache.chat import ChatSession
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.prefix import (
    DiskBackend,
    MemoryBackend,
    PrefixCache,
    RedisBackend,
    TieredBackend,
    generate_with_prefix_cache,
)
from hf_kvcache.quant.profile import BitProfile
from hf_kvcache.registry import build_cache, parse_cache_spec, register_cache
from hf_kvcache.scoring import disable_score_capture, enable_score_capture, score_capture
from hf_kvcache.version import __version__ as __version__

__all__ = [
    "CACHE_KWARG",
    "BitProfile",
    "ChatSession",
    "DiskBackend",
    "EvictionCache",
    "HeavyHitterCache",
    "MemoryBackend",
    "PrefixCache",
    "QuantizedCache",
    "RedisBackend",
    "SinkCache",
    "SlidingWindowCache",
    "SnapKVCache",
    "Storage",
    "TOVACache",
    "TieredBackend",
    "build_cache",
    "calibrate_bit_profile",
    "disable_score_capture",
    "enable_score_capture",
    "generate_with_prefix_cache",
    "parse_cache_spec",
    "register_cache",
    "score_capture",
]
