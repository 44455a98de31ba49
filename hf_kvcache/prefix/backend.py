"""What a prefix-store backend provides: bytes under string keys, read as the longest present prefix."""

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from hf_kvcache.validation import check_optional_int

logger = logging.getLogger(__name__)

HEADER_PEEK = 1 << 16  # bytes read per entry when listing a store: a block's safetensors header fits
# The most a backend reads for one entry when its caller names no `max_bytes`: far above any block (a
# 256-token block of a 70B model is ~80 MB; Redis refuses values over 512 MB), far below a planted
# sparse file.
ENTRY_CAP = 1 << 30


class BackendError(RuntimeError):
    """The backend could not be reached or failed; the store treats it as a miss and recomputes."""


class Backend(ABC):
    """A key -> bytes store. Keys are lowercase hex digests made by `hf_kvcache.prefix.keys`."""

    @abstractmethod
    def get_prefix(self, keys: Sequence[str], parent: str | None = None, max_bytes: int | None = None) -> list[bytes]:
        """Values of `keys[0]`, `keys[1]`, ... up to (not including) the first missing key.

        `parent`: the key of the block before `keys[0]` in the chain (None when `keys[0]` starts it), for a
        prefix fetched in several requests. `max_bytes`: the largest value the caller can use (None: no
        limit beyond the backend's own `ENTRY_CAP` for files); a larger one ends the prefix as if its key were
        missing, is deleted, and is logged (`refuse_oversized`), and is never read whole when the backend can
        tell its size first."""

    @abstractmethod
    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        """Store `value` under `key` (replacing any old value); may evict other entries. False when the value
        was not kept (larger than the whole budget).

        `parent`: the key of the block before this one in its prompt's chain (None for a first block). A
        block is only ever served after its parent, so backends that evict use it to drop a chain's
        newest blocks before the ones they extend."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` if present."""

    def inventory(self) -> Iterator[tuple[str, int, bytes]]:
        """Every stored entry as `(key, bytes, the first HEADER_PEEK bytes of its value)`: enough to read a
        block's header (`codec.block_metadata`) without transferring the block."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its entries")

    def clear(self) -> int:
        """Delete every entry of this store; returns how many were deleted."""
        raise NotImplementedError(f"{type(self).__name__} cannot be cleared")

    def server_info(self) -> dict[str, str | int]:
        """What the server behind the backend reports about itself (memory, eviction policy, counters); {}
        for backends without a server."""
        return {}

    def nbytes(self) -> int | None:
        """Bytes of values held now, or None when the backend cannot tell."""
        return None

    @property
    def evictions(self) -> int | None:
        """Entries this backend object evicted, or None when eviction is not under its control."""
        return None


def refuse_oversized(key: str, size: int | str, max_bytes: int) -> None:
    """Log an entry larger than the caller can use (`size`: its bytes, or a description when unknown)."""
    logger.warning(
        "prefix store entry %s… holds %s bytes, more than the %d a block can take; deleting it",
        key[:16],
        size,
        max_bytes,
    )


def check_max_bytes(max_bytes: int | None) -> None:
    check_optional_int("max_bytes", max_bytes, minimum=1, hint="bytes; None for no limit")
