"""Prefix cache store: reuse prompt KV across requests, from memory, disk, a Redis server or cluster, or
tiers of them.

```python
from hf_kvcache import DiskBackend, MemoryBackend, PrefixCache, TieredBackend, generate_with_prefix_cache

backend = TieredBackend(MemoryBackend(2 << 30, policy="lfu"), DiskBackend("~/.cache/prompt-kv", max_bytes=20 << 30))
store = PrefixCache(backend, block_size=256, bits=4)  # 4-bit blocks: 0.28x the bytes of fp16 blocks
output = generate_with_prefix_cache(model, tokenizer(prompt, return_tensors="pt"), store, max_new_tokens=64)
print(store)  # lookups, hit rate, tokens reused, bytes, evictions, fetch latency
store.stats()["tiers"]  # the same per level

# transform-coded blocks (hf-kvcache calibrate --transform-codec writes the calibration)
codec = TransformCodec(CodecCalibration.load("codec.safetensors"), model, average_bits=2)
store = PrefixCache(backend, codec=codec)
```
"""

from hf_kvcache.prefix.backend import Backend, BackendError
from hf_kvcache.prefix.disk import DiskBackend
from hf_kvcache.prefix.generate import generate_with_prefix_cache
from hf_kvcache.prefix.keys import block_keys, model_fingerprint
from hf_kvcache.prefix.memory import MemoryBackend
from hf_kvcache.prefix.redis_backend import RedisBackend
from hf_kvcache.prefix.store import PrefixCache
from hf_kvcache.prefix.tiered import TieredBackend
from hf_kvcache.prefix.transform_codec import CodecCalibration, TransformCodec

__all__ = [
    "Backend",
    "BackendError",
    "CodecCalibration",
    "DiskBackend",
    "MemoryBackend",
    "PrefixCache",
    "RedisBackend",
    "TieredBackend",
    "TransformCodec",
    "block_keys",
    "generate_with_prefix_cache",
    "model_fingerprint",
]
