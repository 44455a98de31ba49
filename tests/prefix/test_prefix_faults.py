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
from hf_kvcache.prefix.keys import block_keys

GREEDY = {"max_new_tokens": 5, "do_sample": False}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def damage_second_block(store, model, ids, damage):
    """Rewrite the stored bytes of the prompt's second block with `damage(bytes)`."""
    key = block_keys(store.fingerprint(model, None), ids[0].tolist(), store.block_size)[1]
    (data,) = store.backend.get_prefix([key])
    store.backend.put(key, damage(data))


DAMAGES = {
    "corrupt": lambda data: data[:-7] + bytes([data[-7] ^ 0xFF]) + data[-6:],
    "truncated": lambda data: data[: len(data) // 3],
    "empty": lambda data: b"",
}


def make_backend(kind: str, tmp_path, request):
    if kind == "memory":
        return MemoryBackend()
    if kind == "disk":
        return DiskBackend(tmp_path)
    return RedisBackend(request.getfixturevalue("redis_server").url)


BACKENDS = ["memory", "disk", "redis"]


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", BACKENDS)
def test_damaged_entry_is_a_logged_miss_then_rewritten(model, kind, damage, tmp_path, caplog, request):
    store = PrefixCache(make_backend(kind, tmp_path, request), block_size=8)
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


@pytest.mark.parametrize("kind", BACKENDS)
def test_stale_entry_for_another_key_is_a_miss(model, kind, tmp_path, caplog, request):
    """Bytes of the right shape and a valid checksum, but written for another block, are refused."""
    store = PrefixCache(make_backend(kind, tmp_path, request), block_size=8)
    ids = random_ids(model, 1, 30)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    keys = block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)
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


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


class FlakyBackend(MemoryBackend):
    """A memory backend whose every call fails while `down` is set."""

    down = False

    def get_prefix(self, keys, parent=None):
        if self.down:
            raise BackendError("connection refused")
        return super().get_prefix(keys, parent)

    def put(self, key, value, parent=None):
        if self.down:
            raise BackendError("connection refused")
        return super().put(key, value, parent)


def test_an_outage_warns_once_and_its_recovery_once(model, caplog):
    store = PrefixCache(FlakyBackend(), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    store.backend.down = True
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        for _ in range(5):
            assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
        store.backend.down = False
        for _ in range(2):
            assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    messages = warnings_of(caplog)
    assert len(messages) == 2 and "unavailable" in messages[0] and "reachable again" in messages[1]
    assert store.stats()["errors"] == 10 and store.stats()["hits"] == 3  # 5 lookups + 5 saves failed


def test_a_redis_entry_of_the_wrong_type_is_one_unusable_entry(model, redis_server, caplog):
    """Another client wrote a list under a block's key: that block is a miss, repaired by the next save."""
    import redis

    store = PrefixCache(RedisBackend(redis_server.url), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    key = block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)[1]
    client = redis.Redis.from_url(redis_server.url)
    client.delete(store.backend.prefix + key)
    client.rpush(store.backend.prefix + key, b"not a block")
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert "unusable" in caplog.text and "unavailable" not in caplog.text
    for _ in range(3):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["hits"] == 1 + 3 * 3 and client.type(store.backend.prefix + key) == b"string"


def test_disk_store_faults_never_escape(model, tmp_path, monkeypatch, caplog):
    """A damaged file that cannot be deleted, old files that cannot be evicted, the store folder deleted:
    every request is answered (misses), the store stays within max_bytes, and comes back by itself."""
    import shutil
    from pathlib import Path

    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    store = PrefixCache(DiskBackend(tmp_path / "store"), block_size=8)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    damage_second_block(store, model, ids, DAMAGES["corrupt"])
    real_unlink = Path.unlink

    def read_only_unlink(path, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "unlink", read_only_unlink)  # as a read-only store (root ignores chmod)
    for _ in range(2):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    block_bytes = store.backend.nbytes() // 3
    small = PrefixCache(DiskBackend(tmp_path / "small", max_bytes=3 * block_bytes), block_size=8)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    generate_with_prefix_cache(model, ids, small, **GREEDY)  # fills the budget
    old = set((tmp_path / "small").glob("*/*.safetensors"))

    def old_files_stay(path, missing_ok=False):  # old files sit in read-only folders, new ones do not
        return read_only_unlink(path) if path in old else real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", old_files_stay)
    for seed in range(3):
        other = random_ids(model, 1, 30, seed=20 + seed)
        assert torch.equal(generate_with_prefix_cache(model, other, small, **GREEDY), model.generate(other, **GREEDY))
    monkeypatch.setattr(Path, "unlink", real_unlink)
    # the budget is full of files that cannot go: each new block is refused (one error per request), and
    # nothing raised out of generate
    assert small.backend.nbytes() <= 3 * block_bytes and small.stats()["errors"] == 3
    assert old <= set((tmp_path / "small").glob("*/*.safetensors"))
    shutil.rmtree(tmp_path / "store")
    for _ in range(2):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["hits"] >= 3  # the folder was created again and the blocks stored again


def test_blocks_larger_than_the_budget_are_not_counted_as_saved(model):
    store = PrefixCache(MemoryBackend(max_bytes=100), block_size=8)
    generate_with_prefix_cache(model, random_ids(model, 1, 30), store, **GREEDY)
    assert store.stats()["blocks_saved"] == 0 and store.stats()["bytes_stored"] == 0


def test_hidden_states_and_attentions_are_refused_rather_than_cut(model):
    store = PrefixCache(MemoryBackend(), block_size=8)
    for name in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{name}=True is not supported with a prefix store"):
            generate_with_prefix_cache(
                model, random_ids(model, 1, 30), store, return_dict_in_generate=True, **{name: True}
            )


def test_redis_flushed_mid_run_is_a_miss_then_refilled(model, redis_server):
    import redis

    store = PrefixCache(RedisBackend(redis_server.url), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    redis.Redis.from_url(redis_server.url).flushall()
    for _ in range(2):
        assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    stats = store.stats()
    assert (stats["hits"], stats["errors"]) == (3, 0)  # the flushed lookup missed, the next one hit


def test_a_full_redis_refuses_writes_not_reads(caplog):
    """maxmemory under `noeviction`: writes that do not fit fail one by one (one warning), reads go on."""
    from hf_kvcache.prefix.redis_server import LocalRedisServer

    with LocalRedisServer(extra_args=["--maxmemory", "4mb"]) as server:
        backend = RedisBackend(server.url)
        keys = [f"{i:02x}" * 32 for i in range(12)]
        with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
            stored = [backend.put(key, bytes([i]) * 400_000) for i, key in enumerate(keys)]
        assert stored[0] and not stored[-1] and stored == sorted(stored, reverse=True)
        kept = stored.count(True)
        assert backend.get_prefix(keys) == [bytes([i]) * 400_000 for i in range(kept)]  # not an outage
        assert len(warnings_of(caplog)) == 1 and "full and may not evict" in warnings_of(caplog)[0]


def test_a_plain_client_on_a_cluster_node_says_so(redis_cluster):
    backend = RedisBackend(redis_cluster.url)
    with pytest.raises(BackendError, match="pass cluster=True"):
        for i in range(16):  # some key lands on another node's slots
            backend.put(f"{i:02x}" * 32, b"x")
