"""What a prefix-store backend provides: bytes under string keys, read as the longest present prefix."""

from abc import ABC, abstractmethod
from collections.abc import Sequence


class BackendError(RuntimeError):
    """The backend could not be reached or failed; the store treats it as a miss and recomputes."""


class Backend(ABC):
    """A key -> bytes store. Keys are lowercase hex digests made by `hf_kvcache.prefix.keys`."""

    @abstractmethod
    def get_prefix(self, keys: Sequence[str]) -> list[bytes]:
        """Values of `keys[0]`, `keys[1]`, ... up to (not including) the first missing key."""

    @abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (replacing any old value); may evict other entries."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` if present."""

    def nbytes(self) -> int | None:
        """Bytes of values held now, or None when the backend cannot tell."""
        return None

    @property
    def evictions(self) -> int | None:
        """Entries this backend object evicted, or None when eviction is not under its control."""
        return None


def check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes={max_bytes!r} must be a positive integer (bytes) or None for no limit")
