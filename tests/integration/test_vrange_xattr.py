"""The ``user.vrange.*`` xattr interface on a real mount, exactly as the contract states it.

Rounding (inward for volatile, outward for non-volatile, the end-of-file page), clipping to
the size at call time, purge units (merging, adjacency, splitting, purged as wholes), the
sticky purged state, hidden names, statistics, bad input and permissions.  Marks and
queries go through os.setxattr/getxattr from the test process and through setfattr,
getfattr and cp from other processes.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mount, errno_of
from tests.integration.vrange_helpers import (
    NONVOLATILE,
    PAGE,
    PURGE,
    PURGED,
    STATS,
    STATS_KEYS,
    VOLATILE,
    Ranges,
    as_nobody,
    errno_or_value,
    mark,
    pattern,
    purge_all,
    purged,
    stats,
    unmark,
    volatile,
)

K = 1024


def setfattr(path: Path, name: str, value: str) -> None:
    subprocess.run(["setfattr", "-n", name, "-v", value, str(path)], check=True)


def getfattr_ranges(path: Path, name: str) -> Ranges:
    """The value of *name* as read by getfattr (another process), as pairs."""
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", name, str(path)],
        check=True,
        capture_output=True,
    ).stdout
    return [(int(a), int(b)) for a, b in (line.split(b",") for line in out.splitlines())]


def pread_errno(path: Path, offset: int, size: int) -> int | bytes:
    """The bytes read, or the errno of the failure."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


# -- rounding and clipping ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "value", "expected"),
    [
        (40960, "100,8192", [(4096, 4096)]),  # inward: only page 1 is wholly inside
        (40960, "0,8192", [(0, 8192)]),
        (40960, "4097,8190", []),  # touches pages 1 and 2, holds neither wholly
        (40960, "4096,4095", []),  # one byte short of a page
        (10, "0,0", [(0, 10)]),  # end-of-file page counts as whole
        (10, "0,10", [(0, 10)]),
        (10, "0,5", []),
        (10, "3,100", []),  # reaches EOF but starts inside page 0: not wholly inside
        (10000, "4096,0", [(4096, 10000 - 4096)]),
        (10000, "4096,999999", [(4096, 10000 - 4096)]),  # clipped to the size
        (10000, "0,9999", [(0, 8192)]),  # does not reach EOF: the last page is not whole
        (12288, "1M,4096", []),  # wholly past EOF: nothing
        (40960, "4K,8K", [(4096, 8192)]),  # suffixes
        (40960, "4k,8KiB", [(4096, 8192)]),
        (0, "0,0", []),  # an empty file has no page to mark
        (10000, "0,9223372036854775807", [(0, 10000)]),  # 2**63 - 1 in all: allowed
        (10000, "9223372036854775807,0", []),
    ],
)
def test_mark_volatile_rounds_inward_and_clips(
    work: Path, size: int, value: str, expected: Ranges
) -> None:
    f = work / "f"
    f.write_bytes(pattern(size // PAGE, tail=size % PAGE))
    setfattr(f, VOLATILE, value)
    assert getfattr_ranges(f, VOLATILE) == expected
    assert volatile(f) == expected
    assert purged(f) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4096,4096", [(0, 4096), (8192, 32768)]),  # exactly page 1
        ("4097,1", [(0, 4096), (8192, 32768)]),  # one byte of page 1: all of page 1
        ("4095,2", [(8192, 32768)]),  # touches pages 0 and 1
        ("36K,0", [(0, 36864)]),  # through EOF: the last page
        ("0,0", []),
        ("1M,4096", [(0, 40960)]),  # past EOF: nothing
    ],
)
def test_mark_nonvolatile_rounds_outward_and_splits(
    work: Path, value: str, expected: Ranges
) -> None:
    f = work / "f"
    f.write_bytes(pattern(10))
    mark(f, "0,0")
    assert volatile(f) == [(0, 40960)]
    setfattr(f, NONVOLATILE, value)
    assert getfattr_ranges(f, VOLATILE) == expected


def test_length_zero_reaches_the_size_at_call_time_not_later_growth(work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(3))
    mark(f, "0,0")
    with f.open("ab") as out:
        out.write(pattern(2, seed=1))
    assert volatile(f) == [(0, 3 * PAGE)]
    unmark(f, "0,0")  # reaches the new size
    assert volatile(f) == []


def test_the_eof_page_stops_being_whole_when_the_file_grows(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x" * 5000)
    mark(f, "0,0")
    assert volatile(f) == [(0, 5000)]
    with f.open("ab") as out:
        out.write(b"y" * 5000)
    # The unit still holds pages 0 and 1; listed ranges are clipped to the file.
    assert volatile(f) == [(0, 8192)]


# -- purge units -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("marks", "expected"),
    [
        (["0,8K", "4K,8K"], [(0, 12288)]),  # overlap: one unit
        (["0,4K", "4K,4K"], [(0, 4096), (4096, 4096)]),  # adjacent: two units
        (["0,4K", "8K,4K", "0,12K"], [(0, 12288)]),  # one mark bridging two units
        (["0,4K", "8K,4K", "4K,4K"], [(0, 4096), (4096, 4096), (8192, 4096)]),
        (["0,16K", "4K,4K"], [(0, 16384)]),  # inside a unit: no split
        (["8K,8K", "0,4K", "20K,4K"], [(0, 4096), (8192, 8192), (20480, 4096)]),
        (["0,8K", "100,4096"], [(0, 8192)]),  # a mark that rounds to nothing changes nothing
    ],
)
def test_marks_make_units_merged_only_on_overlap(
    work: Path, marks: list[str], expected: Ranges
) -> None:
    f = work / "f"
    f.write_bytes(pattern(10))
    for value in marks:
        mark(f, value)
    assert volatile(f) == expected


def test_partial_unmark_splits_a_unit(work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(10))
    mark(f, "0,0")
    unmark(f, "8K,8K")
    assert volatile(f) == [(0, 8192), (16384, 24576)]
    unmark(f, "0,1")
    assert volatile(f) == [(4096, 4096), (16384, 24576)]
    mark(f, "0,40K")  # overlaps both pieces: merged into one unit again
    assert volatile(f) == [(0, 40960)]


def test_purge_all_purges_whole_units_and_leaves_holes(shared: Mount, work: Path) -> None:
    f = work / "f"
    content = pattern(6)
    with f.open("wb") as out:  # pages 0, 2, 3, 5 written; 1 and 4 are holes
        for page in (0, 2, 3, 5):
            out.seek(page * PAGE)
            out.write(content[page * PAGE : (page + 1) * PAGE])
    other = work / "other"
    other.write_bytes(pattern(2, seed=7))
    mark(f, "0,0")
    assert shared.used_bytes() == 6 * PAGE
    purge_all(shared.path)
    assert purged(f) == [(0, 4096), (8192, 8192), (20480, 4096)]
    assert volatile(f) == [(0, 6 * PAGE)]  # purged stays listed until non-volatile
    for page in (0, 2, 3, 5):
        assert pread_errno(f, page * PAGE, PAGE) == errno.EIO, page
    for page in (1, 4):
        assert pread_errno(f, page * PAGE, PAGE) == bytes(PAGE), page
    assert os.stat(f).st_size == 6 * PAGE
    assert shared.used_bytes() == 2 * PAGE  # only the non-volatile file is left
    assert other.read_bytes() == pattern(2, seed=7)
    assert purged(other) == []


def test_purged_stays_until_nonvolatile_and_pages_stay_purged_until_written(
    shared: Mount, work: Path
) -> None:
    f = work / "f"
    content = pattern(4)
    f.write_bytes(content)
    mark(f, "0,0")
    events = stats(shared.path)["purge_events"]
    purge_all(shared.path)
    purge_all(shared.path)  # a purged unit is not purged twice
    assert stats(shared.path)["purge_events"] == events + 1
    unmark(f, "0,0")
    assert volatile(f) == []
    assert purged(f) == [(0, 4 * PAGE)]  # still purged: the data is still gone
    assert pread_errno(f, 0, PAGE) == errno.EIO

    # A partial write into a purged page works; its other bytes read as zeros.
    fd = os.open(f, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"hello", PAGE + 100) == 5
    finally:
        os.close(fd)
    page1 = pread_errno(f, PAGE, PAGE)
    assert page1 == bytes(100) + b"hello" + bytes(PAGE - 105)
    assert purged(f) == [(0, PAGE), (2 * PAGE, 2 * PAGE)]
    assert pread_errno(f, 0, PAGE) == errno.EIO
    assert pread_errno(f, 2 * PAGE, PAGE) == errno.EIO
    assert shared.used_bytes() == PAGE


def test_truncate_removes_purged_pages_and_units(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    mark(f, "0,0")
    purge_all(shared.path)
    os.truncate(f, 2 * PAGE)
    assert purged(f) == [(0, 2 * PAGE)]
    assert volatile(f) == [(0, 2 * PAGE)]
    os.truncate(f, 4 * PAGE)  # grown again: the new pages are holes, not purged
    assert purged(f) == [(0, 2 * PAGE)]
    assert volatile(f) == [(0, 2 * PAGE)]
    assert pread_errno(f, 2 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert pread_errno(f, 0, PAGE) == errno.EIO
    os.truncate(f, 0)
    assert purged(f) == []
    assert volatile(f) == []


def test_opening_with_o_trunc_drops_units_and_purged_pages(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    mark(f, "0,0")
    purge_all(shared.path)
    subprocess.run(["sh", "-c", 'echo fresh > "$1"', "sh", str(f)], check=True)
    assert volatile(f) == []
    assert purged(f) == []
    assert f.read_bytes() == b"fresh\n"


def test_an_unlinked_open_file_keeps_its_state_until_closed(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    base = stats(shared.path)["volatile_bytes"]
    mark(f, "0,0")
    fd = os.open(f, os.O_RDONLY)
    try:
        f.unlink()
        assert volatile(fd) == [(0, 4 * PAGE)]
        assert stats(shared.path)["volatile_bytes"] == base + 4 * PAGE
        purge_all(shared.path)
        assert purged(fd) == [(0, 4 * PAGE)]
        assert errno_of(os.pread, fd, PAGE, 0) == errno.EIO
    finally:
        os.close(fd)
    wait_until(lambda: shared.used_bytes() == 0, 10, "the unlinked file's memory is freed")
    assert stats(shared.path)["volatile_bytes"] == base


def test_writes_into_a_volatile_range_keep_it_volatile(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(3))
    mark(f, "0,0")
    with f.open("r+b") as out:
        out.seek(PAGE)
        out.write(b"new data")
    assert volatile(f) == [(0, 3 * PAGE)]
    assert stats(shared.path)["volatile_bytes"] == 3 * PAGE
    purge_all(shared.path)
    assert purged(f) == [(0, 3 * PAGE)]  # the written page went with its unit


def test_marking_a_purged_unit_again_makes_it_purgeable_again(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    mark(f, "0,8K")
    purge_all(shared.path)
    with f.open("r+b") as out:  # page 0 written again: data, still in the purged unit
        out.write(b"A" * PAGE)
    unmark(f, "0,8K")
    assert purged(f) == [(PAGE, PAGE)]
    mark(f, "4K,12K")  # overlaps the old unit's page 1 only: a new unit of pages 1-3
    assert volatile(f) == [(PAGE, 3 * PAGE)]
    mark(f, "0,8K")  # overlaps it: one unit of pages 0-3
    assert volatile(f) == [(0, 4 * PAGE)]
    events = stats(shared.path)["purge_events"]
    purge_all(shared.path)
    assert stats(shared.path)["purge_events"] == events + 1
    assert purged(f) == [(0, 4 * PAGE)]


def test_written_page_of_a_purged_unit_is_purgeable_again(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(3))
    mark(f, "0,0")
    purge_all(shared.path)
    with f.open("r+b") as out:
        out.write(b"A" * PAGE)
    assert purged(f) == [(PAGE, 2 * PAGE)]
    assert stats(shared.path)["volatile_bytes"] == PAGE
    purge_all(shared.path)
    assert purged(f) == [(0, 3 * PAGE)]
    assert shared.used_bytes() == 0


def test_state_belongs_to_the_inode_not_to_an_open_file(work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    fd = os.open(f, os.O_RDWR)
    try:
        mark(fd, "4K,8K")
    finally:
        os.close(fd)
    os.link(f, work / "g")
    # Another process, through another name, after the marking fd was closed.
    assert getfattr_ranges(work / "g", VOLATILE) == [(4096, 8192)]
    with (work / "g").open("rb") as again:
        assert volatile(again.fileno()) == [(4096, 8192)]
    assert volatile(f) == [(4096, 8192)]


def test_names_are_hidden_from_listxattr_getfattr_and_cp(work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(2))
    os.setxattr(f, "user.note", b"kept")
    mark(f, "0,0")
    assert os.listxattr(f) == ["user.note"]
    assert not [n for n in os.listxattr(work.parent) if n.startswith("user.vrange.")]
    dump = subprocess.run(
        ["getfattr", "-d", "-m", "-", str(f)], check=True, capture_output=True, text=True
    ).stdout
    assert "user.note" in dump
    assert "user.vrange" not in dump
    (work / "copy").mkdir()
    subprocess.run(["cp", "-a", str(f), str(work / "copy" / "f")], check=True)
    copy = work / "copy" / "f"
    assert os.getxattr(copy, "user.note") == b"kept"
    assert volatile(copy) == []
    assert volatile(f) == [(0, 2 * PAGE)]
    assert copy.read_bytes() == pattern(2)


def test_a_listing_too_long_for_an_xattr_is_refused_whole_never_cut(
    shared: Mount, work: Path
) -> None:
    """3,700 units a GiB apart list as about 70 KB, past the kernel's 64 KiB xattr limit:
    the listing must then fail with E2BIG (or, if the filesystem finds a way, come back
    complete), never cut short; marking goes on working."""
    f = work / "sparse"
    units, stride = 3700, 1 << 30
    f.touch()
    os.truncate(f, units * stride)  # holes: no memory
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(units):
            mark(fd, f"{i * stride},{PAGE}")
    finally:
        os.close(fd)
    expected = [(i * stride, PAGE) for i in range(units)]
    assert len(b"".join(b"%d,%d\n" % r for r in expected)) > 65536
    try:
        listing = volatile(f)
    except OSError as e:
        assert e.errno == errno.E2BIG, e
    else:
        assert listing == expected
    unmark(f, f"{PAGE},0")
    assert volatile(f) == [(0, PAGE)]
    assert stats(shared.path)["pid"] == shared.pid


# -- statistics ---------------------------------------------------------------------------
def test_stats_after_a_known_sequence(fresh: Mount) -> None:
    s = stats(fresh.path)
    assert set(STATS_KEYS) <= set(s)
    assert s["pid"] == fresh.pid
    assert s["memory_cap"] == 64 * 1024 * 1024
    assert {k: s[k] for k in STATS_KEYS[2:]} == dict.fromkeys(STATS_KEYS[2:], 0)

    x, y, z = fresh.path / "x", fresh.path / "y", fresh.path / "z"
    x.write_bytes(pattern(5))
    y.write_bytes(pattern(3))
    z.write_bytes(pattern(2))
    mark(x, "0,16K")  # pages 0-3 of 5
    mark(y, "0,0")
    s = stats(fresh.path)
    assert (s["resident_bytes"], s["volatile_bytes"]) == (10 * PAGE, 7 * PAGE)
    assert (s["purged_bytes_total"], s["purge_events"]) == (0, 0)

    purge_all(fresh.path)
    s = stats(fresh.path)
    assert (s["resident_bytes"], s["volatile_bytes"]) == (3 * PAGE, 0)
    assert (s["purged_bytes_total"], s["purge_events"]) == (7 * PAGE, 2)

    with y.open("r+b") as out:  # a page of y's purged unit holds data again
        out.write(b"B" * PAGE)
    s = stats(fresh.path)
    assert (s["resident_bytes"], s["volatile_bytes"]) == (4 * PAGE, PAGE)
    purge_all(fresh.path)
    s = stats(fresh.path)
    assert (s["resident_bytes"], s["volatile_bytes"]) == (3 * PAGE, 0)
    assert (s["purged_bytes_total"], s["purge_events"]) == (8 * PAGE, 3)
    assert fresh.used_bytes() == 3 * PAGE
    assert s["pid"] == fresh.pid


# -- bad input ------------------------------------------------------------------------------
def snapshot(mountpoint: Path, f: Path) -> tuple[Ranges, Ranges, dict[str, int], bytes]:
    """What a refused request must not change (stats that move by themselves left out)."""
    moving = ("oldest_purgeable_age_ms", "daemon_rss_bytes")
    counts = {k: v for k, v in stats(mountpoint).items() if k not in moving}
    return volatile(f), purged(f), counts, f.read_bytes()


BAD_RANGES = [
    (b"garbage", errno.EINVAL),
    (b"-1,4096", errno.EINVAL),
    (b"0,-4096", errno.EINVAL),
    (b"1,2,3", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"4096", errno.EINVAL),
    (b",", errno.EINVAL),
    (b"0x10,0", errno.EINVAL),
    (b" 0,4096", errno.EINVAL),
    (b"4KB,0", errno.EINVAL),
    (b"0,4096\0", errno.EINVAL),
    (b"9223372036854775808,0", errno.ERANGE),  # 2**63
    (b"0,9223372036854775808", errno.ERANGE),
    (b"9223372036854775807,1", errno.ERANGE),  # the sum passes 2**63 - 1
    (b"8388608T,0", errno.ERANGE),  # 2**63 with a suffix
    (b"99999999999999999999999999999999,0", errno.ERANGE),
]


@pytest.mark.parametrize("name", [VOLATILE, NONVOLATILE])
@pytest.mark.parametrize(("value", "expected"), BAD_RANGES, ids=[repr(v) for v, _ in BAD_RANGES])
def test_bad_range_values_are_refused_and_change_nothing(
    shared: Mount, work: Path, name: str, value: bytes, expected: int
) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    mark(f, "4K,8K")
    before = snapshot(shared.path, f)
    assert errno_of(os.setxattr, f, name, value) == expected
    assert snapshot(shared.path, f) == before


def test_errors_on_directories_non_root_files_and_unknown_names(shared: Mount, work: Path) -> None:
    f = work / "f"
    f.write_bytes(pattern(4))
    mark(f, "0,8K")
    root = shared.path
    before = snapshot(root, f)
    # the range names on a directory, the mount root included
    for d in (work, root):
        for name in (VOLATILE, PURGED):
            assert errno_of(os.getxattr, d, name) == errno.EISDIR, (d, name)
        for name in (VOLATILE, NONVOLATILE):
            assert errno_of(os.setxattr, d, name, b"0,0") == errno.EISDIR, (d, name)
    # stats and purge exist only on the mount root
    for target in (f, work):
        assert errno_of(os.getxattr, target, STATS) == errno.ENODATA, target
        assert errno_of(os.setxattr, target, PURGE, b"all") == errno.EINVAL, target
    # unknown names
    for target in (f, work, root):
        assert errno_of(os.getxattr, target, "user.vrange.foo") == errno.ENODATA, target
        assert errno_of(os.setxattr, target, "user.vrange.foo", b"0,0") == errno.EINVAL, target
    assert errno_of(os.getxattr, f, NONVOLATILE) == errno.ENODATA
    assert errno_of(os.setxattr, f, PURGED, b"0,0") == errno.EINVAL
    # purge takes "all" and nothing else
    for value in (b"none", b"", b"ALL", b"all all", b"1"):
        assert errno_of(os.setxattr, root, PURGE, value) == errno.EINVAL, value
    # the virtual names cannot be removed (the state survives)
    assert errno_of(os.removexattr, f, VOLATILE) != 0
    assert snapshot(root, f) == before
    assert stats(root)["pid"] == shared.pid  # still serving
    mark(f, "0,0")
    assert volatile(f) == [(0, 4 * PAGE)]


# -- permissions ---------------------------------------------------------------------------
def test_nobody_cannot_mark_or_read_what_it_may_not(shared: Mount, work: Path) -> None:
    public = work / "public"  # root's, 0644
    private = work / "private"  # root's, 0600
    for f in (public, private):
        f.write_bytes(pattern(2))
        mark(f, "0,4K")
    public.chmod(0o644)
    private.chmod(0o600)
    assert stat.S_IMODE(shared.path.stat().st_mode) & stat.S_ISVTX  # sticky root, root's
    before = [snapshot(shared.path, f) for f in (public, private)]

    def attempts() -> object:
        results: dict[str, object] = {}
        for what, fn in {
            "mark": lambda: os.setxattr(public, VOLATILE, b"0,0"),
            "unmark": lambda: os.setxattr(public, NONVOLATILE, b"0,0"),
            "private_purged": lambda: os.getxattr(private, PURGED).decode(),
            "private_volatile": lambda: os.getxattr(private, VOLATILE).decode(),
            "public_volatile": lambda: os.getxattr(public, VOLATILE).decode(),
            "public_purged": lambda: os.getxattr(public, PURGED).decode(),
            "purge": lambda: os.setxattr(shared.path, PURGE, b"all"),
            "stats": lambda: os.getxattr(shared.path, STATS).decode().count("\n") > 0,
        }.items():
            results[what] = errno_or_value(fn)
        return results

    got = as_nobody(attempts)
    assert isinstance(got, dict)
    denied = ({"errno": errno.EACCES}, {"errno": errno.EPERM})
    assert got["mark"] in denied
    assert got["unmark"] in denied
    assert got["private_purged"] in denied
    assert got["private_volatile"] in denied
    assert got["public_volatile"] == "0,4096\n"
    assert got["public_purged"] == ""
    assert got["purge"] in denied  # the sticky root belongs to root
    assert got["stats"] is True
    assert [snapshot(shared.path, f) for f in (public, private)] == before


def test_nobody_marks_its_own_writable_file_but_not_a_read_only_one(work: Path) -> None:
    mine, read_only = work / "mine", work / "read-only"
    for f, mode in ((mine, 0o644), (read_only, 0o444)):
        f.write_bytes(pattern(2))
        os.chown(f, 65534, 65534)
        f.chmod(mode)

    def attempts() -> object:
        return {
            "mine": errno_or_value(lambda: os.setxattr(mine, VOLATILE, b"0,0")),
            "mine_after": os.getxattr(mine, VOLATILE).decode(),
            "read_only": errno_or_value(lambda: os.setxattr(read_only, VOLATILE, b"0,0")),
        }

    got = as_nobody(attempts)
    assert got == {
        "mine": None,
        "mine_after": "0,8192\n",
        "read_only": {"errno": errno.EACCES},
    }
    assert volatile(mine) == [(0, 2 * PAGE)]
    assert volatile(read_only) == []


def test_purged_listing_too_long_fails_fast_with_e2big(shared: Mount, work: Path) -> None:
    """5,000 purged runs list as about 80 KB: E2BIG, answered without walking them all
    (the daemon stops at 64 KiB); the purged pages stay purged and markable."""
    f = work / "runs"
    runs = 5000
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for i in range(runs):  # one data page, one hole: every purged page is its own run
            os.pwrite(fd, b"r" * PAGE, 2 * i * PAGE)
            mark(fd, f"{2 * i * PAGE},{PAGE}")
        purge_all(shared.path)
        started = time.monotonic()
        assert errno_of(os.getxattr, fd, PURGED) == errno.E2BIG
        assert time.monotonic() - started < 2.0
        unmark(fd, f"{2 * PAGE},0")  # the first run alone is listed again
        assert errno_of(os.getxattr, fd, PURGED) == errno.E2BIG  # purged until written
        os.ftruncate(fd, 2 * PAGE)
        assert purged(fd) == [(0, PAGE)]
    finally:
        os.close(fd)


# -- XATTR_CREATE / XATTR_REPLACE ---------------------------------------------------------
def test_create_and_replace_flags_on_the_action_names(shared: Mount, work: Path) -> None:
    """What the flags do on the virtual names (docs/xattrs.md): the FUSE binding emulates
    them by reading the name first, so readable names "exist" and set-only names do not.
    A refused call changes nothing."""
    f = work / "flags"
    f.write_bytes(pattern(4))
    # volatile is readable: it always exists. CREATE is refused, REPLACE marks.
    assert errno_of(os.setxattr, f, VOLATILE, b"0,0", os.XATTR_CREATE) == errno.EEXIST
    assert volatile(f) == []
    os.setxattr(f, VOLATILE, b"0,0", os.XATTR_REPLACE)
    assert volatile(f) == [(0, 4 * PAGE)]
    # nonvolatile and purge can only be set: they never exist. REPLACE is refused,
    # CREATE acts.
    assert errno_of(os.setxattr, f, NONVOLATILE, b"0,0", os.XATTR_REPLACE) == errno.ENODATA
    assert volatile(f) == [(0, 4 * PAGE)]
    assert errno_of(os.setxattr, shared.path, PURGE, b"all", os.XATTR_REPLACE) == errno.ENODATA
    assert purged(f) == []
    os.setxattr(shared.path, PURGE, b"all", os.XATTR_CREATE)
    assert purged(f) == [(0, 4 * PAGE)]
    os.setxattr(f, NONVOLATILE, b"0,0", os.XATTR_CREATE)
    assert volatile(f) == []
    # Ordinary user.* attributes keep the usual meaning of the flags.
    os.setxattr(f, "user.plain", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, f, "user.plain", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.other", b"2", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(f, "user.plain", b"3", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.plain") == b"3"
