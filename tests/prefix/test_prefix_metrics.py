"""The prefix store you can watch: misses by cause, outages, and the counters in the Prometheus text format."""

import logging

import pytest
from conftest import make_tiny_model
from helpers import Switchable, random_ids
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hf_kvcache.cli import main
from hf_kvcache.prefix import DiskBackend, MemoryBackend, PrefixCache, TieredBackend, generate_with_prefix_cache
from hf_kvcache.prefix.keys import block_keys
from hf_kvcache.prefix.metrics import prometheus_text, register_metrics

GREEDY = {"max_new_tokens": 2, "do_sample": False}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed back from the exposition text."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_misses_are_counted_by_cause_and_outages_once(model, caplog):
    backend = Switchable()
    store = PrefixCache(backend, block_size=8)
    ids = random_ids(model, 1, 33)  # 4 whole blocks
    generate_with_prefix_cache(model, ids, store, **GREEDY)  # cold: 4 absent
    key = block_keys(store.fingerprint(model, None), ids[0].tolist(), 8)[2]
    (data,) = backend.get_prefix([key])
    backend.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    generate_with_prefix_cache(model, ids, store, **GREEDY)  # blocks 0-1 hit, 2 unusable (and 3 after it)
    backend.down = True
    with caplog.at_level(logging.WARNING, logger="hf_kvcache.prefix"):
        for _ in range(2):  # one outage, however many requests fail
            generate_with_prefix_cache(model, ids, store, **GREEDY)
    down = store.stats()
    backend.down = False
    generate_with_prefix_cache(model, ids, store, **GREEDY)
    stats = store.stats()
    assert (stats["misses_absent"], stats["misses_unusable"], stats["misses_unavailable"]) == (4, 2, 8)
    assert stats["misses"] == 14 and stats["hits"] == 2 + 4  # the last lookup: the repaired chain
    assert down["down"] and stats["down"]  # reads work again; writes are not known to until one succeeds
    generate_with_prefix_cache(model, random_ids(model, 1, 9, seed=5), store, **GREEDY)  # a new prompt writes
    assert not store.stats()["down"] and store.stats()["outages"] == 1


def test_prometheus_text_gives_the_stats_of_every_level(model, tmp_path):
    memory = MemoryBackend()
    store = PrefixCache(TieredBackend(memory, DiskBackend(tmp_path)), block_size=8)
    ids = random_ids(model, 1, 25)
    for _ in range(2):
        generate_with_prefix_cache(model, ids, store, **GREEDY)
    stats = store.stats()
    values = samples(prometheus_text(store, name="chat"))

    def value(name, **labels):
        return values[(f"hf_kvcache_prefix_{name}", tuple(sorted({"store": "chat", **labels}.items())))]

    assert value("lookups_total") == stats["lookups"] == 2
    assert value("block_hits_total") == stats["hits"] == 3
    assert value("hit_tokens_total") == stats["tokens_reused"] == 24
    assert value("block_misses_total", cause="absent") == stats["misses_absent"] == 3
    assert value("saved_bytes_total") == stats["bytes_stored"] > 0
    for index, (level, backend) in enumerate(zip(stats["tiers"], ("MemoryBackend", "DiskBackend"))):
        labels = {"level": str(index), "backend": backend}
        assert value("level_held_bytes", **labels) == level["bytes_held"] > 0
        assert value("level_block_hits_total", **labels) == level["hits"]
        assert value("level_written_bytes_total", **labels) == level["bytes_written"]
        assert value("level_up", **labels) == 1
        assert value("level_fetch_seconds", quantile="0.5", **labels) == pytest.approx(level["fetch_ms_p50"] / 1e3)


def test_a_registered_store_is_read_at_every_scrape(model):
    registry = CollectorRegistry(auto_describe=True)
    store = PrefixCache(MemoryBackend(), block_size=8)
    collector = register_metrics(store, registry, name="api")
    ids = random_ids(model, 1, 17)
    for lookups in (1, 2):
        generate_with_prefix_cache(model, ids, store, **GREEDY)
        assert registry.get_sample_value("hf_kvcache_prefix_lookups_total", {"store": "api"}) == lookups
    assert registry.get_sample_value("hf_kvcache_prefix_block_hits_total", {"store": "api"}) == 2
    with pytest.raises(ValueError, match="Duplicated"):
        register_metrics(PrefixCache(MemoryBackend()), registry, name="other")
    registry.unregister(collector)
    assert registry.get_sample_value("hf_kvcache_prefix_lookups_total", {"store": "api"}) is None
    with pytest.raises(ValueError, match="must be a PrefixCache"):
        register_metrics(MemoryBackend(), registry)


def test_prefix_stats_writes_the_contents_as_gauges(model, tmp_path, capsys):
    store = PrefixCache(DiskBackend(tmp_path / "store"), block_size=8)
    generate_with_prefix_cache(model, random_ids(model, 1, 25), store, **GREEDY)
    options = ["prefix", "stats", "--disk", str(tmp_path / "store"), "--no-progress"]
    assert main([*options, "--prometheus", "-"]) == 0
    values = samples(capsys.readouterr().out)
    blocks = {labels: value for (name, labels), value in values.items() if name == "hf_kvcache_prefix_stored_blocks"}
    stored = {labels: value for (name, labels), value in values.items() if name == "hf_kvcache_prefix_stored_bytes"}
    assert list(blocks.values()) == [3] and list(stored.values()) == [store.stats()["bytes_stored"]]
    assert main([*options, "--prometheus", str(tmp_path / "kv.prom"), "--json", str(tmp_path / "kv.json")]) == 0
    assert "stored_bytes" in (tmp_path / "kv.prom").read_text() and (tmp_path / "kv.json").exists()
