"""Faults: corrupt, truncated, stale entries and a dead or hanging Redis are misses with a warning."""

import logging
import signal

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache.prefix import (
    BackendError,
    DiskBackend,
    MemoryBackend,
    PrefixCache,
    RedisBackend,
    generate_with_prefix_cache,
)
from hf_kvcache.prefix.keys import block_keys, model_fingerprint

GREEDY = {"max_new_tokens": 5, "do_sample": False}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def damage_second_block(store, model, ids, damage):
    """Rewrite the stored bytes of the prompt's second block with `damage(bytes)`."""
    key = block_keys(model_fingerprint(model), ids[0].tolist(), store.block_size)[1]
    (data,) = store.backend.get_prefix([key])
    store.backend.put(key, damage(data))


DAMAGES = {
    "corrupt": lambda data: data[:-7] + bytes([data[-7] ^ 0xFF]) + data[-6:],
    "truncated": lambda data: data[: len(data) // 3],
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_damaged_entry_is_a_logged_miss_then_rewritten(model, kind, damage, tmp_path, caplog):
    backend = MemoryBackend() if kind == "memory" else DiskBackend(tmp_path)
    store = PrefixCache(backend, block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    damage_second_block(store, model, ids, DAMAGES[damage])
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert "unusable" in caplog.text
    stats = store.stats()
    assert stats["hits"] == 1 and stats["misses"] == 3 + 2 and stats["errors"] == 1
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["hits"] == 1 + 3  # the damaged block was recomputed and stored again


def test_stale_entry_for_another_key_is_a_miss(model, caplog):
    """Bytes of the right shape and a valid checksum, but written for another block, are refused."""
    store = PrefixCache(MemoryBackend(), block_size=8)
    ids = random_ids(model, 1, 30)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    keys = block_keys(model_fingerprint(model), ids[0].tolist(), 8)
    (other,) = store.backend.get_prefix([keys[2]])
    store.backend.put(keys[0], other)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), model.generate(ids, **GREEDY))
    assert "stale or foreign entry: key=" in caplog.text and store.stats()["hits"] == 0


def test_redis_killed_and_restarted(model, redis_server, caplog):
    store = PrefixCache(RedisBackend(redis_server.url, retry_after=0), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    redis_server.stop(kill=True)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert "recomputing" in caplog.text
    assert store.stats()["errors"] == 2  # the lookup and the save both failed, neither raised
    assert store.stats()["bytes_held"] is None
    redis_server.start()  # same port, empty (no persistence)
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    stats = store.stats()
    # Cold, outage, cold again (the restarted server is empty), warm: only the last call hits.
    assert (stats["hits"], stats["misses"], stats["errors"]) == (3, 9, 2) and stats["bytes_held"] > 0


def test_redis_timeout_is_a_miss_and_recovers(model, redis_server, caplog):
    store = PrefixCache(RedisBackend(redis_server.url, socket_timeout=0.3, retry_after=0), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    redis_server.process.send_signal(signal.SIGSTOP)  # the server hangs: every call times out
    try:
        with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
            assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
        assert "Timeout" in caplog.text or "timed out" in caplog.text
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["hits"] == 3 and store.stats()["errors"] == 2


def test_outage_is_skipped_for_retry_after_seconds(redis_server):
    """After a failure the server is left alone for `retry_after` seconds: one timeout per outage."""
    backend = RedisBackend(redis_server.url, retry_after=60)
    redis_server.stop(kill=True)
    with pytest.raises(BackendError, match=r"Connection refused|connecting"):
        backend.get_prefix(["ab" * 32])
    redis_server.start()
    with pytest.raises(BackendError, match="unavailable"):
        backend.get_prefix(["ab" * 32])
    assert RedisBackend(redis_server.url).get_prefix(["ab" * 32]) == []  # the server itself is back
