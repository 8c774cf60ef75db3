"""The Python client (``vrangefs.client``) against a real mount: path and fd forms,
purged ranges from mark_nonvolatile, the RFC-shaped fvrange(), pin(), unpin(), pins() and
pinned(), and refusal of files that are not on vrangefs.  The filesystem's own xattrs are
the reference.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Mount
from tests.integration.vrange_helpers import (
    PAGE,
    module_mount,
    new_dir,
    pattern,
    purge_all,
    purged,
    volatile,
)
from vrangefs import client


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from module_mount(tmp_path_factory)


@pytest.fixture
def f(mnt: Mount) -> Path:
    """An 8-page file on the mount."""
    path = new_dir(mnt) / "f"
    path.write_bytes(pattern(8))
    return path


def test_path_and_fd_forms_mark_the_same_inode(f: Path) -> None:
    client.mark_volatile(f, 4096, 8192)
    assert volatile(f) == [(PAGE, 2 * PAGE)]
    with f.open("rb") as fh:
        fd = fh.fileno()
        client.mark_volatile(fd, 5 * PAGE, 0)
        assert client.volatile_ranges(fd) == [(PAGE, 2 * PAGE), (5 * PAGE, 3 * PAGE)]
        assert client.mark_nonvolatile(fd, PAGE, 1) == []
        assert client.purged(fd) == []
    assert client.volatile_ranges(f) == [(2 * PAGE, PAGE), (5 * PAGE, 3 * PAGE)]
    assert client.volatile_ranges(str(f)) == volatile(f)
    client.mark_volatile(f)  # whole file by default
    assert volatile(f) == [(0, 8 * PAGE)]


def test_mark_nonvolatile_returns_the_purged_ranges_within_the_range(mnt: Mount, f: Path) -> None:
    client.mark_volatile(f, 0, 4 * PAGE)
    client.mark_volatile(f, 6 * PAGE, 0)
    purge_all(mnt.path)
    assert purged(f) == [(0, 4 * PAGE), (6 * PAGE, 2 * PAGE)]
    assert client.mark_nonvolatile(f, 2 * PAGE + 1, 10) == [(2 * PAGE, PAGE)]  # outward
    assert client.mark_nonvolatile(f, 4 * PAGE, 2 * PAGE) == []  # never volatile
    with f.open("rb") as fh:
        # Purged pages stay purged: the whole file reports them, not only what was volatile.
        assert client.mark_nonvolatile(fh.fileno()) == [(0, 4 * PAGE), (6 * PAGE, 2 * PAGE)]
    assert volatile(f) == []
    assert client.purged(f) == [(0, 4 * PAGE), (6 * PAGE, 2 * PAGE)]


def test_purged_ranges_are_clipped_to_the_file(mnt: Mount) -> None:
    f = new_dir(mnt) / "short"
    f.write_bytes(b"z" * 10000)
    client.mark_volatile(f)
    assert volatile(f) == [(0, 10000)]
    client.purge_all(mnt.path)
    assert client.mark_nonvolatile(f, 8192, 0) == [(8192, 10000 - 8192)]
    assert client.mark_nonvolatile(f, 0, 1) == [(0, PAGE)]
    assert client.purged(f) == [(0, 10000)]


def test_fvrange_returns_whether_anything_was_purged(mnt: Mount, f: Path) -> None:
    with f.open("r+b") as fh:
        fd = fh.fileno()
        assert client.fvrange(fd, 0, 4 * PAGE, client.VRANGE_VOLATILE) == 0
        assert volatile(f) == [(0, 4 * PAGE)]
        assert client.fvrange(fd, 0, 4 * PAGE, client.VRANGE_NONVOLATILE) == 0
        assert volatile(f) == []
        assert client.fvrange(fd, 0, 4 * PAGE, client.VRANGE_VOLATILE) == 0
        purge_all(mnt.path)
        assert client.fvrange(fd, 4 * PAGE, 0, client.VRANGE_NONVOLATILE) == 0  # not purged
        assert client.fvrange(fd, 3 * PAGE, PAGE, client.VRANGE_NONVOLATILE) == 1
        assert client.fvrange(fd, 0, 0, client.VRANGE_NONVOLATILE) == 1
        os.pwrite(fd, pattern(4), 0)  # rewritten: data again
        assert client.fvrange(fd, 0, 0, client.VRANGE_NONVOLATILE) == 0
        with pytest.raises(ValueError, match="mode"):
            client.fvrange(fd, 0, 0, 7)
        with pytest.raises(ValueError):
            client.fvrange(fd, -1, 0, client.VRANGE_VOLATILE)
    assert volatile(f) == []


def pinned_rows(target: Path | int) -> list[tuple[int, int, int, int]]:
    return [(p.offset, p.length, p.pid, p.count) for p in client.pins(target)]


def test_pinned_holds_a_real_counted_pin_and_changes_no_volatility(mnt: Mount, f: Path) -> None:
    me = os.getpid()
    client.mark_volatile(f)
    with client.pinned(f, 2 * PAGE, 2 * PAGE) as pin:
        assert pin.intact and pin.purged == []
        assert volatile(f) == [(0, 8 * PAGE)]  # not split, not changed
        assert pinned_rows(f) == [(2 * PAGE, 2 * PAGE, me, 1)]
        purge_all(mnt.path)  # the unit holding the pinned pages is skipped whole
        assert purged(f) == []
        with client.pinned(f, 2 * PAGE, 2 * PAGE) as inner:  # nested: counted
            assert inner.intact
            assert pinned_rows(f) == [(2 * PAGE, 2 * PAGE, me, 2)]
        assert pinned_rows(f) == [(2 * PAGE, 2 * PAGE, me, 1)]
    assert pinned_rows(f) == []
    purge_all(mnt.path)
    assert purged(f) == [(0, 8 * PAGE)]

    with f.open("r+b") as fh, client.pinned(fh.fileno()) as pin:
        assert not pin.intact
        assert pin.purged == [(0, 8 * PAGE)]
        fh.write(pattern(8))  # regenerate while pinned
        fh.flush()
        purge_all(mnt.path)
        assert client.purged(fh.fileno()) == []
    assert volatile(f) == [(0, 8 * PAGE)]
    assert pinned_rows(f) == []

    with pytest.raises(RuntimeError), client.pinned(f) as pin:  # unpinned on errors too
        assert pin.intact
        raise RuntimeError("the user's code failed")
    assert pinned_rows(f) == []

    with client.pinned(f) as pin:  # the file grows inside: the exit unpins what was pinned
        with f.open("ab") as grow:
            grow.write(pattern(1))
        assert pinned_rows(f) == [(0, 8 * PAGE, me, 1)]
    assert pinned_rows(f) == []

    empty = f.with_name("empty")
    empty.write_bytes(b"")
    with client.pinned(empty) as pin:  # no page to pin
        assert pin.intact and pinned_rows(empty) == []


def test_pin_unpin_and_pins(f: Path) -> None:
    me = os.getpid()
    with f.open("rb") as fh:
        client.pin(fh.fileno(), 1, 1)
        client.pin(f, 0, PAGE)
        client.pin(f, 3 * PAGE, 0)
        assert pinned_rows(f) == [(0, PAGE, me, 2), (3 * PAGE, 5 * PAGE, me, 1)]
        with pytest.raises(OSError) as err:
            client.unpin(f, 0, 2 * PAGE)
        assert err.value.errno == errno.ENOENT
        client.unpin(fh.fileno(), 0, 1)
        client.unpin(f, 4095, 1)
        client.unpin(f, 3 * PAGE, 5 * PAGE)
    assert pinned_rows(f) == []
    with pytest.raises(ValueError):
        client.pin(f, -1, 0)


def test_files_not_on_vrangefs_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * PAGE)
    fd = os.open(other, os.O_RDWR)
    try:
        calls: list[Callable[[], object]] = [
            lambda: client.mark_volatile(other),
            lambda: client.mark_volatile(fd),
            lambda: client.mark_nonvolatile(other),
            lambda: client.purged(fd),
            lambda: client.volatile_ranges(other),
            lambda: client.fvrange(fd, 0, 0, client.VRANGE_VOLATILE),
            lambda: client.fvrange(fd, 0, 0, client.VRANGE_NONVOLATILE),
            lambda: client.stats(tmp_path),
            lambda: client.purge_all(tmp_path),
            lambda: client.pin(other),
            lambda: client.unpin(fd),
            lambda: client.pins(other),
        ]
        for i, call in enumerate(calls):
            with pytest.raises(client.NotVrangefsError) as err:
                call()
            assert isinstance(err.value, OSError), i
            assert "vrangefs" in str(err.value), i
        with pytest.raises(client.NotVrangefsError), client.pinned(other):
            pytest.fail("pinned() entered its block for a file not on vrangefs")
    finally:
        os.close(fd)
    assert not [n for n in os.listxattr(other) if n.startswith("user.vrange.")]


def test_missing_file_raises_file_not_found(mnt: Mount) -> None:
    with pytest.raises(FileNotFoundError):
        client.mark_volatile(mnt.path / "no-such-file")
    stats = client.stats(mnt.path)
    assert stats["pid"] == mnt.pid
