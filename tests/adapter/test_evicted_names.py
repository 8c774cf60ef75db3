"""How the daemon finds the directory of an evicted name to unlink it through the mount.

The daemon may run as root while users rename and symlink at will inside the mount, so
the walk must follow no symlink and must end at the very directory it was asked for;
anything else is an OSError, after which the daemon only notifies the kernel.  Checked
here on an ordinary directory tree standing in for the mountpoint.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vrangefs.operations import Operations
from vrangefs.pagestore import PageStore
from vrangefs.volume import Volume


def operations(mountpoint: Path) -> Operations:
    return Operations(Volume(PageStore(1 << 20)), mountpoint=str(mountpoint))


def test_the_walk_ends_at_the_directory_asked_for(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    ino = (tmp_path / "a" / "b").stat().st_ino
    fd = operations(tmp_path)._open_directory(b"/a/b", ino)
    try:
        assert os.fstat(fd).st_ino == ino
    finally:
        os.close(fd)


def test_a_symlinked_component_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep")
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "d").symlink_to(outside)  # a user swapped the directory for a symlink
    ops = operations(mount)
    for path in (b"/d", b"/d/"):
        with pytest.raises(OSError) as raised:
            ops._open_directory(path, outside.stat().st_ino)
        assert raised.value.errno in (errno.ENOTDIR, errno.ELOOP)
    assert (outside / "victim").read_bytes() == b"keep"


def test_another_directory_at_the_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    moved = (tmp_path / "d").stat().st_ino
    (tmp_path / "d").rename(tmp_path / "elsewhere")
    (tmp_path / "d").mkdir()  # a new directory took the old name
    with pytest.raises(OSError) as raised:
        operations(tmp_path)._open_directory(b"/d", moved)
    assert raised.value.errno == errno.ESTALE
