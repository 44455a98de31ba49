"""`hf-kvcache prefix`: the store's blocks and bytes per configuration read from block headers, and clear."""

import json

import pytest
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache.cli import main
from hf_kvcache.prefix import DiskBackend, PrefixCache, RedisBackend, generate_with_prefix_cache

GREEDY = {"max_new_tokens": 2, "do_sample": False}


def fill(backend) -> dict[str, int]:
    """Two configurations in one store: full-precision blocks of 8 tokens and 4-bit blocks of 16."""
    model = make_tiny_model("llama")
    full, compressed = PrefixCache(backend, block_size=8), PrefixCache(backend, block_size=16, bits=4)
    for store in (full, compressed):
        generate_with_prefix_cache(model, random_ids(model, 1, 50), store, **GREEDY)
    return {"full": full.stats()["bytes_stored"], "4-bit": compressed.stats()["bytes_stored"]}


@pytest.fixture(params=["disk", "redis", "redis-cluster"])
def store(request, tmp_path):
    """(backend, the CLI options that open the same store)."""
    if request.param == "disk":
        return DiskBackend(tmp_path / "store"), ["--disk", str(tmp_path / "store")]
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return RedisBackend(server.url, prefix="cli:"), ["--redis", server.url, "--namespace", "cli:"]
    cluster = request.getfixturevalue("redis_cluster")
    return RedisBackend(cluster.url, prefix="cli:", cluster=True), [
        "--redis",
        cluster.url,
        "--cluster",
        "--namespace",
        "cli:",
    ]


def test_stats_reads_every_block_header_and_clear_needs_yes(store, tmp_path, capsys):
    backend, options = store
    stored = fill(backend)
    assert main(["prefix", "stats", *options, "--json", str(tmp_path / "s.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "s.json").read_text())
    groups = {group["format"]: group for group in summary["groups"]}
    assert set(groups) == {"full precision", "4-bit KIVI, group_size=64"}
    assert (groups["full precision"]["blocks"], groups["full precision"]["tokens_per_block"]) == (6, 8)
    assert (groups["4-bit KIVI, group_size=64"]["blocks"], groups["4-bit KIVI, group_size=64"]["tokens_per_block"]) == (
        3,
        16,
    )
    assert (
        groups["full precision"]["bytes"] == stored["full"]
        and groups["4-bit KIVI, group_size=64"]["bytes"] == stored["4-bit"]
    )
    assert summary["blocks"] == 9 and f"total: 9 blocks, {sum(stored.values()):,} bytes" in printed
    if "--redis" in options:
        assert summary["server"]["keyspace_hits"] > 0 and "server maxmemory_policy" in printed
    assert main(["prefix", "clear", *options, "--no-progress"]) == 2
    assert "add --yes to confirm" in capsys.readouterr().err and backend.nbytes() == sum(stored.values())
    assert main(["prefix", "clear", *options, "--yes", "--no-progress"]) == 0
    assert "deleted 9 blocks" in capsys.readouterr().out and backend.nbytes() == 0
    assert main(["prefix", "clear", *options, "--no-progress"]) == 0  # nothing left: no confirmation needed
    assert "nothing to delete" in capsys.readouterr().out


def test_an_unreadable_entry_is_listed_not_fatal(tmp_path, capsys):
    backend = DiskBackend(tmp_path)
    backend.put("ab" * 32, b"not a block")
    assert main(["prefix", "stats", "--disk", str(tmp_path), "--no-progress"]) == 0
    assert "(unreadable)" in capsys.readouterr().out


def test_json_to_stdout(tmp_path, capsys):
    DiskBackend(tmp_path).put("ab" * 32, b"not a block")
    assert main(["prefix", "stats", "--disk", str(tmp_path), "--json", "-", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 1 and not (tmp_path / "-").exists()


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["prefix", "stats", "--disk", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["prefix", "stats", "--disk", str(tmp_path / "file")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    assert main(["prefix", "stats", "--disk", str(tmp_path), "--cluster"]) == 2
    assert "--cluster needs --redis" in capsys.readouterr().err
