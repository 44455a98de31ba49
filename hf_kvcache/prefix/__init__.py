"""Prefix cache store: reuse prompt KV across requests, from memory, disk or a shared Redis server.

```python
from hf_kvcache import DiskBackend, PrefixCache, generate_with_prefix_cache

store = PrefixCache(DiskBackend("~/.cache/prompt-kv", max_bytes=20 << 30), block_size=256)
output = generate_with_prefix_cache(model, tokenizer(prompt, return_tensors="pt"), store, max_new_tokens=64)
print(store)  # lookups, hit rate, tokens reused, bytes, evictions
```
"""

from hf_kvcache.prefix.backend import Backend, BackendError
from hf_kvcache.prefix.disk import DiskBackend
from hf_kvcache.prefix.generate import generate_with_prefix_cache
from hf_kvcache.prefix.keys import block_keys, model_fingerprint
from hf_kvcache.prefix.memory import MemoryBackend
from hf_kvcache.prefix.redis_backend import RedisBackend
from hf_kvcache.prefix.store import PrefixCache

__all__ = [
    "Backend",
    "BackendError",
    "DiskBackend",
    "MemoryBackend",
    "PrefixCache",
    "RedisBackend",
    "block_keys",
    "generate_with_prefix_cache",
    "model_fingerprint",
]
