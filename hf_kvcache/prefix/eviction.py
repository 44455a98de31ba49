"""Which stored block goes first when a byte budget is exceeded: LRU, LFU, or size-aware (GDSF).

A policy only ranks blocks: `priority(block)` is computed when the block is written or served, and
the block with the lowest priority is evicted (then `evicted(block)` lets an aging policy move on). The backend only ever considers blocks no other
block extends (the ends of prompt chains): a prompt's first blocks outlive its later ones, so what
stays is always a servable prefix. Adding a policy is one subclass and a line in `POLICIES`.
"""

from dataclasses import dataclass


@dataclass
class StoredBlock:
    """A held block and what the policies rank it by. `hits`: times served; `last_use`: the backend's
    operation counter at the last write or hit; `priority`: the policy's rank, lowest evicted first."""

    value: bytes
    parent: str | None
    hits: int = 0
    last_use: int = 0
    priority: float | tuple[float, ...] = 0.0
    orphan: bool = False  # its parent was deleted: it can never be served again, so it goes first

    @property
    def size(self) -> int:
        return len(self.value)


class BlockEvictionPolicy:
    """One backend's ranking of its blocks (an instance per backend: a policy may keep state)."""

    name: str

    def priority(self, block: StoredBlock) -> float | tuple[float, ...]:
        raise NotImplementedError

    def evicted(self, block: StoredBlock) -> None:
        """Called with each victim."""


class LRU(BlockEvictionPolicy):
    """Least recently used: the block served or written longest ago goes first."""

    name = "lru"

    def priority(self, block: StoredBlock) -> float:
        return block.last_use


class LFU(BlockEvictionPolicy):
    """Least frequently used: fewest hits first (every block served counts), ties broken by recency."""

    name = "lfu"

    def priority(self, block: StoredBlock) -> tuple[float, ...]:
        return (block.hits, block.last_use)


class SizeAware(BlockEvictionPolicy):
    """GreedyDual-Size-Frequency: priority = clock + (hits + 1) / bytes, so hits per byte decide, and the clock
    (raised to each victim's priority) ages out blocks that were popular long ago.

    Source: Cherkasova, "Improving WWW Proxies Performance with Greedy-Dual-Size-Frequency Caching Policy",
    HP Labs HPL-98-69, 1998, https://www.hpl.hp.com/techreports/98/HPL-98-69R1.html.
    """

    name = "size"

    def __init__(self) -> None:
        self.clock = 0.0

    def priority(self, block: StoredBlock) -> float:
        return self.clock + (block.hits + 1) / max(block.size, 1)

    def evicted(self, block: StoredBlock) -> None:
        self.clock = max(self.clock, float(block.priority))


EvictionPolicy = BlockEvictionPolicy  # the former name (token policies are `policies.EvictionPolicy`)
POLICIES: dict[str, type[BlockEvictionPolicy]] = {policy.name: policy for policy in (LRU, LFU, SizeAware)}
