"""`read_regular_file`: untrusted files are read only when regular, unlinked where asked, and within their cap."""

import os

import pytest

from hf_kvcache.files import UnsafeFile, read_regular_file


def test_a_regular_file_is_read_whole(tmp_path):
    (tmp_path / "entry").write_bytes(b"abc")
    assert read_regular_file(tmp_path / "entry", 3, "entry") == b"abc"


@pytest.mark.parametrize(
    ("make", "follow_links", "message"),
    [
        (lambda p: os.mkfifo(p), True, "not a regular file"),  # would block a plain open() forever
        (lambda p: os.symlink("/dev/zero", p), True, "not a regular file"),  # would exhaust memory
        (lambda p: p.mkdir(), True, "not a regular file"),
        (lambda p: os.symlink(p.with_name("target"), p), False, "symbolic link"),
        (lambda p: p.write_bytes(b"x" * 11), True, "holds 11 bytes, more than the 10 accepted"),
        (lambda p: (p.write_bytes(b""), os.truncate(p, 1 << 40)), True, "more than the 10 accepted"),  # sparse
    ],
    ids=["fifo", "link-to-dev-zero", "folder", "link-refused", "too-large", "huge-sparse"],
)
def test_unsafe_files_are_refused_with_their_name(tmp_path, make, follow_links, message):
    (tmp_path / "target").write_bytes(b"ok")
    path = tmp_path / "entry"
    make(path)
    with pytest.raises(UnsafeFile, match=message) as refused:
        read_regular_file(path, 10, "store entry", follow_links=follow_links)
    assert f"store entry {path}" in str(refused.value)


def test_a_followed_link_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "target").write_bytes(b"ok")
    os.symlink(tmp_path / "target", tmp_path / "entry")
    assert read_regular_file(tmp_path / "entry", 10, "profile") == b"ok"


def test_a_missing_file_keeps_its_error_class_and_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"bit profile {tmp_path / 'none'}"):
        read_regular_file(tmp_path / "none", 10, "bit profile")
