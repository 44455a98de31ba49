"""In-process backend: least-recently-used eviction under a byte budget, safe across threads."""

import threading
from collections import OrderedDict
from collections.abc import Sequence

from hf_kvcache.prefix.backend import Backend, check_max_bytes


class MemoryBackend(Backend):
    """Blocks held in this process's memory; the least recently used are evicted beyond `max_bytes`.

    A value larger than the whole budget is not stored. Every operation holds one lock, so threads
    sharing a backend never lose or double-count an entry.
    """

    def __init__(self, max_bytes: int | None = 1 << 30):
        check_max_bytes(max_bytes)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get_prefix(self, keys: Sequence[str]) -> list[bytes]:
        found = []
        with self._lock:
            for key in keys:
                value = self._entries.get(key)
                if value is None:
                    break
                self._entries.move_to_end(key)
                found.append(value)
        return found

    def put(self, key: str, value: bytes) -> bool:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += len(value) - (len(old) if old is not None else 0)
            self._entries[key] = value
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted)
                self._evictions += 1
        return True

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def keys(self) -> list[str]:
        """Stored keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def evictions(self) -> int:
        return self._evictions

    def __repr__(self) -> str:
        return f"MemoryBackend(max_bytes={self.max_bytes}, entries={len(self._entries)}, bytes={self._bytes})"
