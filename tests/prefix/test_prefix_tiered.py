"""Tiers (read-through with promotion, write-through, a failing level skipped), per-level statistics,
and prefetching restores that return exactly what one request returns."""

import logging
import threading

import pytest
import torch
from conftest import make_tiny_model
from helpers import Switchable, random_ids
from transformers import DynamicCache

from hf_kvcache.prefix import (
    BackendError,
    DiskBackend,
    MemoryBackend,
    PrefixCache,
    RedisBackend,
    TieredBackend,
    generate_with_prefix_cache,
)
from hf_kvcache.prefix.keys import block_keys

GREEDY = {"max_new_tokens": 5, "do_sample": False}
KEYS = [f"{i:04x}" * 16 for i in range(12)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def chain(backend, keys):
    for depth, key in enumerate(keys):
        backend.put(key, bytes([depth]) * 10, keys[depth - 1] if depth else None)


def test_read_through_promotes_with_chain_parents():
    fast, slow = MemoryBackend(max_bytes=25, policy="lfu"), MemoryBackend()
    tiered = TieredBackend(fast, slow)
    chain(slow, KEYS[:4])
    chain(fast, KEYS[:1])
    assert tiered.get_prefix(KEYS[:5]) == [bytes([d]) * 10 for d in range(4)]
    first, second = tiered.tier_stats()
    assert (first["hits"], first["misses"], first["promotions"]) == (1, 4, 1)  # room for 2 more of 10 bytes
    assert (second["hits"], second["misses"]) == (3, 1)
    assert fast.get_prefix(KEYS[:4]) == [bytes([0]) * 10, bytes([1]) * 10]  # the chain's first blocks
    tiered.get_prefix(KEYS[:2])
    assert tiered.tier_stats()[1]["fetches"] == 1  # served by the first level alone


def test_write_through_and_delete_reach_every_level(tmp_path):
    memory, disk = MemoryBackend(), DiskBackend(tmp_path)
    tiered = TieredBackend(memory, disk)
    chain(tiered, KEYS[:3])
    assert memory.get_prefix(KEYS[:3]) == disk.get_prefix(KEYS[:3]) == [bytes([d]) * 10 for d in range(3)]
    assert tiered.nbytes() == 60 and tiered.tier_stats()[0]["writes"] == 3
    tiered.delete(KEYS[1])
    assert len(memory.get_prefix(KEYS[:3])) == len(disk.get_prefix(KEYS[:3])) == 1


def test_a_failing_level_is_skipped_with_one_warning(caplog):
    fast, slow = MemoryBackend(), Switchable()
    tiered = TieredBackend(fast, slow)
    chain(tiered, KEYS[:2])
    slow.down = True
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        for _ in range(3):
            assert tiered.put(KEYS[2], b"x" * 10, KEYS[1])  # kept by the memory level
            assert len(tiered.get_prefix(KEYS[:4])) == 3
        slow.down = False
        assert tiered.get_prefix(KEYS[:4]) and tiered.put(KEYS[3], b"y", KEYS[2])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "unavailable" in messages[0] and "reachable again" in messages[1]
    assert tiered.tier_stats()[1]["errors"] == 6
    fast_down = Switchable()
    both = TieredBackend(fast_down, Switchable())
    fast_down.down = both.levels[1].down = True
    with pytest.raises(BackendError, match="every level failed"):
        both.get_prefix(KEYS[:1])
    with pytest.raises(BackendError, match="every level failed"):
        both.put(KEYS[0], b"x")


def test_levels_are_checked():
    with pytest.raises(ValueError, match="two or more different prefix backends"):
        TieredBackend(MemoryBackend())
    with pytest.raises(ValueError, match="two or more different prefix backends"):
        TieredBackend(MemoryBackend(), "redis://localhost")
    same = MemoryBackend()
    with pytest.raises(ValueError, match="two or more different prefix backends"):
        TieredBackend(same, same)
    with pytest.raises(ValueError, match="promote='yes' must be True or False"):
        TieredBackend(MemoryBackend(), MemoryBackend(), promote="yes")


def test_memory_over_redis_outputs_equal_generate_and_stats_show_the_tiers(model, redis_server):
    memory = MemoryBackend()
    store = PrefixCache(TieredBackend(memory, RedisBackend(redis_server.url)), block_size=8)
    ids = random_ids(model, 1, 45)
    reference = model.generate(ids, **GREEDY)
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    for key in list(memory.keys()):  # a restarted process: the memory level is empty, Redis is not
        memory.delete(key)
    for _ in range(2):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    stats = store.stats()
    first, second = stats["tiers"]
    assert stats["hits"] == 10 and stats["errors"] == 0
    assert (first["hits"], second["hits"], first["promotions"]) == (5, 5, 5)  # the second warm lookup: memory only
    # Redis asked by the cold lookup (1 request) and the first warm one (blocks 0-3, then 4): 3, none after.
    assert second["fetches"] == 3 and first["fetch_ms_p95"] is not None and stats["fetch_ms_mean"] > 0
    assert "fetch" in repr(store)


@pytest.mark.parametrize("prefetch_blocks", [0, 1, 2, 3])
def test_prefetch_restores_what_one_request_restores(model, prefetch_blocks):
    """Requests of 1-3 blocks with the next one in flight: same KV and counters; a missing block stops it."""
    ids = random_ids(model, 1, 61)
    backend = MemoryBackend()
    writer = PrefixCache(backend, block_size=8)
    generate_with_prefix_cache(model, ids, writer, **GREEDY)  # saves the prompt's 7 whole blocks
    reference = DynamicCache(config=model.config)
    assert PrefixCache(backend, block_size=8, prefetch_blocks=0).restore(model, ids, reference) == 56
    store = PrefixCache(backend, block_size=8, prefetch_blocks=prefetch_blocks)
    cache = DynamicCache(config=model.config)
    assert store.restore(model, ids, cache) == 56
    for restored, expected in zip(cache.layers, reference.layers):
        assert torch.equal(restored.keys, expected.keys) and torch.equal(restored.values, expected.values)
    backend.delete(block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)[4])
    assert store.restore(model, ids, DynamicCache(config=model.config)) == 32
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["errors"]) == (7 + 4, 0 + 3, 0)
    # Requests sent: all 7 blocks, then up to the one holding the missing block 4 (none after it).
    requests = (1, 1) if prefetch_blocks == 0 else (-(-7 // prefetch_blocks), 4 // prefetch_blocks + 1)
    assert store.backend_stats.fetches == sum(requests)


def test_prefetch_overlaps_transfer_with_decoding(model):
    """A slow level (20 ms a request): the next request runs while the current blocks are decoded."""
    ids = random_ids(model, 1, 161)
    slow = Switchable()
    generate_with_prefix_cache(model, ids, PrefixCache(slow, block_size=8), **GREEDY)
    slow.delay = 0.02
    seen_threads = set()
    original = slow.get_prefix

    def spy(keys, parent=None):
        seen_threads.add(threading.current_thread().name)
        return original(keys, parent)

    slow.get_prefix = spy
    store = PrefixCache(slow, block_size=8, prefetch_blocks=4)
    assert store.restore(model, ids, DynamicCache(config=model.config)) == 160
    assert store.stats()["hits"] == 20 and any(name.startswith("hf_kvcache-prefetch") for name in seen_threads)


def test_a_long_prefix_promoted_in_several_requests_keeps_its_chain(model, tmp_path):
    """Requests of 2 blocks: each promoted block names the block before it as parent, across requests, so
    a budget on the fast level still leaves a servable prefix."""
    ids = random_ids(model, 1, 65)
    fast, slow = MemoryBackend(), DiskBackend(tmp_path)
    store = PrefixCache(TieredBackend(fast, slow), block_size=8, prefetch_blocks=2)
    generate_with_prefix_cache(model, ids, store, **GREEDY)  # 8 blocks in both levels
    fast.clear()
    assert store.restore(model, ids, DynamicCache(config=model.config)) == 64
    keys = block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)
    assert [fast._blocks[key].parent for key in keys] == [None, *keys[:-1]]
    fast.max_bytes = fast.nbytes() // 2  # a smaller budget: the next write evicts chain ends only
    fast.put("ff" * 32, b"x")
    held = [key in fast._blocks for key in keys]
    assert held == sorted(held, reverse=True) and 0 < sum(held) < 8
