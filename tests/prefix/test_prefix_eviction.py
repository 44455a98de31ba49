"""Eviction policies of stored blocks: LRU, LFU (hits really counted), size-aware, and prompt chains kept whole."""

import random

import pytest

from hf_kvcache.prefix import DiskBackend, MemoryBackend
from hf_kvcache.prefix.eviction import POLICIES

KEYS = [f"{i:04x}" * 16 for i in range(64)]


def put_chain(backend, keys, size=100):
    for depth, key in enumerate(keys):
        backend.put(key, bytes([depth]) * size, keys[depth - 1] if depth else None)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_chain_loses_its_last_blocks_first(policy):
    """Two prompt chains over a budget: whatever the policy, what stays of each is a servable prefix."""
    backend = MemoryBackend(max_bytes=700, policy=policy)
    first, second = KEYS[:4], KEYS[10:14]
    put_chain(backend, first)
    backend.get_prefix(first)
    put_chain(backend, second)  # 8 blocks of 100 bytes in 700: one goes
    held = set(backend.keys())
    assert len(held) == 7 and backend.evictions == 1
    for chain in (first, second):
        kept = [key in held for key in chain]
        assert kept == sorted(kept, reverse=True), f"{policy}: a block outlived the block it extends: {kept}"
    assert len(backend.get_prefix(first)) + len(backend.get_prefix(second)) == 7


def test_lru_evicts_the_least_recently_used_chain_end():
    backend = MemoryBackend(max_bytes=300)
    for key in KEYS[:3]:
        backend.put(key, b"x" * 100)
    backend.get_prefix([KEYS[0]])
    backend.put(KEYS[3], b"y" * 100)
    assert backend.keys() == [KEYS[2], KEYS[0], KEYS[3]] and backend.evictions == 1


def test_lfu_counts_every_block_served():
    """SGLang's LFU never counted hits; here a block served twice outlives one written later but never read."""
    backend = MemoryBackend(max_bytes=300, policy="lfu")
    for key in KEYS[:3]:
        backend.put(key, b"x" * 100)
    for _ in range(2):
        assert backend.get_prefix([KEYS[0]]) == [b"x" * 100]
    backend.get_prefix([KEYS[1]])
    backend.put(KEYS[3], b"y" * 100)  # KEYS[2] (0 hits, oldest of the unread) goes
    assert set(backend.keys()) == {KEYS[0], KEYS[1], KEYS[3]}
    backend.put(KEYS[4], b"z" * 100)  # KEYS[3] (0 hits) goes, not KEYS[1] (1 hit), though KEYS[1] is older
    assert set(backend.keys()) == {KEYS[0], KEYS[1], KEYS[4]}
    assert backend.keys()[-1] == KEYS[0]  # the most hits is the last to go


def test_size_aware_keeps_more_hits_per_byte():
    """Same hits: the larger block goes first; and its priority ages (GDSF clock) so old hits do not pin it."""
    backend = MemoryBackend(max_bytes=1000, policy="size")
    backend.put(KEYS[0], b"L" * 600)
    backend.put(KEYS[1], b"s" * 100)
    for key in (KEYS[1], KEYS[0]):  # the big block read last
        backend.get_prefix([key])
    backend.put(KEYS[2], b"n" * 350)  # 1050 bytes: the big block has fewer hits per byte
    assert set(backend.keys()) == {KEYS[1], KEYS[2]}
    lru = MemoryBackend(max_bytes=1000, policy="lru")
    lru.put(KEYS[0], b"L" * 600)
    lru.put(KEYS[1], b"s" * 100)
    for key in (KEYS[1], KEYS[0]):
        lru.get_prefix([key])
    lru.put(KEYS[2], b"n" * 350)
    assert set(lru.keys()) == {KEYS[0], KEYS[2]}  # LRU drops the small, recently read block instead
    assert backend.policy.clock > 0  # the victim's priority became the new baseline


def test_orphans_are_never_served_and_go_first():
    backend = MemoryBackend(max_bytes=400, policy="lfu")
    put_chain(backend, KEYS[:3])
    backend.get_prefix(KEYS[:3])
    backend.delete(KEYS[0])  # e.g. found corrupt: its descendants can no longer be reached
    assert backend.get_prefix(KEYS[:3]) == []
    assert set(backend.keys()[:2]) == {KEYS[1], KEYS[2]}  # ranked first for eviction despite their hits
    for key in KEYS[20:24]:  # room for 4: the two orphans go, not the new blocks
        backend.put(key, b"n" * 100)
    assert set(backend.keys()) == set(KEYS[20:24])
    put_chain(backend, KEYS[:2])  # re-saving the chain makes its blocks servable again
    assert len(backend.get_prefix(KEYS[:2])) == 2


def test_a_chain_longer_than_the_budget_keeps_its_first_blocks():
    backend = MemoryBackend(max_bytes=350, policy="lru")
    stored = [backend.put(key, b"x" * 100, KEYS[i - 1] if i else None) for i, key in enumerate(KEYS[:5])]
    assert stored == [True, True, True, False, False]
    assert backend.keys() and len(backend.get_prefix(KEYS[:5])) == 3 and backend.evictions == 0


def test_policy_is_checked():
    with pytest.raises(ValueError, match=r"policy='lru ' is not supported; accepted values: lru, lfu, size"):
        MemoryBackend(policy="lru ")


def zipf_requests(documents: int, requests: int, exponent: float, seed: int) -> list[int]:
    weights = [1 / (rank + 1) ** exponent for rank in range(documents)]
    return random.Random(seed).choices(range(documents), weights, k=requests)


def replay_hit_rate(policy: str, requests: list[int], blocks_per_document: int, budget_blocks: int) -> float:
    backend = MemoryBackend(max_bytes=budget_blocks * 100, policy=policy)
    hits = asked = 0
    for document in requests:
        chain = [f"{document:08x}{depth:08x}" * 4 for depth in range(blocks_per_document)]
        found = len(backend.get_prefix(chain))
        hits, asked = hits + found, asked + len(chain)
        for depth in range(found, len(chain)):
            backend.put(chain[depth], b"x" * 100, chain[depth - 1] if depth else None)
    return hits / asked


def test_lfu_and_size_aware_beat_lru_on_a_skewed_workload():
    """Zipf popularity over 60 documents of 4 blocks, room for 40 blocks: frequency beats recency."""
    requests = zipf_requests(60, 3000, 1.1, seed=0)
    rates = {policy: replay_hit_rate(policy, requests, 4, 40) for policy in POLICIES}
    assert rates["lfu"] > rates["lru"] + 0.05 and rates["size"] > rates["lru"] + 0.05, rates


def test_disk_evicts_a_chain_from_its_end(tmp_path):
    backend = DiskBackend(tmp_path, max_bytes=350)
    put_chain(backend, KEYS[:3])
    backend.get_prefix(KEYS[:3])
    backend.put(KEYS[40], b"n" * 100)  # over budget: the end of the chain goes, not its first block
    assert [backend.file(k).exists() for k in KEYS[:3]] == [True, True, False]
    assert len(backend.get_prefix(KEYS[:3])) == 2


def test_disk_stamps_continue_a_chain_fetched_in_several_requests(tmp_path):
    """A prompt read in requests of 2 blocks: every block is stamped before the one it extends."""
    backend = DiskBackend(tmp_path)
    put_chain(backend, KEYS[:6])
    for start in range(0, 6, 2):
        backend.get_prefix(KEYS[start : start + 2], KEYS[start - 1] if start else None)
    stamps = [backend.file(key).stat().st_mtime_ns for key in KEYS[:6]]
    assert stamps == sorted(stamps, reverse=True) and len(set(stamps)) == 6


def test_disk_never_touches_files_that_are_not_its_blocks(tmp_path):
    """A store opened on a folder that holds other safetensors files: they are not counted, evicted or cleared."""
    foreign = [tmp_path / "my-finetune" / "model.safetensors", tmp_path / "ab" / "adapter_model.safetensors"]
    for path in foreign:
        path.parent.mkdir()
        path.write_bytes(b"w" * 3000)
    backend = DiskBackend(tmp_path, max_bytes=2500)
    backend.put(KEYS[0], b"x" * 1000)
    backend.put(KEYS[1], b"y" * 1000)
    assert backend.nbytes() == 2000 and [key for key, _, _ in backend.inventory()] != []
    assert backend.clear() == 2 and all(path.exists() for path in foreign)


def test_keys_are_listed_in_eviction_order():
    backend = MemoryBackend(max_bytes=300)
    backend.put(KEYS[0], b"x" * 100)
    backend.put(KEYS[1], b"x" * 100, KEYS[0])
    backend.put(KEYS[2], b"x" * 100)
    order = backend.keys()
    assert order == [KEYS[1], KEYS[0], KEYS[2]]  # KEYS[0] cannot go while KEYS[1] extends it
    backend.put(KEYS[3], b"x" * 100)
    assert KEYS[1] not in set(backend.keys()) and backend.evictions == 1


def test_a_block_extending_an_orphan_is_an_orphan():
    """A chain that lost an earlier block stays unservable when it grows: its new blocks go first too."""
    backend = MemoryBackend(max_bytes=400)
    put_chain(backend, KEYS[:2])
    backend.put(KEYS[9], b"y" * 100)
    backend.delete(KEYS[0])
    backend.put(KEYS[2], b"z" * 100, KEYS[1])
    assert backend._blocks[KEYS[2]].orphan and set(backend.keys()[:2]) == {KEYS[1], KEYS[2]}
    backend.put(KEYS[10], b"n" * 100)
    backend.put(KEYS[11], b"n" * 100)  # over budget: an orphan goes, not KEYS[9]
    assert KEYS[9] in set(backend.keys()) and backend.evictions == 1
