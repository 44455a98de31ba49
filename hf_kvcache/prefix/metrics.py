"""The prefix store's counters for Prometheus (`prometheus_client`, the `metrics` extra).

`register_metrics(store)` adds a collector to a registry (prometheus_client's default one unless given), which
reads `store.stats()` at every scrape; serve it with `prometheus_client.start_http_server(port)` or your web
framework's exporter. `prometheus_text(store)` gives the same metrics once, in the text exposition format.
`contents_text(summary)` turns `hf-kvcache prefix stats`'s summary of a store's contents into gauges (for
node_exporter's textfile collector).

Units are Prometheus's: bytes and seconds. Counters end in `_total`; every metric has a `store` label (the
name given at registration), and per-level metrics a `level` (0 = fastest) and `backend` (its class).
"""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hf_kvcache.prefix.store import MISS_CAUSES, PrefixCache

PREFIX = "hf_kvcache_prefix"
# (metric name, `stats()` field, help) of the store's own counters
STORE_COUNTERS = (
    ("lookups", "lookups", "Prompts looked up."),
    ("recomputed_lookups", "recomputed", "Prompts of models the store cannot serve (recomputed, nothing restored)."),
    ("block_hits", "hits", "Blocks found and restored."),
    ("hit_tokens", "tokens_reused", "Prompt tokens restored instead of computed."),
    ("blocks_saved", "blocks_saved", "Blocks written by this store object."),
    ("saved_bytes", "bytes_stored", "Bytes of the blocks written by this store object."),
    ("errors", "errors", "Unusable entries and backend failures (each served as a miss)."),
    ("unauthenticated", "unauthenticated", "Entries without a valid MAC under the store's secret."),
    ("outages", "outages", "Times the backend started failing."),
)
# (metric name, level summary field, help) per backend level
LEVEL_COUNTERS = (
    ("level_fetches", "fetches", "Requests to this level."),
    ("level_block_hits", "hits", "Blocks this level returned."),
    ("level_block_misses", "misses", "Blocks asked of this level and not returned."),
    ("level_read_bytes", "bytes_read", "Bytes read from this level."),
    ("level_writes", "writes", "Blocks written to this level."),
    ("level_written_bytes", "bytes_written", "Bytes written to this level."),
    ("level_promotions", "promotions", "Blocks copied into this level from a slower one."),
    ("level_errors", "errors", "Failed requests to this level."),
    ("level_outages", "outages", "Times this level started failing."),
    ("level_evictions", "evictions", "Blocks this level evicted."),
)
LATENCY_QUANTILES = (("0.5", "fetch_ms_p50"), ("0.95", "fetch_ms_p95"), ("0.99", "fetch_ms_p99"))


class PrefixStoreCollector(Collector):
    """Reads `store.stats()` at each collection (a Redis level scans its namespace for its bytes then)."""

    def __init__(self, store: PrefixCache, name: str = "default"):
        if not isinstance(store, PrefixCache):
            raise ValueError(f"store={store!r} must be a PrefixCache")
        self.store, self.name = store, name

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        store = [self.name]
        for metric, field, help_text in STORE_COUNTERS:
            yield _family(CounterMetricFamily, metric, help_text, ["store"], [(store, stats[field])])
        misses = [([*store, cause], stats[f"misses_{cause}"]) for cause in MISS_CAUSES]
        help_text = (
            "Blocks looked up and not served, by cause: absent, unusable (corrupt, unauthenticated), unavailable."
        )
        yield _family(CounterMetricFamily, "block_misses", help_text, ["store", "cause"], misses)
        backend = {name: stats[name] for name in ("bytes_held", "evictions")}
        levels = stats.get("tiers") or [self.store.backend_stats.summary(include_backend=False) | backend]
        labels = ["store", "level", "backend"]
        level_labels = [[self.name, str(index), _backend_class(level)] for index, level in enumerate(levels)]
        for metric, field, help_text in LEVEL_COUNTERS:
            values = [
                (label, level[field]) for label, level in zip(level_labels, levels) if level.get(field) is not None
            ]
            yield _family(CounterMetricFamily, metric, help_text, labels, values)
        held = [
            (label, level["bytes_held"])
            for label, level in zip(level_labels, levels)
            if level["bytes_held"] is not None
        ]
        yield _family(GaugeMetricFamily, "level_held_bytes", "Bytes this level holds now.", labels, held)
        up = [(label, 0 if level["down"] else 1) for label, level in zip(level_labels, levels)]
        yield _family(GaugeMetricFamily, "level_up", "1 while every operation on this level succeeds.", labels, up)
        latency = [
            ([*label, quantile], level[field] / 1e3)
            for label, level in zip(level_labels, levels)
            for quantile, field in LATENCY_QUANTILES
            if level[field] is not None
        ]
        help_text = "Fetch latency per request to this level, over its newest requests."
        yield _family(GaugeMetricFamily, "level_fetch_seconds", help_text, [*labels, "quantile"], latency)


def _family(kind: type, name: str, help_text: str, labels: list[str], values: list) -> Metric:
    family = kind(f"{PREFIX}_{name}", help_text, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, float(value))
    return family


def _backend_class(level: dict) -> str:
    return str(level.get("backend", "")).split("(", 1)[0]


def register_metrics(store: PrefixCache, registry: CollectorRegistry = REGISTRY, name: str = "default") -> Collector:
    """Export `store`'s counters through `registry` under the label `store=name`; returns the collector (pass it
    to `registry.unregister` to stop).

    Raises:
        ValueError: `store` is not a PrefixCache, or `registry` already exports a store's metrics (one store per
            registry: give another store its own `CollectorRegistry`).
    """
    collector = PrefixStoreCollector(store, name)
    registry.register(collector)
    return collector


def prometheus_text(store: PrefixCache, name: str = "default") -> str:
    """`store`'s metrics once, in the Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrefixStoreCollector(store, name))
    return generate_latest(registry).decode()


class _ContentsCollector(Collector):
    def __init__(self, summary: dict):
        self.summary = summary

    def collect(self) -> Iterator[Metric]:
        labels = ["store", "configuration", "format"]
        groups = self.summary["groups"]
        rows = [([self.summary["store"], group["configuration"], group["format"]], group) for group in groups]
        yield _family(
            GaugeMetricFamily,
            "stored_blocks",
            "Blocks held, by configuration and format.",
            labels,
            [(label, group["blocks"]) for label, group in rows],
        )
        yield _family(
            GaugeMetricFamily,
            "stored_bytes",
            "Bytes held, by configuration and format.",
            labels,
            [(label, group["bytes"]) for label, group in rows],
        )


def contents_text(summary: dict) -> str:
    """The blocks and bytes a store holds per configuration and format (`prefix.command.summarize`), as gauges
    in the Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ContentsCollector(summary))
    return generate_latest(registry).decode()
