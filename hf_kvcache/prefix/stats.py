"""What a store level counts: blocks asked, found and written, failures, and how long fetches take."""

import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

from hf_kvcache.prefix.backend import Backend, BackendError

LATENCY_SAMPLES = 4096  # the newest fetch times kept for percentiles


class LevelStats:
    """Counters of one backend as seen by its caller (thread-safe).

    `hits`/`misses` are blocks: of the keys a fetch asked for, those returned and those not (a fetch
    stops at the first missing block, so the rest of the chain counts as missed). Latencies are in
    seconds per fetch call; percentiles come from the newest `LATENCY_SAMPLES` calls.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.fetches = self.hits = self.misses = self.bytes_read = 0
        self.writes = self.bytes_written = self.promotions = self.errors = 0
        self._latency_total = 0.0
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._outage = False
        self._lock = threading.Lock()

    def timed_fetch(self, keys: Sequence[str], parent: str | None = None) -> list[bytes]:
        """`backend.get_prefix(keys, parent)`, counted and timed; a `BackendError` is counted and raised."""
        start = time.perf_counter()
        try:
            values = self.backend.get_prefix(keys, parent)
        except BackendError:
            self.count(errors=1)
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            self.fetches += 1
            self.hits += len(values)
            self.misses += len(keys) - len(values)
            self.bytes_read += sum(map(len, values))
            self._latency_total += elapsed
            self._latencies.append(elapsed)
        return values

    def count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def went_down(self) -> bool:
        """Record a failure; True when it starts an outage (so the caller warns once per outage)."""
        with self._lock:
            first, self._outage = not self._outage, True
        return first

    def came_back(self) -> bool:
        """Record a success; True when it ends an outage."""
        with self._lock:
            recovered, self._outage = self._outage, False
        return recovered

    def summary(self, include_backend: bool = True) -> dict[str, int | float | str | None]:
        """Counters, the hit rate, fetch latency in milliseconds (mean, p50, p95, p99; None before the first
        fetch), and with `include_backend` the backend's bytes held and evictions (a Redis backend scans its
        namespace for them)."""
        with self._lock:
            samples = torch.tensor(list(self._latencies), dtype=torch.float64)
            summary: dict[str, int | float | str | None] = {
                "backend": repr(self.backend),
                "fetches": self.fetches,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0,
                "bytes_read": self.bytes_read,
                "writes": self.writes,
                "bytes_written": self.bytes_written,
                "promotions": self.promotions,
                "errors": self.errors,
                "fetch_ms_mean": 1e3 * self._latency_total / self.fetches if self.fetches else None,
            }
        for name, quantile in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            summary[f"fetch_ms_{name}"] = 1e3 * float(samples.quantile(quantile)) if len(samples) else None
        if include_backend:
            summary["bytes_held"] = self.backend.nbytes()
            summary["evictions"] = self.backend.evictions
        return summary
