"""Directory backend: one safetensors file per block, atomic writes, LRU by access time, survives restarts."""

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from hf_kvcache.prefix.backend import HEADER_PEEK, Backend, BackendError, check_max_bytes

SUFFIX = ".safetensors"
_TEMP_PREFIX = ".tmp-"
_ABANDONED_TEMP_SECONDS = 600
_KEY = re.compile(r"^[0-9a-f]{16,128}$")
_FOLDER = re.compile(r"^[0-9a-f]{2}$")
_CHAIN_STEP_NS = 1000  # a block's stamp is this much older than its parent's


def _stamp(path: Path, mtime_ns: int) -> None:
    with contextlib.suppress(OSError):  # evicted by another process meanwhile: nothing to stamp
        os.utime(path, ns=(mtime_ns, mtime_ns))


class DiskBackend(Backend):
    """Blocks as `<path>/<key[:2]>/<key>.safetensors`, shared by every process that opens `path`.

    Writes go to a temporary file in the same folder and are moved in place with `os.replace`, so a
    reader sees the old file, the new one, or none. A read stamps the file's modification time;
    beyond `max_bytes` the files stamped longest ago are deleted (least recently used). Within a chain
    a block is stamped a microsecond before its parent, on reads and writes, so a prompt's later
    blocks go before the ones they extend. (A file damaged some other way,
    for example by a crash before the data reached the disk, fails the store's checksum: a miss.)
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int | None = 10 << 30):
        check_max_bytes(max_bytes)
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ValueError(f"path={path!r} must be a non-empty directory path (str or os.PathLike)")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._evictions = 0
        self._lock = threading.Lock()
        self._bytes = self.nbytes()  # an upper bound between scans: a full scan decides what to evict

    def file(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"key={key!r} must be a lowercase hex digest")
        return self.path / key[:2] / f"{key}{SUFFIX}"

    def get_prefix(self, keys: Sequence[str], parent: str | None = None) -> list[bytes]:
        found = []
        for key in keys:
            path = self.file(key)
            try:
                found.append(path.read_bytes())
            except FileNotFoundError:
                break
            except OSError as error:
                raise BackendError(f"cannot read {path}: {error}") from error
        newest = self._below(parent) or time.time_ns()  # continue the chain's stamps below its earlier blocks'
        for depth, key in enumerate(keys[: len(found)]):
            _stamp(self.file(key), newest - depth * _CHAIN_STEP_NS)
        return found

    def _below(self, parent: str | None) -> int | None:
        """A stamp one step older than `parent`'s, or None without a parent file to go by."""
        if parent is None:
            return None
        try:
            return self.file(parent).stat().st_mtime_ns - _CHAIN_STEP_NS
        except OSError:
            return None

    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            return False
        path = self.file(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # the store folder itself may have been deleted
            handle, temp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=SUFFIX)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(value)
                os.replace(temp, path)
                if (stamp := self._below(parent)) is not None:
                    _stamp(path, stamp)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as error:
            raise BackendError(f"cannot write {path}: {error}") from error
        with self._lock:
            self._bytes += len(value)
            if self.max_bytes is not None and self._bytes > self.max_bytes:
                self._evict(newest=path)
        return True

    def delete(self, key: str) -> None:
        path = self.file(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise BackendError(f"cannot delete {path}: {error}") from error

    def _files(self) -> list[tuple[float, int, Path]]:
        """(access stamp, size, path) of every block file; drops temporary files left by dead writers. Only
        `<key[:2]>/<key>.safetensors` names are the store's: other files in the folder are never counted,
        evicted or cleared."""
        entries = []
        now = time.time()
        for path in self.path.glob(f"??/*{SUFFIX}"):
            key = path.name.removesuffix(SUFFIX)
            block = _KEY.match(key) is not None and path.parent.name == key[:2]
            temporary = path.name.startswith(_TEMP_PREFIX) and _FOLDER.match(path.parent.name) is not None
            if not (block or temporary):
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if block:
                entries.append((info.st_mtime, info.st_size, path))
            elif now - info.st_mtime > _ABANDONED_TEMP_SECONDS:
                path.unlink(missing_ok=True)
        return entries

    def _evict(self, newest: Path) -> None:
        """Delete the least recently used files until the store fits `max_bytes`. Files that cannot be deleted
        (permissions) are skipped; if the store still does not fit, the file just written goes too, and the
        write fails: the store never grows past its budget."""
        entries = sorted(self._files(), key=lambda entry: entry[0])
        self._bytes = sum(size for _, size, _ in entries)
        stuck = []
        for _, size, path in entries:
            if self._bytes <= self.max_bytes:
                return
            if path == newest:
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                stuck.append(f"{path.name}: {error.strerror or error}")
                continue
            self._bytes -= size
            self._evictions += 1
        if self._bytes > self.max_bytes:
            with contextlib.suppress(OSError):
                newest.unlink(missing_ok=True)
            raise BackendError(f"over max_bytes={self.max_bytes} and {len(stuck)} files cannot be deleted ({stuck[0]})")

    def inventory(self) -> Iterator[tuple[str, int, bytes]]:
        for _, size, path in self._files():
            try:
                with path.open("rb") as handle:
                    yield path.name.removesuffix(SUFFIX), size, handle.read(HEADER_PEEK)
            except FileNotFoundError:  # evicted meanwhile
                continue

    def clear(self) -> int:
        count = 0
        for _, _, path in self._files():
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                raise BackendError(f"cannot delete {path}: {error}") from error
            count += 1
        return count

    def nbytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    @property
    def evictions(self) -> int:
        return self._evictions

    def __repr__(self) -> str:
        return f"DiskBackend(path={str(self.path)!r}, max_bytes={self.max_bytes})"
