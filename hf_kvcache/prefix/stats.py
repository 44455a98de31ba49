"""What a store level counts: blocks asked, found and written, failures, and how long fetches take."""

import inspect
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
        self.writes = self.bytes_written = self.promotions = self.errors = self.outages = 0
        self._latency_total = 0.0
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._failing: set[str] = set()  # kinds of operation failing now ("read", "write", ...)
        self._lock = threading.Lock()
        # A backend written before `max_bytes` existed is asked without it (its caller checks sizes itself).
        self._takes_max_bytes = "max_bytes" in inspect.signature(backend.get_prefix).parameters

    def timed_fetch(self, keys: Sequence[str], parent: str | None = None, max_bytes: int | None = None) -> list[bytes]:
        """`backend.get_prefix(keys, parent, max_bytes)`, counted and timed; a `BackendError` is counted and
        raised."""
        start = time.perf_counter()
        try:
            if max_bytes is None or not self._takes_max_bytes:
                values = self.backend.get_prefix(keys, parent)
            else:
                values = self.backend.get_prefix(keys, parent, max_bytes=max_bytes)
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

    def went_down(self, operation: str = "access") -> bool:
        """Record a failure of `operation` (e.g. "read", "write"); True when it starts an outage (nothing was
        failing before), so the caller warns once per outage.

        Operations are tracked apart so that a half outage (a full disk or a read-only level: reads succeed,
        writes fail) is one outage, not one per request: a successful read does not end a write outage."""
        with self._lock:
            first = not self._failing
            self._failing.add(operation)
            self.outages += int(first)
        return first

    def came_back(self, operation: str = "access") -> bool:
        """Record a success of `operation`; True when it ends an outage (the last failing operation works
        again), so the caller logs the recovery once."""
        with self._lock:
            was_failing = operation in self._failing
            self._failing.discard(operation)
            return was_failing and not self._failing

    @property
    def down(self) -> bool:
        """Whether some operation is failing now."""
        with self._lock:
            return bool(self._failing)

    def summary(self, include_backend: bool = True) -> dict[str, int | float | str | None]:
        """Counters (`outages`: times some operation started failing), whether it is `down` now, the hit rate,
        fetch latency in milliseconds (mean, p50, p95, p99; None before the first
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
                "outages": self.outages,
                "down": bool(self._failing),
                "fetch_ms_mean": 1e3 * self._latency_total / self.fetches if self.fetches else None,
            }
        for name, quantile in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            summary[f"fetch_ms_{name}"] = 1e3 * float(samples.quantile(quantile)) if len(samples) else None
        if include_backend:
            summary["bytes_held"] = self.backend.nbytes()
            summary["evictions"] = self.backend.evictions
        return summary
