"""What a backend reads back is untrusted: planted files (a FIFO, a link to /dev/zero, a 1 TiB sparse file, a
link to a file outside the store, a folder), values over the caller's `max_bytes`, keys of another type under a
Redis prefix, and garbage that `hf-kvcache prefix stats` must list as unreadable. Every case is a miss (or an
unreadable entry), deleted where it sits in a block's place, never a hang, an exception or wrong KV."""

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache.cli import main
from hf_kvcache.prefix import DiskBackend, MemoryBackend, PrefixCache, RedisBackend, generate_with_prefix_cache
from hf_kvcache.prefix.backend import ENTRY_CAP
from hf_kvcache.prefix.command import summarize
from hf_kvcache.prefix.keys import block_keys

GREEDY = {"max_new_tokens": 3, "do_sample": False}
KEYS = [f"{i:02x}" * 32 for i in range(1, 6)]  # a chain's keys: 64 hex digits, each in its own folder


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) when a read blocks: a FIFO opened for reading waits for a writer."""

    def expired(signum, frame):
        raise TimeoutError("a backend read blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def plant_fifo(path: Path) -> None:
    os.mkfifo(path)


def plant_dev_zero_link(path: Path) -> None:
    os.symlink("/dev/zero", path)


def plant_sparse_tib(path: Path) -> None:
    with open(path, "wb") as file:
        file.truncate(1 << 40)  # 1 TiB of holes: no disk used, but a read would ask for a terabyte


def plant_link_to_a_real_file(path: Path) -> None:
    target = path.parent.parent.parent / "outside-the-store.safetensors"
    target.write_bytes(b"someone else's file")
    os.symlink(target, path)


def plant_folder(path: Path) -> None:
    path.mkdir()


PLANTS = {
    "fifo": plant_fifo,
    "dev-zero-link": plant_dev_zero_link,
    "sparse-1TiB": plant_sparse_tib,
    "link-to-a-file": plant_link_to_a_real_file,
    "folder": plant_folder,
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_planted_file_in_a_blocks_place_is_a_miss_and_removed(plant, tmp_path, caplog, deadline):
    backend = DiskBackend(tmp_path / "store")
    for depth, key in enumerate(KEYS[:2]):
        backend.put(key, bytes([depth]) * 100, KEYS[depth - 1] if depth else None)
    path = backend.file(KEYS[2])
    path.parent.mkdir(parents=True, exist_ok=True)
    PLANTS[plant](path)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix(KEYS[:4]) == [bytes([0]) * 100, bytes([1]) * 100]  # served up to it
    assert not os.path.lexists(path)  # the entry itself went ...
    assert Path("/dev/zero").exists()
    if plant == "link-to-a-file":  # ... never what it pointed to
        assert (tmp_path / "outside-the-store.safetensors").read_bytes() == b"someone else's file"
    assert KEYS[2][:16] in caplog.text and "deleting it" in caplog.text
    if plant == "sparse-1TiB":
        assert str(1 << 40) in caplog.text  # the size is named
    backend.put(KEYS[2], b"\x02" * 100, KEYS[1])  # the block's place is usable again
    assert len(backend.get_prefix(KEYS[:4])) == 3


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_files_never_reach_generate(model, plant, tmp_path, caplog, deadline):
    """Through the store: the planted block and those after it are recomputed; outputs equal `generate`."""
    store = PrefixCache(DiskBackend(tmp_path / "store"), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    path = store.backend.file(block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)[1])
    path.unlink()
    PLANTS[plant](path)
    served, exceptions = 0, 0
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        for _ in range(2):
            try:
                served += torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
            except Exception:  # counted: the test asserts there are none
                exceptions += 1
    assert (served, exceptions) == (2, 0)
    stats = store.stats()
    assert stats["hits"] == 1 + 3  # first request: block 0 only; the second: all three (block 1 stored again)
    assert "deleting it" in caplog.text and path.is_file() and not path.is_symlink()


def test_a_disk_entry_over_max_bytes_is_a_miss_never_read_whole(tmp_path, caplog, monkeypatch):
    backend = DiskBackend(tmp_path / "store")
    backend.put(KEYS[0], b"a" * 100)
    backend.put(KEYS[1], b"b" * 5000, KEYS[0])
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix(KEYS[:2], max_bytes=1000) == [b"a" * 100]
    assert "5000 bytes" in caplog.text and "1000" in caplog.text and KEYS[1][:16] in caplog.text
    assert not backend.file(KEYS[1]).exists() and backend.get_prefix(KEYS[:2]) == [b"a" * 100]
    assert backend.get_prefix(KEYS[:1], max_bytes=100) == [b"a" * 100]  # exactly max_bytes is accepted


def test_disk_reads_are_capped_without_a_caller_cap(tmp_path):
    """No `max_bytes` from the caller: the store's own budget, and ENTRY_CAP, still bound a read."""
    small = DiskBackend(tmp_path / "small", max_bytes=1000)
    small.file(KEYS[0]).parent.mkdir(parents=True)
    small.file(KEYS[0]).write_bytes(b"x" * 1001)  # larger than the store could ever have written
    assert small.get_prefix(KEYS[:1]) == [] and not small.file(KEYS[0]).exists()
    unbounded = DiskBackend(tmp_path / "unbounded", max_bytes=None)
    unbounded.file(KEYS[0]).parent.mkdir(parents=True)
    with open(unbounded.file(KEYS[0]), "wb") as file:
        file.truncate(ENTRY_CAP + 1)  # sparse
    assert unbounded.get_prefix(KEYS[:1]) == [] and not unbounded.file(KEYS[0]).exists()


def test_a_memory_entry_over_max_bytes_is_a_miss_and_deleted(caplog):
    backend = MemoryBackend()
    backend.put(KEYS[0], b"a" * 10)
    backend.put(KEYS[1], b"b" * 50, KEYS[0])
    backend.put(KEYS[2], b"c" * 10, KEYS[1])
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix(KEYS[:3], max_bytes=20) == [b"a" * 10]
    assert "50 bytes" in caplog.text
    assert backend.get_prefix(KEYS[:3]) == [b"a" * 10] and backend.nbytes() == 20  # its child is an orphan now


def test_a_redis_value_over_max_bytes_is_a_miss_and_never_transferred(redis_server, caplog):
    import redis

    backend = RedisBackend(redis_server.url, prefix="capped:")
    backend.put(KEYS[0], b"a" * 100)
    backend.put(KEYS[1], b"b" * (8 << 20), KEYS[0])  # 8 MB planted under a block's key
    client = redis.Redis.from_url(redis_server.url)
    sent_before = int(client.info("stats")["total_net_output_bytes"])
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix(KEYS[:3], max_bytes=1000) == [b"a" * 100]
    sent = int(client.info("stats")["total_net_output_bytes"]) - sent_before
    assert sent < 64 << 10, sent  # at most max_bytes + 1 bytes of it crossed the network, not 8 MB
    assert str(8 << 20) in caplog.text and KEYS[1][:16] in caplog.text
    assert client.exists(backend.prefix + KEYS[1]) == 0
    backend.put(KEYS[1], b"", KEYS[0])  # an empty value is an unusable entry (not a missing one)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix(KEYS[:2], max_bytes=1000) == [b"a" * 100, b""]  # served: the codec refuses it
    ttl = RedisBackend(redis_server.url, prefix="capped:", ttl=100)
    assert ttl.get_prefix(KEYS[:1], max_bytes=100) == [b"a" * 100]  # exactly max_bytes is accepted
    assert 0 < client.ttl(backend.prefix + KEYS[0]) <= 100  # the read refreshed the expiry, as GETEX did
    client.rpush(backend.prefix + KEYS[2], b"a list")
    backend.put(KEYS[1], b"b", KEYS[0])
    assert backend.get_prefix(KEYS[:4], max_bytes=1000) == [b"a" * 100, b"b"]  # wrong type: a miss, deleted
    assert client.exists(backend.prefix + KEYS[2]) == 0


def workload(model, store, requests: int, poll: bool) -> tuple[int, int, int]:
    """(served equal to generate, exceptions, block hits) over `requests` requests of 4 prompts in turn, with
    `store.stats()` polled between requests when `poll` (as a monitoring loop does)."""
    prompts = [random_ids(model, 1, 30, seed=seed) for seed in range(4)]
    references = [model.generate(ids, **GREEDY) for ids in prompts]
    served = exceptions = 0
    for request in range(requests):
        try:
            output = generate_with_prefix_cache(model, prompts[request % 4], store, **GREEDY)
            served += torch.equal(output, references[request % 4])
        except Exception:  # counted: the test asserts there are none
            exceptions += 1
        if poll:
            store.stats()
    return served, exceptions, store.stats()["hits"]


@pytest.mark.parametrize("kind", ["list", "hash"])
def test_a_foreign_redis_key_under_the_prefix_is_skipped_never_an_outage(model, redis_server, kind, caplog):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    clean = PrefixCache(RedisBackend(redis_server.url, prefix="clean:"), block_size=8)
    expected = workload(model, clean, 16, poll=True)
    assert expected == (16, 0, 3 * 12)  # each prompt's 3 blocks served on every request after its first
    backend = RedisBackend(redis_server.url, prefix="foreign:")
    if kind == "list":
        client.rpush("foreign:not-a-block", b"x")
    else:
        client.hset("foreign:not-a-block", "field", b"x")
    store = PrefixCache(backend, block_size=8)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert workload(model, store, 16, poll=True) == expected
    assert "unavailable" not in caplog.text and store.stats()["errors"] == 0
    assert backend.foreign_keys == 1 and caplog.text.count("not strings") == 1  # warned once
    assert store.stats()["bytes_held"] == clean.stats()["bytes_held"]  # the foreign key is not counted
    assert len(list(backend.inventory())) == 12  # nor listed


def test_stats_lists_garbage_headers_and_non_utf8_keys_as_unreadable(model, redis_server, tmp_path, capsys):
    import redis

    from hf_kvcache.prefix.codec import block_metadata

    backend = RedisBackend(redis_server.url, prefix="cli:")
    store = PrefixCache(backend, block_size=8)
    generate_with_prefix_cache(model, random_ids(model, 1, 30), store, **GREEDY)
    good = next(iter(backend.inventory()))
    header = block_metadata(good[2])
    client = redis.Redis.from_url(redis_server.url)

    def header_bytes(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(8, "little") + data

    garbage = {
        "not-json": header_bytes("{not json"),
        "nested": header_bytes("[" * 100_000 + "]" * 100_000),
        "fingerprint-int": header_bytes(json.dumps({"__metadata__": {**header, "fingerprint": 5}})),
        "format-list": header_bytes(json.dumps({"__metadata__": {**header, "format": ["x"]}})),
        "tokens-huge": header_bytes(json.dumps({"__metadata__": {**header, "tokens": "9" * 5000}})),
        "tokens-list": header_bytes(json.dumps({"__metadata__": {**header, "tokens": [8]}})),
        "layout-control": header_bytes(json.dumps({"__metadata__": {**header, "layout": "\x1b[2J"}})),
        "length-only": (1 << 63).to_bytes(8, "little"),
        "short": b"\x01",
    }
    for index, data in enumerate(garbage.values()):
        client.set(f"cli:{index:064x}", data)
    client.set(b"cli:\xff\xfe not utf-8", good[2])
    client.rpush("cli:" + "e" * 64, b"a list under the prefix")
    assert main(["prefix", "stats", "--redis", redis_server.url, "--namespace", "cli:", "--json", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    groups = {group["configuration"]: group for group in summary["groups"]}
    assert groups["(unreadable)"]["blocks"] == len(garbage) + 1
    assert groups[good_fingerprint(header)]["blocks"] == 3
    assert len(summary["unreadable"]) == len(garbage) + 1
    assert any("\\xff" in entry["key"] and "hex digest" in entry["reason"] for entry in summary["unreadable"])
    assert main(["prefix", "stats", "--redis", redis_server.url, "--namespace", "cli:", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "(unreadable)" in printed and printed.count("unreadable: ") == len(garbage) + 1
    assert "\x1b" not in printed  # a header's control characters never reach the terminal


def good_fingerprint(header: dict) -> str:
    return header["fingerprint"][:16]


def test_stats_on_a_disk_store_with_planted_files_never_hangs(model, tmp_path, capsys, deadline):
    folder = tmp_path / "store"
    store = PrefixCache(DiskBackend(folder), block_size=8)
    generate_with_prefix_cache(model, random_ids(model, 1, 30), store, **GREEDY)
    for index, plant in enumerate(PLANTS.values()):
        path = store.backend.file(f"{index:02x}" * 32)
        path.parent.mkdir(parents=True, exist_ok=True)
        plant(path)
    (folder / "ff").mkdir(exist_ok=True)
    os.symlink(tmp_path, folder / "fe")  # a key folder that is a link: never listed through
    summary = summarize(DiskBackend(folder, max_bytes=None), progress=False)
    groups = {group["configuration"]: group for group in summary["groups"]}
    assert groups["(unreadable)"]["blocks"] == len(PLANTS) and summary["blocks"] == 3 + len(PLANTS)
    assert main(["prefix", "stats", "--disk", str(folder), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("unreadable: ") == len(PLANTS)
    assert Path("/dev/zero").exists() and (tmp_path / "outside-the-store.safetensors").exists()


def test_a_deeply_nested_header_is_a_miss_not_a_recursion_error(model):
    store = PrefixCache(MemoryBackend(), block_size=8)
    ids = random_ids(model, 1, 30)
    reference = model.generate(ids, **GREEDY)
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    text = ("[" * 100_000 + "]" * 100_000).encode()  # 200 KB: under any block's max_bytes
    store.backend.put(
        block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)[0], len(text).to_bytes(8, "little") + text
    )
    assert torch.equal(generate_with_prefix_cache(model, ids, store, **GREEDY), reference)
    assert store.stats()["errors"] == 1


def test_a_link_planted_as_a_keys_folder_is_never_read_written_or_deleted_through(tmp_path, caplog):
    backend = DiskBackend(tmp_path / "store")
    key = "ab" * 32
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{key}.safetensors").write_bytes(b"someone else's file")
    (tmp_path / "store" / key[:2]).symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        assert backend.get_prefix([key]) == []  # a miss, not the outside file
    assert "is a symbolic link" in caplog.text and not (tmp_path / "store" / key[:2]).is_symlink()
    (tmp_path / "store" / key[:2]).symlink_to(outside, target_is_directory=True)
    backend.delete(key)
    assert backend.put(key, b"ours")
    assert backend.get_prefix([key]) == [b"ours"] and not (tmp_path / "store" / key[:2]).is_symlink()
    assert [p.read_bytes() for p in outside.iterdir()] == [b"someone else's file"]  # untouched throughout
