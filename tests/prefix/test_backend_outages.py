"""Settings refused at construction (Redis ttl, timeouts, retry_after: fuzzed), a leftover temporary file that
cannot be deleted, and one warning per outage (and one on recovery) for a half outage: a level that reads but
cannot write (read-only, or full)."""

import errno
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kvcache.prefix import (
    DiskBackend,
    MemoryBackend,
    PrefixCache,
    RedisBackend,
    TieredBackend,
    generate_with_prefix_cache,
)
from hf_kvcache.prefix.redis_backend import MAX_SECONDS, MAX_TTL
from hf_kvcache.prefix.stats import LevelStats

GREEDY = {"max_new_tokens": 3, "do_sample": False}
TIMEOUTS = ("socket_timeout", "socket_connect_timeout", "retry_after")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, MAX_SECONDS + 1, 1e300, -1.0, True, "1", None])
@pytest.mark.parametrize("name", TIMEOUTS)
def test_timeouts_out_of_range_are_refused_at_construction(name, value):
    with pytest.raises(ValueError) as refused:
        RedisBackend(**{name: value})
    message = str(refused.value)
    assert message.startswith(f"{name}={value!r} ") and f"<= {MAX_SECONDS:g}" in message and "seconds" in message


@pytest.mark.parametrize("value", [MAX_TTL + 1, 10**30, 0, -5, 1.5, math.inf, math.nan, True, "60"])
def test_a_ttl_out_of_redis_range_is_refused_at_construction(value):
    with pytest.raises(ValueError) as refused:
        RedisBackend(ttl=value)
    assert str(refused.value).startswith(f"ttl={value!r} ") and str(MAX_TTL) in str(refused.value)


def test_the_accepted_limits_work_on_a_real_server(redis_server):
    import redis

    backend = RedisBackend(
        redis_server.url, prefix="limits:", ttl=MAX_TTL, socket_timeout=MAX_SECONDS, retry_after=MAX_SECONDS
    )
    assert backend.put("ab" * 32, b"value") and backend.get_prefix(["ab" * 32]) == [b"value"]
    assert backend.get_prefix(["ab" * 32], max_bytes=10) == [b"value"]
    client = redis.Redis.from_url(redis_server.url)
    assert client.ttl("limits:" + "ab" * 32) > MAX_TTL - 60
    with pytest.raises(redis.ResponseError, match="invalid expire"):  # the range is the server's, not ours
        client.set("limits:too-far", b"x", ex=MAX_TTL * 10)
    assert RedisBackend(socket_timeout=1e-3, retry_after=0).retry_after == 0  # the low ends


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(TIMEOUTS),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**20), 10**20),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
)
def test_fuzzed_timeouts_are_accepted_exactly_in_range(name, value):
    number = isinstance(value, int | float) and not isinstance(value, bool)
    low_ok = number and (value >= 0 if name == "retry_after" else value > 0)
    accepted = number and math.isfinite(value) and low_ok and value <= MAX_SECONDS
    if accepted:
        backend = RedisBackend(**{name: value})
        assert name != "retry_after" or backend.retry_after == value
    else:
        with pytest.raises(ValueError, match=rf"^{name}="):
            RedisBackend(**{name: value})


@settings(max_examples=60, deadline=None)
@given(
    value=st.one_of(
        st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none()
    )
)
def test_fuzzed_ttls_are_accepted_exactly_in_range(value):
    accepted = value is None or (type(value) is int and 1 <= value <= MAX_TTL)
    if accepted:
        assert RedisBackend(ttl=value).ttl == value
    else:
        with pytest.raises(ValueError, match=r"^ttl="):
            RedisBackend(ttl=value)


def plant_old_temporary(folder: Path) -> Path:
    (folder / "ab").mkdir(parents=True, exist_ok=True)
    temp = folder / "ab" / ".tmp-left-by-a-dead-writer.safetensors"
    temp.write_bytes(b"half a block")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    return temp


@pytest.fixture
def undeletable(monkeypatch):
    """Temporary files cannot be deleted, as in a read-only folder. Root ignores permissions (no chmod or
    read-only folder stops it), so then `os.unlink` itself refuses them."""
    real_unlink = os.unlink

    def refusing_unlink(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing_unlink)


def test_a_temporary_file_that_cannot_be_deleted_is_one_warning(model, tmp_path, undeletable, caplog):
    """In the constructor, in `stats()` and in every save that evicts: one warning per backend, no exception."""
    temps = [plant_old_temporary(tmp_path / name) for name in ("store", "small")]
    if os.geteuid() != 0:  # a real read-only folder as well, where permissions count
        for temp in temps:
            os.chmod(temp.parent, 0o555)
    exceptions = served = 0
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        try:
            probe = PrefixCache(MemoryBackend(), block_size=8)
            generate_with_prefix_cache(model, random_ids(model, 1, 9), probe, **GREEDY)
            block = probe.stats()["bytes_stored"]
            store = PrefixCache(DiskBackend(temps[0].parent.parent), block_size=8)  # the constructor lists it
            small = PrefixCache(DiskBackend(temps[1].parent.parent, max_bytes=5 * block // 2), block_size=8)
            for seed in range(4):  # 3 blocks a prompt into a budget of 2.5: every save evicts
                ids = random_ids(model, 1, 30, seed=seed)
                reference = model.generate(ids, **GREEDY)
                for cache in (store, small):
                    served += torch.equal(generate_with_prefix_cache(model, ids, cache, **GREEDY), reference)
                    cache.stats()
        except PermissionError:
            exceptions += 1
        finally:
            for temp in temps:
                os.chmod(temp.parent, 0o755)
    assert (served, exceptions) == (8, 0)
    stuck = [message for message in warnings_of(caplog) if "temporary" in message]
    assert len(stuck) == 2 and all(str(temp) in message for temp, message in zip(temps, stuck))
    assert all(temp.exists() for temp in temps)
    assert small.backend.evictions > 0 and small.backend.nbytes() <= 5 * block // 2


@pytest.fixture(params=[errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])
def unwritable(request, monkeypatch):
    """Disk levels cannot write: a read-only file system or a full disk (new files fail). Returns a switch."""
    real_mkstemp = tempfile.mkstemp
    state = {"on": False}

    def mkstemp(*args, **kwargs):
        if state["on"]:
            raise OSError(request.param, os.strerror(request.param))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return state


def test_a_half_outage_of_a_tier_warns_once_and_its_recovery_once(model, tmp_path, unwritable, caplog):
    """Memory over disk; the disk reads but cannot write for 10 requests, then writes again."""
    disk = DiskBackend(tmp_path / "store")
    store = PrefixCache(TieredBackend(MemoryBackend(max_bytes=1), disk), block_size=8)  # memory keeps nothing
    prompts = [random_ids(model, 1, 30, seed=seed) for seed in range(6)]
    references = [model.generate(ids, **GREEDY) for ids in prompts]
    generate_with_prefix_cache(model, prompts[0], store, **GREEDY)  # on disk before it fails
    served = exceptions = 0
    unwritable["on"] = True
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        for request in range(10):  # the first prompt read from disk, the others written (refused) and read
            index = request % 3
            try:
                served += torch.equal(
                    generate_with_prefix_cache(model, prompts[index], store, **GREEDY), references[index]
                )
            except Exception:  # counted: the test asserts there are none
                exceptions += 1
            store.stats()
        outage = warnings_of(caplog)
        unwritable["on"] = False
        for index in (4, 5, 4):
            served += torch.equal(generate_with_prefix_cache(model, prompts[index], store, **GREEDY), references[index])
    assert (served, exceptions) == (13, 0)
    assert len(outage) == 1 and "unavailable for writes" in outage[0], outage
    recovered = warnings_of(caplog)[1:]
    assert len(recovered) == 1 and "reachable again" in recovered[0], recovered
    tiers = store.stats()["tiers"]
    assert tiers[1]["errors"] == 2 * 3  # prompts 1 and 2, in 3 requests each: the first block refused ends a save
    assert store.stats()["hits"] == 3 * 4 + 3  # prompt 0 from disk in 4 requests; prompt 4 once stored again


def test_a_full_outage_warns_once_and_recovery_needs_every_operation():
    stats = LevelStats(MemoryBackend())
    assert stats.went_down("read") and not stats.went_down("write") and not stats.went_down("read")
    assert not stats.came_back("read") and stats.down  # writes still fail: the outage goes on
    assert stats.came_back("write") and not stats.down and not stats.came_back("write")
    assert stats.went_down() and stats.came_back()  # the one-kind calls of earlier callers work as before


def test_a_half_outage_of_a_plain_disk_store_warns_once(model, tmp_path, unwritable, caplog):
    store = PrefixCache(DiskBackend(tmp_path / "store"), block_size=8)
    prompts = [random_ids(model, 1, 30, seed=seed) for seed in range(3)]
    generate_with_prefix_cache(model, prompts[0], store, **GREEDY)
    unwritable["on"] = True
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        for request in range(6):
            generate_with_prefix_cache(model, prompts[request % 3], store, **GREEDY)
        unwritable["on"] = False
        generate_with_prefix_cache(model, prompts[1], store, **GREEDY)
        generate_with_prefix_cache(model, prompts[1], store, **GREEDY)
    messages = warnings_of(caplog)
    assert len(messages) == 2 and "unavailable" in messages[0] and "reachable again" in messages[1], messages
