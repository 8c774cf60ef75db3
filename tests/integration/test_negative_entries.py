"""Negative dentries: a miss is cached by the kernel, and every way a name appears shows.

The daemon answers a lookup that misses with inode 0 and a timeout, so the kernel keeps
a negative dentry (operations.NEGATIVE_TIMEOUT says why that is safe).  A miss looked up
again then never reaches the daemon; and a name that is looked up missing, then made by
any call, is there at once for every process.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import Mount, Mounter, errno_of


def other_process_sees(path: Path) -> bool:
    """Whether a process other than this one finds *path* (lstat, no cache of ours)."""
    code = "import os, sys; os.lstat(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(path)], check=False).returncode == 0


def make_by_link(path: Path) -> None:
    src = path.with_name(path.name + ".src")
    src.write_bytes(b"x")
    os.link(src, path)


def make_by_rename(path: Path) -> None:
    src = path.with_name(path.name + ".src")
    src.write_bytes(b"x")
    os.rename(src, path)


def make_by_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


MAKERS: dict[str, Callable[[Path], object]] = {
    "open O_CREAT|O_EXCL": lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    "open O_CREAT": lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY)),
    "mkdir": os.mkdir,
    "symlink": lambda p: os.symlink("target", p),
    "mkfifo": os.mkfifo,
    "mknod socket": make_by_socket,
    "link": make_by_link,
    "rename": make_by_rename,
}


def test_a_name_looked_up_missing_appears_as_soon_as_it_is_made(work: Path) -> None:
    for how, make in MAKERS.items():
        path = work / how.replace(" ", "_").replace("|", "_")
        for _ in range(2):  # the second miss comes from the kernel's negative dentry
            assert errno_of(os.lstat, path) == errno.ENOENT, how
        assert not other_process_sees(path), how
        make(path)
        assert os.lstat(path) is not None, how
        assert other_process_sees(path), how


def test_a_removed_name_is_missing_and_can_come_back(work: Path) -> None:
    path = work / "f"
    for _ in range(3):
        path.write_bytes(b"data")
        assert path.read_bytes() == b"data"
        path.unlink()
        assert errno_of(os.stat, path) == errno.ENOENT
        assert errno_of(os.stat, path) == errno.ENOENT
        assert not other_process_sees(path)
    d = work / "d"
    d.mkdir()
    d.rmdir()
    assert errno_of(os.stat, d) == errno.ENOENT
    d.mkdir()
    assert stat.S_ISDIR(os.stat(d).st_mode)


def test_a_rename_away_leaves_a_miss_and_back_restores_it(work: Path) -> None:
    a, b = work / "a", work / "b"
    a.write_bytes(b"1")
    assert errno_of(os.stat, b) == errno.ENOENT
    os.rename(a, b)
    assert errno_of(os.stat, a) == errno.ENOENT
    assert b.read_bytes() == b"1"
    os.rename(b, a)
    assert errno_of(os.stat, b) == errno.ENOENT
    assert a.read_bytes() == b"1"
    a.unlink()


def lookups_logged(mount: Mount, name: str) -> int:
    assert mount.log is not None
    needle = f", b'{name}', "
    return sum(
        1
        for line in mount.log.read_text(errors="replace").splitlines()
        if "lookup(" in line and needle in line
    )


def test_a_miss_asked_again_does_not_reach_the_daemon(mounter: Mounter) -> None:
    mount = mounter.foreground(["--debug", "--memory-cap", "8M"])
    missing = mount.path / "never-made"
    for _ in range(5):
        assert errno_of(os.stat, missing) == errno.ENOENT
    assert lookups_logged(mount, "never-made") == 1
    # An exclusive create does not trust the negative dentry: it asks again, and works.
    os.close(os.open(missing, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    assert lookups_logged(mount, "never-made") == 2
    assert os.stat(missing).st_size == 0
