"""In-process backend: eviction by an LRU, LFU or size-aware policy under a byte budget, safe across threads."""

import heapq
import threading
from collections.abc import Iterator, Sequence

from hf_kvcache.prefix.backend import HEADER_PEEK, Backend, check_max_bytes, refuse_oversized
from hf_kvcache.prefix.eviction import POLICIES, StoredBlock
from hf_kvcache.validation import check_choice


class MemoryBackend(Backend):
    """Blocks held in this process's memory; beyond `max_bytes`, blocks are evicted by `policy`.

    Args:
        max_bytes: budget in bytes for the values held (None: no limit). A value larger than the whole
            budget is not stored, nor a block whose `parent` is not held (it could never be served).
        policy: "lru" (least recently used), "lfu" (fewest hits, every served block counted) or "size"
            (GreedyDual-Size-Frequency: hits per byte, aged); see `hf_kvcache.prefix.eviction`.

    Only the ends of prompt chains are eviction candidates (blocks no held block names as `parent`), so
    a prompt's first blocks always outlive its later ones; a block whose chain lost an earlier block can
    never be served and is evicted first. Choosing a victim scans the candidates (O(blocks held)). Every
    operation holds one lock, so threads sharing a backend never lose or double-count an entry.

    Raises:
        ValueError: `max_bytes` not a positive int or None; `policy` not one of the names above.
    """

    def __init__(self, max_bytes: int | None = 1 << 30, policy: str = "lru"):
        check_max_bytes(max_bytes)
        check_choice("policy", policy, POLICIES)
        self.max_bytes = max_bytes
        self.policy = POLICIES[policy]()
        self._blocks: dict[str, StoredBlock] = {}
        self._children: dict[str, set[str]] = {}  # parent key -> keys of held blocks that extend it
        self._bytes = 0
        self._evictions = 0
        self._operations = 0
        self._lock = threading.Lock()

    def _touch(self, block: StoredBlock) -> None:
        self._operations += 1
        block.last_use = self._operations
        block.priority = self.policy.priority(block)

    def get_prefix(self, keys: Sequence[str], parent: str | None = None, max_bytes: int | None = None) -> list[bytes]:
        found = []
        with self._lock:
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                if max_bytes is not None and block.size > max_bytes:
                    refuse_oversized(key, block.size, max_bytes)
                    self._remove(key, keep_children=False)
                    break
                found.append(block)
            for block in reversed(found):  # a chain's first block ends up the most recently used
                block.hits += 1
                self._touch(block)
        return [block.value for block in found]

    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            return False
        with self._lock:
            if parent is not None and parent not in self._blocks:
                return False  # it could never be served: the block it extends is not here
            old = self._remove(key, keep_children=True)
            block = StoredBlock(value, parent, hits=old.hits if old else 0)
            block.orphan = parent is not None and self._blocks[parent].orphan  # extends an unservable chain
            self._blocks[key] = block
            self._children.setdefault(parent, set()).add(key)
            self._mark_descendants(key, orphan=block.orphan)  # blocks that extend it: servable again unless it is not
            self._bytes += len(value)
            self._touch(block)
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                if self._evict_one(protect=key) == key:
                    return False
        return True

    def _evict_one(self, protect: str) -> str:
        """Evict the lowest-priority chain end (orphans first) other than `protect` (the block just written),
        and return its key; `protect` itself when it is the only chain end (its own chain fills the budget)."""
        candidates = [
            self._rank(key)
            for key, block in self._blocks.items()
            if key != protect and (block.orphan or not self._children.get(key))
        ]
        if not candidates:
            candidates = [(False, 0.0, protect)]
        _, _, victim = min(candidates)
        block = self._remove(victim, keep_children=False)
        if victim != protect:  # a block refused on arrival was never held
            self.policy.evicted(block)
            self._evictions += 1
        return victim

    def _rank(self, key: str) -> tuple:
        """Eviction order among candidates: orphans first, then the policy's priority (the key breaks ties)."""
        block = self._blocks[key]
        return (not block.orphan, block.priority, key)

    def _remove(self, key: str, keep_children: bool) -> StoredBlock | None:
        """Forget `key`; its children become orphans unless it is about to be replaced (`keep_children`)."""
        block = self._blocks.pop(key, None)
        if block is None:
            return None
        self._bytes -= block.size
        siblings = self._children.get(block.parent)
        if siblings is not None:
            siblings.discard(key)
            if not siblings:
                del self._children[block.parent]
        if not keep_children:
            self._mark_descendants(key, orphan=True)
        return block

    def _mark_descendants(self, key: str, orphan: bool) -> None:
        pending = list(self._children.get(key, ()))
        while pending:
            child = pending.pop()
            self._blocks[child].orphan = orphan
            pending += self._children.get(child, ())

    def delete(self, key: str) -> None:
        with self._lock:
            self._remove(key, keep_children=False)

    def inventory(self) -> Iterator[tuple[str, int, bytes]]:
        with self._lock:
            entries = [(key, block.size, block.value[:HEADER_PEEK]) for key, block in self._blocks.items()]
        yield from entries

    def clear(self) -> int:
        with self._lock:
            count = len(self._blocks)
            self._blocks.clear()
            self._children.clear()
            self._bytes = 0
        return count

    def keys(self) -> list[str]:
        """Stored keys in the order they would be evicted: orphans first, then repeatedly the lowest-priority
        chain end (a block becomes a chain end once every block extending it has gone)."""
        with self._lock:
            extensions = {key: len(self._children.get(key, ())) for key in self._blocks}
            rank = {key: self._rank(key) for key in self._blocks}
            ready = [rank[key] for key, block in self._blocks.items() if block.orphan or not extensions[key]]
            heapq.heapify(ready)
            order, queued = [], {entry[2] for entry in ready}
            while ready:
                key = heapq.heappop(ready)[2]
                order.append(key)
                parent = self._blocks[key].parent
                if parent in extensions:
                    extensions[parent] -= 1
                    if not extensions[parent] and parent not in queued:
                        queued.add(parent)
                        heapq.heappush(ready, rank[parent])
            return order

    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def evictions(self) -> int:
        return self._evictions

    def __repr__(self) -> str:
        return (
            f"MemoryBackend(max_bytes={self.max_bytes}, policy={self.policy.name!r}, entries={len(self._blocks)}, "
            f"bytes={self._bytes})"
        )
