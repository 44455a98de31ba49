"""Directory backend: one safetensors file per block, atomic writes, LRU by access time, survives restarts."""

import contextlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from hf_kvcache.files import UnsafeFile, read_regular_file
from hf_kvcache.prefix.backend import (
    ENTRY_CAP,
    HEADER_PEEK,
    Backend,
    BackendError,
    check_max_bytes,
    refuse_oversized,
)

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_TEMP_PREFIX = ".tmp-"
_ABANDONED_TEMP_SECONDS = 600
_KEY = re.compile(r"^[0-9a-f]{16,128}$")
_FOLDER = re.compile(r"^[0-9a-f]{2}$")
_CHAIN_STEP_NS = 1000  # a block's stamp is this much older than its parent's


def _stamp(path: Path, mtime_ns: int) -> None:
    with contextlib.suppress(OSError, NotImplementedError):  # evicted by another process meanwhile: nothing to stamp
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=os.utime not in os.supports_follow_symlinks)


def _peek(path: Path) -> bytes | None:
    """The first HEADER_PEEK bytes of the regular file at `path`; b"" for anything else (a link, a FIFO, a
    device, a folder: never followed nor opened, so never blocking) or a file that cannot be read; None when
    it is gone."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return b""
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):  # replaced between the two looks
            return b""
        with os.fdopen(handle, "rb", closefd=False) as file:
            return file.read(HEADER_PEEK)
    except OSError:
        return b""
    finally:
        os.close(handle)


def _delete_path(path: Path) -> bool:
    """Delete the entry at `path` itself (a link, not its target; an empty folder planted there too); False when
    it is gone already. Raises the OSError of a failed deletion."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.rmdir(path)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        return False
    return True


def _remove_entry(path: Path) -> None:
    """`_delete_path`, logging a failure instead of raising it."""
    try:
        _delete_path(path)
    except OSError as error:
        logger.warning("cannot delete prefix store entry %s: %s", path, error.strerror or error)


class DiskBackend(Backend):
    """Blocks as `<path>/<key[:2]>/<key>.safetensors`, shared by every process that opens `path`.

    Writes go to a temporary file in the same folder and are moved in place with `os.replace`, so a
    reader sees the old file, the new one, or none. A read stamps the file's modification time;
    beyond `max_bytes` the files stamped longest ago are deleted (least recently used). Within a chain
    a block is stamped a microsecond before its parent, on reads and writes, so a prompt's later
    blocks go before the ones they extend. (A file damaged some other way,
    for example by a crash before the data reached the disk, fails the store's checksum: a miss.)

    Entries are read as untrusted files: only regular files, never through a link, never more than the
    caller's `max_bytes` (nor this store's `max_bytes`, nor `ENTRY_CAP`). A link, FIFO, device or folder
    planted under a block's name, or a file over the cap, is a miss with a warning and is deleted (the path
    itself, never what a link points to). A leftover temporary file that cannot be deleted is warned about
    once and left alone.
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
        self._warned_stuck_temp = False
        self._bytes = self.nbytes()  # an upper bound between scans: a full scan decides what to evict

    def file(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"key={key!r} must be a lowercase hex digest")
        return self.path / key[:2] / f"{key}{SUFFIX}"

    def get_prefix(self, keys: Sequence[str], parent: str | None = None, max_bytes: int | None = None) -> list[bytes]:
        cap = min(limit for limit in (max_bytes, self.max_bytes, ENTRY_CAP) if limit is not None)
        found = []
        for key in keys:
            path = self.file(key)
            if _drop_folder_link(path):
                break
            try:
                found.append(read_regular_file(path, cap, "prefix store entry", follow_links=False))
            except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a file planted as the key's folder
                break
            except UnsafeFile as error:
                self._refuse(key, path, error, cap)
                break
            except OSError as error:
                raise BackendError(f"cannot read {path}: {error}") from error
        newest = self._below(parent) or time.time_ns()  # continue the chain's stamps below its earlier blocks'
        for depth, key in enumerate(keys[: len(found)]):
            _stamp(self.file(key), newest - depth * _CHAIN_STEP_NS)
        return found

    @staticmethod
    def _refuse(key: str, path: Path, error: UnsafeFile, cap: int) -> None:
        """Log and delete an entry that is not a regular file, or is larger than `cap`."""
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        if info is not None and stat.S_ISREG(info.st_mode) and info.st_size > cap:
            refuse_oversized(key, info.st_size, cap)
        else:
            logger.warning("prefix store entry %s… is unusable (%s); deleting it", key[:16], error)
        _remove_entry(path)

    def _below(self, parent: str | None) -> int | None:
        """A stamp one step older than `parent`'s, or None without a parent file to go by."""
        if parent is None:
            return None
        try:
            return os.lstat(self.file(parent)).st_mtime_ns - _CHAIN_STEP_NS
        except OSError:
            return None

    def put(self, key: str, value: bytes, parent: str | None = None) -> bool:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            return False
        path = self.file(key)
        if _drop_folder_link(path) and path.parent.is_symlink():  # never write through a planted folder link
            raise BackendError(f"cannot write {path}: its folder is a symbolic link that could not be removed")
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
        if _drop_folder_link(path):
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise BackendError(f"cannot delete {path}: {error}") from error

    def _files(self) -> list[tuple[float, int, Path]]:
        """(access stamp, size, path) of every block entry; drops temporary files left by dead writers. Only
        `<key[:2]>/<key>.safetensors` names are the store's: other files in the folder are never counted,
        evicted or cleared. Nothing is followed or opened: a folder that is a link is skipped, and an entry
        that is not a regular file (a link, a FIFO) is listed with 0 bytes, so that eviction and `clear`
        remove it (the entry itself) and `inventory` lists it as unreadable."""
        entries = []
        now = time.time()
        for folder in _scan(self.path):
            if not (_FOLDER.match(folder.name) and _is_folder(folder)):
                continue
            for entry in _scan(folder.path):
                name = entry.name
                if not name.endswith(SUFFIX):
                    continue
                key = name.removesuffix(SUFFIX)
                block = _KEY.match(key) is not None and folder.name == key[:2]
                if not (block or name.startswith(_TEMP_PREFIX)):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:  # deleted meanwhile, or unreadable: not counted
                    continue
                path = Path(entry.path)
                if block:
                    entries.append((info.st_mtime, info.st_size if stat.S_ISREG(info.st_mode) else 0, path))
                elif now - info.st_mtime > _ABANDONED_TEMP_SECONDS:
                    self._drop_temporary(path)
        return entries

    def _drop_temporary(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # a read-only folder: warn once, never fail the request or the listing
            if not self._warned_stuck_temp:
                self._warned_stuck_temp = True
                logger.warning(
                    "cannot delete the abandoned temporary file %s (%s); leaving it and any like it in place",
                    path,
                    error.strerror or error,
                )

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
        """Every block entry; one that is not a regular file (or cannot be read) comes with an empty head,
        which reads as unreadable."""
        for _, size, path in self._files():
            head = _peek(path)
            if head is not None:  # else evicted meanwhile
                yield path.name.removesuffix(SUFFIX), size, head

    def clear(self) -> int:
        count = 0
        for _, _, path in self._files():
            try:
                count += _delete_path(path)
            except OSError as error:
                raise BackendError(f"cannot delete {path}: {error}") from error
        return count

    def nbytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    @property
    def evictions(self) -> int:
        return self._evictions

    def __repr__(self) -> str:
        return f"DiskBackend(path={str(self.path)!r}, max_bytes={self.max_bytes})"


def _scan(folder: str | os.PathLike) -> list[os.DirEntry]:
    """The entries of `folder`; none when it is gone or unreadable."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _drop_folder_link(path: Path) -> bool:
    """Whether the folder of the entry at `path` is a symbolic link (planted: the store makes real folders); if
    so it is removed (the link, never what it points to) and logged, so nothing is read or written through it."""
    if not path.parent.is_symlink():
        return False
    logger.warning("prefix store folder %s is a symbolic link; removing the link (not its target)", path.parent)
    try:
        path.parent.unlink()
    except OSError as error:
        logger.warning("could not remove the link %s: %s", path.parent, error)
    return True
