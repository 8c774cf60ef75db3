"""The readahead window: raised to 1 MiB once INIT is answered (as root), so cold sequential
reads reach the daemon as 1 MiB READs instead of 128 KiB; where the window cannot be raised,
the mount works on with the kernel's and says why.  A purged page still fails only the
requests that touch it: intact pages in the same 1 MiB window keep reading right.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mounter, errno_of
from tests.integration.vrange_helpers import PAGE, mark, pattern, purge_all, purged
from vrangefs import mount as daemon
from vrangefs import mountinfo
from vrangefs.mount import READ_AHEAD_KB

MiB = 1 << 20


def window_kb(path: Path) -> int:
    entry = mountinfo.find(path)
    assert entry is not None, f"{path} is not mounted"
    return int(Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb").read_text())


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def test_the_window_is_raised_once_mounted(mounter: Mounter) -> None:
    mount = mounter.mount("16M")
    wait_until(lambda: window_kb(mount.path) == READ_AHEAD_KB, 10, "the window raised")
    assert mount.log is not None
    assert f"readahead raised from 128 to {READ_AHEAD_KB} KiB" in mount.log.read_text()


def test_a_cold_sequential_read_asks_for_1_mib_at_a_time(mounter: Mounter) -> None:
    mount = mounter.foreground(["--debug", "--memory-cap", "64M"])
    wait_until(lambda: window_kb(mount.path) == READ_AHEAD_KB, 10, "the window raised")
    f = mount.path / "f"
    content = pattern(8 * MiB // PAGE)
    f.write_bytes(content)
    drop_page_cache()
    with open(f, "rb", buffering=0) as reader:
        got = b"".join(iter(lambda: reader.read(MiB), b""))
    assert got == content
    assert mount.log is not None
    sizes = [
        int(m[1])
        for m in re.finditer(r"read\(\d+, \d+, (\d+)\)", mount.log.read_text(errors="replace"))
    ]
    assert sizes.count(MiB) >= 4, f"READ sizes: {sizes}"
    assert max(sizes) == MiB


def test_intact_pages_next_to_a_purged_one_read_right(mounter: Mounter) -> None:
    mount = mounter.mount("64M")
    wait_until(lambda: window_kb(mount.path) == READ_AHEAD_KB, 10, "the window raised")
    f = mount.path / "f"
    pages = 4 * MiB // PAGE
    content = pattern(pages)
    f.write_bytes(content)
    lost = 300  # in the second MiB, so inside one READ of the sequential read below
    mark(f, f"{lost * PAGE},{PAGE}")
    purge_all(mount.path)
    assert purged(f) == [(lost * PAGE, PAGE)]
    drop_page_cache()
    fd = os.open(f, os.O_RDONLY)
    try:
        got = bytearray()
        while True:  # read(2) returns the intact bytes before the purged page, then EIO
            try:
                chunk = os.read(fd, MiB)
            except OSError as e:
                assert e.errno == errno.EIO
                break
            assert chunk, "end of file before the purged page"
            got += chunk
        assert bytes(got) == content[: lost * PAGE]
        for page in (lost - 1, lost + 1, 256, 511, pages - 1):
            assert os.pread(fd, PAGE, page * PAGE) == content[page * PAGE : (page + 1) * PAGE]
        assert errno_of(os.pread, fd, PAGE, lost * PAGE) == errno.EIO
        rest = (lost + 1) * PAGE
        assert os.pread(fd, len(content) - rest, rest) == content[rest:]
    finally:
        os.close(fd)
    assert os.stat(f).st_size == len(content)  # no READ came back short: no false end of file


def test_without_the_right_to_raise_it_the_window_stays(
    mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = mounter.mount("16M")
    wait_until(lambda: window_kb(mount.path) == READ_AHEAD_KB, 10, "the window raised")
    entry = mountinfo.find(mount.path)
    assert entry is not None
    real_open = open

    def refuse_writes(path: str, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "w" in mode:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(daemon, "open", refuse_writes, raising=False)
    said = daemon.raise_readahead(str(mount.path), READ_AHEAD_KB * 2)
    assert said.startswith(f"readahead stays {READ_AHEAD_KB} KiB: cannot write")
    assert "needs root" in said
    assert window_kb(mount.path) == READ_AHEAD_KB
    assert daemon.raise_readahead(str(mount.path)).startswith(f"readahead {READ_AHEAD_KB} KiB")
    assert daemon.raise_readahead("/nonexistent/mountpoint").startswith("readahead unchanged")
