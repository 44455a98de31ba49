"""Reading files the library did not write in this process (store blocks, bit profiles, partial results) as
untrusted input: only regular files are opened, never blocking on a FIFO or a device, and never read past a
size cap, so a planted `/dev/zero` link, a FIFO or a huge sparse file is refused instead of hanging the
request or exhausting memory.
"""

import os
import stat
from pathlib import Path


class UnsafeFile(ValueError):
    """A file that must not be read: not a regular file, a link where none is allowed, or over its size cap."""


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str, follow_links: bool = True) -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes` of them.

    `what` names the file's role in errors (e.g. "bit profile"). `follow_links=False` refuses a symbolic link
    itself (a store folder's entries are never links, so one is planted).

    Raises:
        FileNotFoundError / PermissionError / OSError: the file cannot be opened (the message names it).
        UnsafeFile: a link with `follow_links=False`, not a regular file (FIFO, device, folder), or larger than
            `max_bytes`.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        handle = os.open(path, flags)
    except OSError as error:
        if not follow_links and path.is_symlink():
            raise UnsafeFile(f"{what} {path} is a symbolic link; only regular files are read") from None
        raise type(error)(error.errno, f"{what} {path}: {error.strerror}") from None
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            raise UnsafeFile(f"{what} {path} is not a regular file; only regular files are read")
        if status.st_size > max_bytes:
            raise UnsafeFile(f"{what} {path} holds {status.st_size} bytes, more than the {max_bytes} accepted")
        with os.fdopen(handle, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(handle)
    if len(data) > max_bytes:  # grew while being read
        raise UnsafeFile(f"{what} {path} holds more than the {max_bytes} bytes accepted")
    return data


def read_text_file(path: str | os.PathLike, max_bytes: int, what: str) -> str:
    """The UTF-8 text of the regular file `path` (at most `max_bytes`), read as untrusted input.

    Raises:
        OSError (FileNotFoundError, PermissionError, ...): the file cannot be opened; the message names `what`
            and the file.
        ValueError: `UnsafeFile` (a FIFO, device, folder or oversized file) or text that is not UTF-8, named.
    """
    shown = f"{what} {os.fspath(path)}"
    try:
        data = read_regular_file(path, max_bytes, what)
    except OSError as error:  # the same class (FileNotFoundError, ...), with the file's role in the message
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise type(error)(f"{shown}: cannot read it ({reason})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{shown}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start})") from None


def write_text_file(path: str | os.PathLike, text: str) -> Path:
    """Write `text` as UTF-8 to `path`, its parent folders created; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
