"""Redis backend: blocks shared by many processes or machines through a real Redis server or Redis Cluster
(redis-py)."""

import contextlib
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from hf_kvcache.prefix.backend import HEADER_PEEK, Backend, BackendError, refuse_oversized
from hf_kvcache.validation import check_bool, check_int, check_text

if TYPE_CHECKING:
    import redis
    from redis.cluster import RedisCluster

logger = logging.getLogger(__name__)
_LISTING_BATCH = 500  # entries per pipeline when listing a store
# Redis refuses an expiry whose milliseconds overflow a signed 64-bit integer once added to the current time
# (about 9.2e15 s): a round bound well inside that (31.7 million years) is accepted, a larger one refused.
MAX_TTL = 10**15
MAX_SECONDS = 86400.0  # the longest socket timeout or retry_after accepted: one day

T = TypeVar("T")


class RedisBackend(Backend):
    """Blocks stored as Redis strings under `prefix + key`, optionally expiring after `ttl` seconds.

    Args:
        url: a redis-py URL, e.g. `redis://127.0.0.1:6379/0`, `rediss://:password@host:6380/0` (TLS); with
            `cluster=True`, any one node of the cluster (`redis://` or `rediss://`, database 0).
        prefix: namespace for this store's keys.
        ttl: seconds an entry lives after its last read or write (None: until the server evicts it;
            set `maxmemory` and `maxmemory-policy allkeys-lru` on the server for an LRU budget).
        socket_timeout, socket_connect_timeout: seconds before a slow or absent server counts as down.
        retry_after: seconds to skip the server after a failure, so an outage costs one timeout,
            not one per request; the first call after that tries again (recovery is automatic).
        cluster: True for a Redis Cluster (`redis.cluster.RedisCluster`): keys spread over its masters by
            slot, lookups pipelined per node. The client discovers the cluster at first use (a cluster that
            is down then costs misses, not a failed start) and again after any node fails, so a failover (a
            master lost, its replica promoted) costs misses while it lasts, never an exception or wrong bytes.
            A failure of any node skips the whole cluster for `retry_after` seconds; a dead node fails at once,
            a hung one after `socket_timeout` for the pipeline and again for each of its commands in it.
        **redis_kwargs: passed to `redis.Redis.from_url`, or to `redis.cluster.RedisCluster.from_url` with
            `cluster=True` (password, username, ssl_* settings, ...). `retry` defaults to one immediate retry
            for a server and none for a cluster.

    Raises:
        ValueError: a parameter out of range, or a keyword redis-py does not take (for a cluster also a
            unix-socket URL or a database other than 0).
        ImportError: redis-py is not installed.

    Failures of the server raise `BackendError`; the store turns them into misses with a warning.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "hf_kvcache:prefix:",
        ttl: int | None = None,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        retry_after: float = 2.0,
        cluster: bool = False,
        **redis_kwargs: Any,
    ):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.exceptions import AskError, ClusterError, MovedError, RedisClusterException, TryAgainError
            from redis.retry import Retry
        except ImportError as error:
            raise ImportError("RedisBackend needs redis-py: pip install 'hf_kvcache[prefix]'") from error
        check_text("url", url)
        check_text("prefix", prefix)
        if ttl is not None:
            check_int("ttl", ttl, minimum=1, maximum=MAX_TTL, hint="seconds; None for no expiry")
        _check_seconds("socket_timeout", socket_timeout)
        _check_seconds("socket_connect_timeout", socket_connect_timeout)
        _check_seconds("retry_after", retry_after, zero=True)
        check_bool("cluster", cluster)
        # One server: one quick retry covers a pooled connection left stale by a restart. A cluster client
        # retries a failed command after re-reading the cluster's layout (10 times by default, each a timeout
        # on a hung node, and a pipeline retries each of that node's commands alone): never, here; the
        # re-read layout serves the next call, and its pools replace a closed connection by themselves.
        redis_kwargs.setdefault("retry", Retry(NoBackoff(), 0 if cluster else 1))
        options = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
        options |= redis_kwargs
        self.url = url
        self.cluster = cluster
        self.prefix = prefix
        self.ttl = ttl
        self.retry_after = retry_after
        # A cluster client raises RedisClusterException (not a RedisError) when no node answers.
        self._errors = (redis.RedisError, RedisClusterException)
        # Per-command results of a cluster pipeline that mean a node is down or moving, not a bad entry.
        self._outages = (redis.ConnectionError, redis.TimeoutError, ClusterError, AskError, TryAgainError)
        self._down_until = 0.0
        self._warned_full = False
        self.foreign_keys = 0  # keys under the prefix that are not strings, as of the last listing
        self._warned_foreign = False
        self._moved = MovedError  # a plain client sent to a cluster node: its replies redirect to other nodes
        self._client_lock = threading.Lock()
        if cluster:
            self._cluster_url_options = _check_cluster_options(url, options)
            self._options = options
            self._client = None
        else:
            self._client = redis.Redis.from_url(url, **options)
            try:  # builds a connection object without connecting: unknown keywords fail here, not at first use
                self._client.connection_pool.make_connection().disconnect()
            except TypeError as error:
                raise ValueError(f"RedisBackend: a keyword is not a redis-py connection option: {error}") from None
        self._where = self._describe()
        self._server = f"Redis Cluster via {self._where}" if cluster else f"Redis at {self._where}"

    @property
    def client(self) -> "redis.Redis | RedisCluster":
        """The redis-py client: `redis.Redis`, or a `redis.cluster.RedisCluster` made (and connected) at first
        use. Raises a redis-py error when a cluster cannot be reached."""
        if self._client is None:
            from redis.cluster import RedisCluster

            with self._client_lock:  # the store's prefetch thread may ask at the same time
                if self._client is None:
                    self._client = RedisCluster.from_url(self.url, **self._options)
        return self._client

    def _describe(self) -> str:
        if self.cluster:
            return f"{self._cluster_url_options['host']}:{self._cluster_url_options.get('port', 6379)}"
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"{where}/{kwargs.get('db', 0)}"

    def _call(self, operation: Callable[[], T]) -> T:
        """`operation()`, or BackendError when Redis fails or failed less than `retry_after` seconds ago."""
        if time.monotonic() < self._down_until:
            raise BackendError(f"{self._server} is unavailable; next try in {self.retry_after:g}s at most")
        try:
            result = operation()
        except self._errors as error:
            if self._down_until == 0.0:
                logger.debug("%s failed (%s)", self._server, error)  # the store warns once per outage
            self._down_until = time.monotonic() + self.retry_after
            hint = " (MOVED: this is a Redis Cluster node; pass cluster=True)" if isinstance(error, self._moved) else ""
            raise BackendError(f"{self._server}: {error}{hint}") from error
        if self._down_until:
            logger.debug("%s is reachable again", self._server)
            self._down_until = 0.0
        return result

    def _scan(self):
        """Names of this store's keys (the prefix's glob characters escaped); on a cluster, of every master."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        return self.client.scan_iter(match=pattern, count=1000)

    def _pipeline(self):
        # A cluster pipeline sends each node its commands, then reads the replies: one round trip per node.
        return self.client.pipeline() if self.cluster else self.client.pipeline(transaction=False)

    def get_prefix(self, keys: Sequence[str], parent: str | None = None, max_bytes: int | None = None) -> list[bytes]:
        """With `max_bytes`, each entry is read as EXISTS + GETRANGE 0..max_bytes (+ EXPIRE with a `ttl`) in the
        one pipeline: at most `max_bytes + 1` bytes of an oversized value cross the network, and it costs no
        extra round trip (a GET checked afterwards would transfer a planted value of up to 512 MB whole, per
        key; a STRLEN first would cost a second round trip on every lookup). EXISTS tells an empty value (an
        unusable entry) from a missing one, which GETRANGE alone cannot."""
        if not keys:
            return []

        def fetch():
            pipe = self._pipeline()
            for key in keys:
                name = self.prefix + key
                if max_bytes is not None:
                    pipe.exists(name)
                    pipe.getrange(name, 0, max_bytes)
                    if self.ttl is not None:
                        pipe.expire(name, self.ttl)
                elif self.ttl is None:
                    pipe.get(name)
                else:
                    pipe.getex(name, ex=self.ttl)
            values = pipe.execute(raise_on_error=False)  # one bad entry is not an outage
            outage = next((value for value in values if isinstance(value, self._outages)), None)
            if outage is not None:  # a cluster node failed: the whole lookup is a miss, as with one server
                raise outage
            if max_bytes is None:
                return values
            step = 2 if self.ttl is None else 3
            return [_capped_value(values[i], values[i + 1], self._errors) for i in range(0, len(values), step)]

        found = []
        for key, value in zip(keys, self._call(fetch)):
            if isinstance(value, self._errors):  # e.g. another client stored a list under this key
                logger.warning("Redis entry %s%s… is unusable (%s); deleting it", self.prefix, key[:16], value)
                self._delete_quietly(key)
                break
            if value is None:
                break
            if max_bytes is not None and len(value) > max_bytes:
                refuse_oversized(key, self._size(key, max_bytes), max_bytes)
                self._delete_quietly(key)
                break
            found.append(value)
        return found

    def _size(self, key: str, max_bytes: int) -> int | str:
        """The bytes held under `key` (for a log line), or a description when the server cannot tell now."""
        try:
            return self._call(lambda: self.client.strlen(self.prefix + key))
        except BackendError:
            return f"more than {max_bytes}"

    def _delete_quietly(self, key: str) -> None:
        """Delete a bad entry; if the server fails now, the next reader finds and deletes it instead."""
        with contextlib.suppress(BackendError):
            self.delete(key)

    def _foreign(self, count: int) -> None:
        """Record keys of another type under this store's prefix: skipped, warned about once, never an outage."""
        self.foreign_keys = count
        if count and not self._warned_foreign:
            self._warned_foreign = True
            logger.warning(
                "%s holds %d keys under the prefix %r that are not strings (not this store's entries); they are "
                "ignored in its statistics (a read of one is a miss that deletes it)",
                self._server,
                count,
                self.prefix,
            )

    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        """Store `value`; `parent` is not used (Redis evicts by its own `maxmemory-policy`). False when the server
        is full and may not evict (`maxmemory` with `noeviction`): that write fails, reads go on."""
        from redis.exceptions import OutOfMemoryError

        def store() -> bool:
            try:
                self.client.set(self.prefix + key, value, ex=self.ttl)
            except OutOfMemoryError as error:
                if not self._warned_full:
                    logger.warning(
                        "%s is full and may not evict, so new blocks are not stored (%s); set maxmemory-policy "
                        "allkeys-lru or allkeys-lfu, or raise maxmemory",
                        self._server,
                        error,
                    )
                    self._warned_full = True
                return False
            return True

        return self._call(store)

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete(self.prefix + key))

    def nbytes(self) -> int | None:
        """Bytes under this prefix (a SCAN of the server, or of every master of a cluster), or None while it is
        unreachable."""

        def total():
            pipe = self._pipeline()
            for name in self._scan():
                pipe.strlen(name)
            sizes = pipe.execute(raise_on_error=False)  # a key of another type answers WRONGTYPE: not an outage
            outage = next((size for size in sizes if isinstance(size, self._outages)), None)
            if outage is not None:
                raise outage
            self._foreign(sum(1 for size in sizes if not isinstance(size, int)))
            return sum(size for size in sizes if isinstance(size, int))

        try:
            return self._call(total)
        except BackendError:
            return None

    def clear(self) -> int:
        """Delete every key under this prefix (on every master of a cluster); returns how many. Raises
        BackendError on a failure."""

        def drop() -> int:
            return sum(self.client.delete(name) for name in self._scan())

        return self._call(drop)

    def inventory(self) -> Iterator[tuple[str, int, bytes]]:
        """Every entry under this prefix: `(key, bytes, its first HEADER_PEEK bytes)`, pipelined in batches."""

        def listing() -> list[tuple[str, int, bytes]]:
            names = list(self._scan())
            entries, foreign = [], 0
            for start in range(0, len(names), _LISTING_BATCH):
                batch = names[start : start + _LISTING_BATCH]
                pipe = self._pipeline()
                for name in batch:
                    pipe.strlen(name)
                    pipe.getrange(name, 0, HEADER_PEEK - 1)
                replies = pipe.execute(raise_on_error=False)
                outage = next((reply for reply in replies if isinstance(reply, self._outages)), None)
                if outage is not None:
                    raise outage
                for name, size, head in zip(batch, replies[::2], replies[1::2]):
                    if isinstance(size, int) and isinstance(head, bytes):
                        # a key that is not UTF-8 is not this store's: listed with its bytes escaped
                        key = name[len(self.prefix.encode()) :].decode("utf-8", errors="backslashreplace")
                        entries.append((key, size, head))
                    elif not isinstance(size, int):  # another type under the prefix (else deleted meanwhile)
                        foreign += 1
            self._foreign(foreign)
            return entries

        yield from self._call(listing)

    def server_info(self) -> dict[str, str | int]:
        """The server's memory, budget, eviction policy and keyspace counters (summed over a cluster's masters;
        the counters are the whole server's, not only this prefix's)."""

        def info() -> list[dict]:
            if self.cluster:
                return list(self.client.info(target_nodes=self.client.PRIMARIES).values())
            return [self.client.info()]

        nodes = self._call(info)
        summary: dict[str, str | int] = {"nodes": len(nodes)}
        for name in ("used_memory", "maxmemory", "evicted_keys", "keyspace_hits", "keyspace_misses"):
            summary[name] = sum(int(node.get(name, 0)) for node in nodes)
        summary["maxmemory_policy"] = ", ".join(sorted({str(node.get("maxmemory_policy")) for node in nodes}))
        return summary

    def __repr__(self) -> str:
        where = f"cluster={self._where!r}" if self.cluster else f"server={self._where!r}"
        return f"RedisBackend({where}, prefix={self.prefix!r}, ttl={self.ttl})"


def _check_cluster_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The URL's options, after refusing what `RedisCluster` would drop silently (a keyword that is not one of its
    own or a node connection's) or only refuse at connection time (a unix socket, a database other than 0)."""
    from redis.cluster import KWARGS_DISABLED_KEYS, REDIS_ALLOWED_KEYS, RedisCluster
    from redis.connection import parse_url

    not_options = {"self", "kwargs", "url", "host", "port", "startup_nodes"}  # the URL names the node
    own = set(inspect.signature(RedisCluster.__init__).parameters) - not_options
    accepted = own | (set(REDIS_ALLOWED_KEYS) - set(KWARGS_DISABLED_KEYS) - {"db"})
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"RedisBackend(cluster=True): not a redis-py cluster option: {', '.join(unknown)}")
    url_options = parse_url(url)
    if "path" in url_options or url_options.get("db", 0) != 0:
        raise ValueError(f"url={url!r}: a cluster is reached over TCP (redis:// or rediss://) and has database 0 only")
    return url_options


def _check_seconds(name: str, value: object, zero: bool = False) -> None:
    """A finite int or float (not a bool) above 0 (or equal to it with `zero`) and at most MAX_SECONDS."""
    valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (valid and (value >= 0 if zero else value > 0) and value <= MAX_SECONDS):
        raise ValueError(
            f"{name}={value!r} must be a finite number {'>=' if zero else '>'} 0 and <= {MAX_SECONDS:g} (seconds)"
        )


def _capped_value(exists: object, head: object, errors: tuple[type[Exception], ...]) -> object:
    """One entry of a capped read: None when missing, the error when it is not a string, else its bytes (at most
    `max_bytes + 1` of them: more than `max_bytes` means oversized)."""
    if isinstance(head, errors):
        return head
    if isinstance(exists, errors):
        return exists
    return head if exists else None
