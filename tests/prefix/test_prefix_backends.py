"""The three backends: round trips, LRU order under a byte budget, restarts, threads, Redis namespaces."""

import threading
import time

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from transformers import DynamicCache

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.prefix import BackendError, DiskBackend, MemoryBackend, PrefixCache, RedisBackend
from hf_kvcache.prefix.redis_server import LocalRedisServer

KEYS = [f"{i:02x}" * 32 for i in range(6)]


@pytest.fixture(params=["memory", "disk", "redis"])
def backend(request, tmp_path):
    if request.param == "memory":
        return MemoryBackend(max_bytes=1 << 20)
    if request.param == "disk":
        return DiskBackend(tmp_path / "store", max_bytes=1 << 20)
    server = request.getfixturevalue("redis_server")
    return RedisBackend(server.url, prefix="test:")


def test_backend_round_trip(backend):
    assert backend.get_prefix(KEYS) == []
    for i, key in enumerate(KEYS[:4]):
        backend.put(key, bytes([i]) * (10 + i))
    assert backend.get_prefix(KEYS[:3]) == [b"\x00" * 10, b"\x01" * 11, b"\x02" * 12]
    backend.delete(KEYS[1])
    assert backend.get_prefix(KEYS) == [b"\x00" * 10]  # stops at the first missing key
    backend.put(KEYS[0], b"new")
    assert backend.get_prefix(KEYS[:1]) == [b"new"]
    assert backend.nbytes() == 3 + 12 + 13


def test_prefix_cache_round_trip_restores_exact_kv(backend):
    """KV saved from a forward pass comes back bit for bit into a fresh DynamicCache."""
    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 29)
    with torch.no_grad():
        reference = model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}).past_key_values
    store = PrefixCache(backend, block_size=8)
    layers = [(layer.keys, layer.values) for layer in reference.layers]
    assert store.save(model, ids, layers) == 3
    cache = DynamicCache(config=model.config)
    assert store.restore(model, ids, cache) == 24
    for restored, original in zip(cache.layers, reference.layers):
        assert torch.equal(restored.keys, original.keys[:, :, :24])
        assert torch.equal(restored.values, original.values[:, :, :24])
    assert store.restore(model, ids, DynamicCache(config=model.config), max_tokens=20) == 16
    stats = store.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"], stats["tokens_reused"]) == (2, 5, 0, 40)
    assert stats["blocks_saved"] == 3 and stats["bytes_stored"] == stats["bytes_held"] > 0
    assert "hit rate 100.0%" in repr(store)


def test_memory_lru_order_and_budget():
    backend = MemoryBackend(max_bytes=300)
    for key in KEYS[:3]:
        backend.put(key, b"x" * 100)
    backend.get_prefix([KEYS[0]])  # KEYS[0] is now the most recently used
    backend.put(KEYS[3], b"y" * 100)
    assert backend.keys() == [KEYS[2], KEYS[0], KEYS[3]]
    backend.put(KEYS[4], b"z" * 150)
    assert backend.keys() == [KEYS[3], KEYS[4]] and backend.nbytes() == 250 and backend.evictions == 3
    backend.put(KEYS[5], b"w" * 301)  # larger than the whole budget: not stored, nothing evicted
    assert backend.keys() == [KEYS[3], KEYS[4]] and backend.evictions == 3


def test_disk_lru_order_budget_and_restart(tmp_path):
    backend = DiskBackend(tmp_path, max_bytes=300)
    for key in KEYS[:3]:
        backend.put(key, b"x" * 100)
        time.sleep(0.01)
    backend.get_prefix([KEYS[0]])
    time.sleep(0.01)
    backend.put(KEYS[3], b"y" * 100)
    assert not backend.file(KEYS[1]).exists() and backend.evictions == 1
    assert all(backend.file(key).exists() for key in (KEYS[0], KEYS[2], KEYS[3]))
    assert backend.nbytes() == 300
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp")]  # writes are atomic renames
    reopened = DiskBackend(tmp_path, max_bytes=300)  # a restart sees the same entries
    assert reopened.get_prefix([KEYS[0]]) == [b"x" * 100] and reopened.nbytes() == 300
    time.sleep(0.01)
    reopened.put(KEYS[4], b"z" * 150)
    assert [k for k in KEYS if reopened.file(k).exists()] == [KEYS[0], KEYS[4]]
    with pytest.raises(ValueError, match="hex"):
        reopened.file("../escape")


def test_disk_write_failure_is_reported(tmp_path):
    backend = DiskBackend(tmp_path)
    (tmp_path / KEYS[0][:2]).write_text("a file where the block folder should be")
    with pytest.raises(BackendError, match="cannot write"):
        backend.put(KEYS[0], b"x")


def test_memory_backend_threads_lose_nothing():
    backend = MemoryBackend(max_bytes=None)
    store = PrefixCache(backend, block_size=4)

    def work(thread: int):
        for i in range(300):
            backend.put(f"{thread:04x}{i:04x}" * 8, bytes([thread]) * (i + 1))
            backend.get_prefix([f"{thread:04x}{i // 2:04x}" * 8])
            store._count(lookups=1, hits=1)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(backend.keys()) == 8 * 300
    assert backend.nbytes() == 8 * sum(range(1, 301))
    assert all(
        backend.get_prefix([f"{t:04x}{i:04x}" * 8]) == [bytes([t]) * (i + 1)] for t in range(8) for i in (0, 299)
    )
    assert store.stats()["lookups"] == 8 * 300


def test_redis_namespaces_ttl_and_password(redis_server):
    first, second = RedisBackend(redis_server.url, prefix="a:"), RedisBackend(redis_server.url, prefix="b:", ttl=60)
    first.put(KEYS[0], b"one")
    second.put(KEYS[0], b"two")
    assert first.get_prefix(KEYS[:1]) == [b"one"] and second.get_prefix(KEYS[:1]) == [b"two"]
    assert 0 < second.client.ttl("b:" + KEYS[0]) <= 60 and first.client.ttl("a:" + KEYS[0]) == -1
    first.clear()
    assert first.get_prefix(KEYS[:1]) == [] and second.get_prefix(KEYS[:1]) == [b"two"]
    with pytest.raises(ValueError, match="ttl"):
        RedisBackend(redis_server.url, ttl=0)


def test_redis_password_is_passed_through(redis_server):
    with LocalRedisServer(redis_server.executable, extra_args=["--requirepass", "s3cret"]) as server:
        RedisBackend(server.url, password="s3cret").put(KEYS[0], b"ok")
        assert RedisBackend(server.url, password="s3cret").get_prefix(KEYS[:1]) == [b"ok"]
        with pytest.raises(BackendError):
            RedisBackend(server.url).get_prefix(KEYS[:1])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MemoryBackend(max_bytes=0), "max_bytes"),
        (lambda: PrefixCache(MemoryBackend(), block_size=0), "block_size"),
        (lambda: PrefixCache("memory"), "backend"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_disk_store_never_grows_past_its_budget_when_old_files_cannot_be_deleted(tmp_path, monkeypatch):
    from pathlib import Path

    backend = DiskBackend(tmp_path, max_bytes=200)
    backend.put("aa" * 16, b"x" * 100)
    backend.put("bb" * 16, b"y" * 100)
    old, real_unlink = set(tmp_path.glob("*/*.safetensors")), Path.unlink

    def old_files_stay(path, missing_ok=False):
        if path in old:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", old_files_stay)
    with pytest.raises(BackendError, match="over max_bytes=200 and 2 files cannot be deleted"):
        backend.put("cc" * 16, b"z" * 100)
    assert backend.nbytes() == 200 and backend.get_prefix(["cc" * 16]) == []
    with pytest.raises(BackendError, match="cannot delete"):
        backend.delete("aa" * 16)
