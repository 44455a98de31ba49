"""A backend that stacks levels, fastest first: read-through with promotion, write-through."""

import logging
from collections.abc import Iterable, Sequence

from hf_kvcache.prefix.backend import Backend, BackendError
from hf_kvcache.prefix.stats import LevelStats
from hf_kvcache.validation import check_bool

logger = logging.getLogger(__name__)


def known_total(values: Iterable[int | None]) -> int | None:
    """The sum of the known values (None: a level that cannot tell), or None when no value is known."""
    known = [value for value in values if value is not None]
    return sum(known) if known else None


class TieredBackend(Backend):
    """Levels searched in order, e.g. `TieredBackend(MemoryBackend(1 << 30), RedisBackend(url))`.

    A lookup asks the first level, then asks the next level only for the blocks that follow what was
    found, and so on; blocks found in a slower level are copied into every faster one (`promote`), with
    their chain parents, so the next lookup of that prompt stops at the first level. Writes go to every
    level (write-through: a block acknowledged by `put` is in every level that accepted it, nothing is
    queued). A level that fails is skipped (counted in its statistics, one warning per outage); only when
    every level fails does the tiered backend raise `BackendError`, which the store turns into misses.

    Args:
        *levels: two or more backends, fastest first.
        promote: copy blocks found in a slower level into the faster ones.

    Raises:
        ValueError: fewer than two levels, or a level that is not a backend.
    """

    def __init__(self, *levels: Backend, promote: bool = True):
        if (
            len(levels) < 2
            or not all(isinstance(level, Backend) for level in levels)
            or len(set(map(id, levels))) < len(levels)
        ):
            raise ValueError(
                f"levels={levels!r} must be two or more different prefix backends, fastest first "
                "(e.g. TieredBackend(MemoryBackend(...), RedisBackend(...)))"
            )
        check_bool("promote", promote)
        self.levels = levels
        self.promote = promote
        self.level_stats = [LevelStats(level) for level in levels]

    def _unless_all_failed(self, failures: list[BackendError]) -> None:
        """Raise `BackendError` when every level failed an operation (one failing level is only skipped)."""
        if len(failures) == len(self.levels):
            raise BackendError(f"every level failed: {'; '.join(map(str, failures))}")

    def _failed(self, index: int, error: BackendError, operation: str) -> None:
        """Warn when this failure starts an outage of the level (not for every failing request)."""
        if self.level_stats[index].went_down(operation):
            logger.warning(
                "prefix store level %d (%r) unavailable for %ss, skipping it: %s",
                index,
                self.levels[index],
                operation,
                error,
            )

    def _succeeded(self, index: int, operation: str) -> None:
        """Log the recovery when this success ends the level's outage (every failing operation works again)."""
        if self.level_stats[index].came_back(operation):
            logger.warning("prefix store level %d (%r) is reachable again", index, self.levels[index])

    def get_prefix(self, keys: Sequence[str], parent: str | None = None, max_bytes: int | None = None) -> list[bytes]:
        found: list[bytes] = []
        failures: list[BackendError] = []
        for index, stats in enumerate(self.level_stats):
            wanted = keys[len(found) :]
            if not wanted:
                break
            try:
                values = stats.timed_fetch(wanted, keys[len(found) - 1] if found else parent, max_bytes)
            except BackendError as error:
                self._failed(index, error, "read")
                failures.append(error)
                continue
            self._succeeded(index, "read")
            if self.promote and values:
                self._promote(index, [parent, *keys], len(found) + 1, values)
            found += values
        self._unless_all_failed(failures)
        return found

    def _promote(self, found_in: int, chain: Sequence[str | None], start: int, values: list[bytes]) -> None:
        """Copy `values` (of `chain[start:]`; `chain[start - 1]` is the first one's parent) into the levels
        before `found_in`."""
        for index in range(found_in):
            for position, value in enumerate(values, start):
                try:
                    if not self._put_level(index, chain[position], value, chain[position - 1]):
                        break
                except BackendError:
                    break
                self.level_stats[index].count(promotions=1)

    def _put_level(self, index: int, key: str, value: bytes, parent: str | None) -> bool:
        """`put` on one level, counted; a failure is counted, warned about once per outage, and raised."""
        try:
            stored = self.levels[index].put(key, value, parent)
        except BackendError as error:
            self.level_stats[index].count(errors=1)
            self._failed(index, error, "write")
            raise
        self._succeeded(index, "write")
        if stored:
            self.level_stats[index].count(writes=1, bytes_written=len(value))
        return stored

    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        stored, failures = False, []
        for index in range(len(self.levels)):
            try:
                stored = self._put_level(index, key, value, parent) or stored
            except BackendError as error:
                failures.append(error)
        self._unless_all_failed(failures)
        return stored

    def delete(self, key: str) -> None:
        failures = []
        for level in self.levels:
            try:
                level.delete(key)
            except BackendError as error:
                failures.append(error)
        self._unless_all_failed(failures)

    def clear(self) -> int:
        """Clear every level; returns the entries deleted, summed over the levels."""
        return sum(level.clear() for level in self.levels)

    def nbytes(self) -> int | None:
        return known_total(level.nbytes() for level in self.levels)

    @property
    def evictions(self) -> int | None:
        return known_total(level.evictions for level in self.levels)

    def tier_stats(self) -> list[dict[str, int | float | str | None]]:
        """Per level, fastest first: fetches, hits, misses, hit rate, bytes read and written, promotions into it,
        errors, fetch latency (ms: mean, p50, p95, p99), bytes held and evictions."""
        return [stats.summary() for stats in self.level_stats]

    def __repr__(self) -> str:
        return f"TieredBackend({', '.join(map(repr, self.levels))})"
