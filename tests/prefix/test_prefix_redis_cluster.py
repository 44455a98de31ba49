"""RedisBackend(cluster=True) on a local Redis Cluster (3 masters, a replica each): round trips with keys on
several masters, outputs equal to plain generate, and a master killed mid-run: misses, never wrong tokens."""

import logging
import time

import pytest
import redis
import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache.prefix import BackendError, PrefixCache, RedisBackend, generate_with_prefix_cache
from hf_kvcache.prefix.keys import block_keys
from hf_kvcache.prefix.redis_server import free_port

GREEDY = {"max_new_tokens": 5, "do_sample": False}
KEYS = [f"{i:04x}" * 16 for i in range(12)]  # 64 hex digits, like the store's keys


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def prompts(model, count: int) -> list[torch.Tensor]:
    """Prompts sharing a 37-token prefix, with tails of different lengths (40 to 40 + 2 * (count - 1) tokens)."""
    prefix = random_ids(model, 1, 37, seed=1)
    return [torch.cat([prefix, random_ids(model, 1, 3 + 2 * i, seed=10 + i)], dim=1) for i in range(count)]


def master_of(backend: RedisBackend, key: str) -> redis.Redis:
    """A plain client of the master that serves a store key's slot, found in the cluster client's slot table."""
    node = backend.client.get_node_from_key(backend.prefix + key)
    return redis.Redis(node.host, node.port)


def test_round_trip_with_keys_on_every_master(redis_cluster):
    backend = RedisBackend(redis_cluster.url, prefix="test:", cluster=True)
    assert repr(backend) == f"RedisBackend(cluster='127.0.0.1:{redis_cluster.nodes[0].port}', prefix='test:', ttl=None)"
    values = [bytes([i]) * (i + 1) for i in range(len(KEYS))]
    for key, value in zip(KEYS, values):
        assert backend.put(key, value, parent=None)
    assert backend.get_prefix(KEYS) == values
    # Each key really lives on the master its slot names (asked without the cluster client), on all three.
    masters = [master_of(backend, key) for key in KEYS]
    assert all(master.get("test:" + key) == value for master, key, value in zip(masters, KEYS, values))
    assert len({master.connection_pool.connection_kwargs["port"] for master in masters}) == 3
    assert backend.nbytes() == sum(map(len, values))

    backend.delete(KEYS[5])
    assert backend.get_prefix(KEYS) == values[:5] and backend.nbytes() == sum(map(len, values)) - 6

    with master_of(backend, KEYS[2]).pipeline() as pipe:  # another client's key of the wrong type
        pipe.delete("test:" + KEYS[2]).rpush("test:" + KEYS[2], b"a list").execute()
    assert backend.get_prefix(KEYS[:4]) == values[:2]  # an unusable entry, not an outage: deleted
    assert backend.get_prefix(KEYS[2:3]) == []

    other = RedisBackend(redis_cluster.url, prefix="other:", ttl=60, cluster=True)
    other.put(KEYS[0], b"kept")
    backend.clear()
    assert backend.get_prefix(KEYS) == [] and backend.nbytes() == 0
    assert other.get_prefix(KEYS[:1]) == [b"kept"] and 0 < other.client.ttl("other:" + KEYS[0]) <= 60


def test_outputs_equal_plain_generate_cold_and_warm(model, redis_cluster):
    store = PrefixCache(RedisBackend(redis_cluster.url, cluster=True), block_size=8)
    requests = prompts(model, 3)
    for ids in requests:
        reference = model.generate(ids, **GREEDY)
        for _ in range(2):  # first call with this tail: cold for it; second: fully warm
            assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    stats = store.stats()
    # Prompts of 40, 42, 44 tokens: 4, 5, 5 usable blocks; the shared prefix is cold only once.
    assert (stats["hits"], stats["misses"], stats["errors"]) == (4 + 4 + 5 + 4 + 5, 4 + 1 + 1, 0)
    keys = block_keys(store.fingerprint(model, None), requests[2][0].tolist(), 8)
    assert len({master_of(store.backend, key).connection_pool.connection_kwargs["port"] for key in keys}) > 1


def test_master_killed_mid_run_costs_misses_never_wrong_tokens(model, redis_cluster, caplog):
    store = PrefixCache(RedisBackend(redis_cluster.url, cluster=True, retry_after=0), block_size=8)
    requests = prompts(model, 4)
    references = [model.generate(ids, **GREEDY) for ids in requests]
    wrong = 0
    longest = 0.0

    def serve(index: int) -> None:
        nonlocal wrong, longest
        start = time.monotonic()
        output = generate_with_prefix_cache(model, requests[index], store, **GREEDY)
        longest = max(longest, time.monotonic() - start)
        wrong += not torch.equal(output, references[index])

    for index in range(len(requests)):
        serve(index)
    # The master of the block every prompt starts with: each lookup fails until its replica takes over.
    first_block = block_keys(store.fingerprint(model, None), requests[0][0].tolist(), 8)[0]
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        killed = redis_cluster.kill_master(store.backend.prefix + first_block)
        deadline = time.monotonic() + 30
        served = 0
        while True:  # keep serving through the failover until a request meets no failure
            errors = store.stats()["errors"]
            serve(served % len(requests))
            served += 1
            if store.stats()["errors"] == errors:
                break
            assert time.monotonic() < deadline, "the client never reached the promoted replica"
        redis_cluster.wait_for_failover()
        for index in range(len(requests)):  # saves any block a failed request could not
            serve(index)
        during = store.stats()
        for index in range(len(requests)):
            serve(index)
    after = store.stats()
    assert wrong == 0 and served > 1 and during["errors"] >= served - 1
    assert "prefix store unavailable" in caplog.text and "reachable again" in caplog.text
    # Every block of the 40- to 46-token prompts (4, 5, 5, 5 usable) hits, on the surviving and promoted masters.
    assert (after["hits"] - during["hits"], after["misses"], after["errors"]) == (
        19,
        during["misses"],
        during["errors"],
    )
    assert redis_cluster.master_port(store.backend.prefix + first_block) != killed
    assert longest < 5.0  # a failing call costs milliseconds (a dead node refuses at once), not retries


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cluster": "yes"}, "cluster='yes' must be True or False"),
        ({"cluster": 1}, "cluster=1 must be True or False"),
        ({"cluster": True, "socket_timeuot": 1.0}, "not a redis-py cluster option: socket_timeuot"),
        ({"cluster": True, "db": 0}, "not a redis-py cluster option: db"),
        ({"cluster": False, "socket_timeuot": 1.0}, "socket_timeuot"),
        ({"cluster": True, "url": "unix:///tmp/redis.sock"}, "TCP"),
        ({"cluster": True, "url": "redis://127.0.0.1:7000/2"}, "database 0 only"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RedisBackend(**kwargs)


def test_an_unreachable_cluster_is_a_backend_error_not_a_failed_start():
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}", cluster=True)  # nothing listens there
    with pytest.raises(BackendError, match=r"Redis Cluster via 127\.0\.0\.1"):
        backend.get_prefix(KEYS[:1])
    assert backend.nbytes() is None


def test_capped_reads_and_foreign_keys_on_a_cluster(redis_cluster, caplog):
    """`max_bytes` on a cluster: EXISTS + GETRANGE (+ EXPIRE) per key, pipelined per node; an oversized value ends
    the prefix and is deleted, a key of another type under the prefix is skipped by `nbytes()`, never an outage."""
    backend = RedisBackend(redis_cluster.url, prefix="capped:", ttl=60, cluster=True)
    values = [bytes([i]) * 10 for i in range(6)]
    for key, value in zip(KEYS, values):
        backend.put(key, value)
    backend.put(KEYS[3], b"x" * 5000)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix(KEYS[:6], max_bytes=10) == values[:3]
    assert "5000 bytes" in caplog.text and master_of(backend, KEYS[3]).exists("capped:" + KEYS[3]) == 0
    assert 0 < master_of(backend, KEYS[1]).ttl("capped:" + KEYS[1]) <= 60
    master_of(backend, KEYS[7]).rpush("capped:" + KEYS[7], b"a list")
    assert backend.nbytes() == 10 * 5 and backend.foreign_keys == 1
    assert backend.get_prefix(KEYS[:3], max_bytes=10) == values[:3]  # not marked down by the listing
    backend.clear()
