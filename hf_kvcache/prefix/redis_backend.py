"""Redis backend: blocks shared by many processes or machines through a real Redis server (redis-py)."""

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from hf_kvcache.prefix.backend import Backend, BackendError
from hf_kvcache.validation import check_number, check_optional_int, check_text

logger = logging.getLogger(__name__)


class RedisBackend(Backend):
    """Blocks stored as Redis strings under `prefix + key`, optionally expiring after `ttl` seconds.

    Args:
        url: a redis-py URL, e.g. `redis://127.0.0.1:6379/0`, `rediss://:password@host:6380/0` (TLS).
        prefix: namespace for this store's keys.
        ttl: seconds an entry lives after its last read or write (None: until the server evicts it;
            set `maxmemory` and `maxmemory-policy allkeys-lru` on the server for an LRU budget).
        socket_timeout, socket_connect_timeout: seconds before a slow or absent server counts as down.
        retry_after: seconds to skip the server after a failure, so an outage costs one timeout,
            not one per request; the first call after that tries again (recovery is automatic).
        **redis_kwargs: passed to `redis.Redis.from_url` (password, username, ssl_* settings, ...).

    Failures raise `BackendError`; the store turns them into misses with a warning.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "hf_kvcache:prefix:",
        ttl: int | None = None,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        retry_after: float = 2.0,
        **redis_kwargs: Any,
    ):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as error:
            raise ImportError("RedisBackend needs redis-py: pip install 'hf_kvcache[prefix]'") from error
        check_text("url", url)
        check_text("prefix", prefix)
        check_optional_int("ttl", ttl, minimum=1, hint="seconds")
        check_number("socket_timeout", socket_timeout, unit="seconds")
        check_number("socket_connect_timeout", socket_connect_timeout, unit="seconds")
        check_number("retry_after", retry_after, inclusive=True, unit="seconds")
        # One quick retry covers a pooled connection left stale by a server restart.
        redis_kwargs.setdefault("retry", Retry(NoBackoff(), 1))
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout, **redis_kwargs
        )
        try:  # builds a connection object without connecting: unknown keywords fail here, not at first use
            self.client.connection_pool.make_connection().disconnect()
        except TypeError as error:
            raise ValueError(f"RedisBackend: a keyword is not a redis-py connection option: {error}") from None
        self.prefix = prefix
        self.ttl = ttl
        self.retry_after = retry_after
        self._errors = redis.RedisError
        self._down_until = 0.0
        self._server = self._describe()

    def _describe(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"{where}/{kwargs.get('db', 0)}"

    def _call(self, operation):
        if time.monotonic() < self._down_until:
            raise BackendError(f"Redis at {self._server} is unavailable; next try in {self.retry_after:g}s at most")
        try:
            result = operation()
        except self._errors as error:
            if self._down_until == 0.0:
                logger.debug("Redis at %s failed (%s)", self._server, error)  # the store warns once per outage
            self._down_until = time.monotonic() + self.retry_after
            raise BackendError(f"Redis at {self._server}: {error}") from error
        if self._down_until:
            logger.debug("Redis at %s is reachable again", self._server)
            self._down_until = 0.0
        return result

    def _scan(self):
        """Names of this store's keys (the prefix's glob characters escaped)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        return self.client.scan_iter(match=pattern, count=1000)

    def get_prefix(self, keys: Sequence[str]) -> list[bytes]:
        if not keys:
            return []

        def fetch():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                if self.ttl is None:
                    pipe.get(self.prefix + key)
                else:
                    pipe.getex(self.prefix + key, ex=self.ttl)
            return pipe.execute(raise_on_error=False)  # one bad entry is not an outage

        found = []
        for key, value in zip(keys, self._call(fetch)):
            if isinstance(value, self._errors):  # e.g. another client stored a list under this key
                logger.warning("Redis entry %s%s… is unusable (%s); deleting it", self.prefix, key[:16], value)
                self.delete(key)
                break
            if value is None:
                break
            found.append(value)
        return found

    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        self._call(lambda: self.client.set(self.prefix + key, value, ex=self.ttl))
        return True

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete(self.prefix + key))

    def nbytes(self) -> int | None:
        """Bytes under this prefix (a SCAN of the server), or None while it is unreachable."""

        def total():
            pipe = self.client.pipeline(transaction=False)
            for name in self._scan():
                pipe.strlen(name)
            return sum(pipe.execute())

        try:
            return self._call(total)
        except BackendError:
            return None

    def clear(self) -> None:
        """Delete every key under this prefix."""

        def drop():
            for name in self._scan():
                self.client.delete(name)

        self._call(drop)

    def __repr__(self) -> str:
        return f"RedisBackend(server={self._server!r}, prefix={self.prefix!r}, ttl={self.ttl})"
