"""Eviction at the memory cap, on a 16 MiB mount (4,096 pages).

Writes that would pass the cap purge volatile units, least recently marked first and whole
units at a time; non-volatile data is never touched; with nothing volatile left a write
fails with ENOSPC and nothing stored before is lost.  A reader that had a purged file in
the kernel's page cache gets EIO (a mapping SIGBUS), not the old bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter, errno_of
from tests.integration.vrange_helpers import (
    PAGE,
    child_signal,
    mark,
    pattern,
    purged,
    stats,
    unmark,
    volatile,
)

MIB = 1024 * 1024
CAP = 16 * MIB


def store(path: Path, size: int, seed: int) -> bytes:
    content = pattern(size // PAGE, seed=seed)
    path.write_bytes(content)
    return content


def check_cap(mount: Mount) -> dict[str, int]:
    s = stats(mount.path)
    assert s["resident_bytes"] <= s["memory_cap"] == CAP, s
    assert mount.used_bytes() == s["resident_bytes"]
    return s


def eio_or_bytes(fd: int, size: int, offset: int) -> int | bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as e:
        return e.errno or -1


def test_writes_past_the_cap_purge_oldest_units_then_fail_with_enospc(
    mounter: Mounter, tmp_path: Path
) -> None:
    m = mounter.mount("16M")
    root = m.path
    kept: dict[Path, bytes] = {}  # what must never be lost
    g = root / "g"  # marked first, then taken back: non-volatile, never purged
    kept[g] = store(g, MIB, seed=1)
    mark(g, "0,0")
    a, b = root / "a", root / "b"
    a_content = store(a, 4 * MIB, seed=2)
    b_content = store(b, 4 * MIB, seed=3)
    mark(a, "0,0")
    mark(b, "0,0")
    unmark(g, "0,0")
    c = root / "c"
    kept[c] = store(c, 3 * MIB, seed=4)
    assert check_cap(m)["resident_bytes"] == 12 * MIB

    # A reader that has all of a in the kernel's page cache and mapped.
    fd_a = os.open(a, os.O_RDONLY)
    map_a = mmap.mmap(fd_a, 4 * MIB, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        assert os.pread(fd_a, 4 * MIB, 0) == a_content
        assert map_a[:] == a_content

        # dd writes d in 1 MiB requests; its last page does not fit: a is purged, whole.
        d = root / "d"
        source = tmp_path / "d.src"
        kept[d] = store(source, 4 * MIB + PAGE, seed=5)
        subprocess.run(["dd", f"if={source}", f"of={d}", "bs=1M", "status=none"], check=True)
        written = time.monotonic()
        # The old bytes are gone for the reader too; the kernel's cache is invalidated
        # after the write's reply, so this may lag a little.
        wait_until(lambda: eio_or_bytes(fd_a, PAGE, 0) == errno.EIO, 10, "cached a reads EIO")
        lag = time.monotonic() - written
        assert purged(a) == [(0, 4 * MIB)]
        assert volatile(a) == [(0, 4 * MIB)]
        assert purged(b) == []
        s = check_cap(m)
        assert s["resident_bytes"] == 12 * MIB + PAGE
        assert (s["purged_bytes_total"], s["purge_events"]) == (4 * MIB, 1)

        for offset in (0, 2 * MIB, 4 * MIB - PAGE):
            assert eio_or_bytes(fd_a, PAGE, offset) == errno.EIO, offset
        assert child_signal(lambda: map_a[MIB]) == signal.SIGBUS
        print(f"cached reader of a saw EIO {lag * 1000:.1f} ms after the write returned")
    finally:
        map_a.close()
        os.close(fd_a)

    # The next overflow takes b (the only volatile unit left), whole.
    e = root / "e"
    kept[e] = store(e, 4 * MIB, seed=6)
    assert purged(b) == [(0, 4 * MIB)]
    s = check_cap(m)
    assert (s["purged_bytes_total"], s["purge_events"]) == (8 * MIB, 2)
    assert s["volatile_bytes"] == 0

    # Nothing volatile is left: a write past the cap fails with ENOSPC and changes nothing.
    # (Each write below is one request of at most 1 MiB, so the errno is the call's.)
    f = root / "f"
    free_pages = (CAP - s["resident_bytes"]) // PAGE
    kept[f] = store(f, (free_pages - 10) * PAGE, seed=7)
    fd = os.open(f, os.O_WRONLY)
    try:
        end = len(kept[f])
        assert errno_of(os.pwrite, fd, b"x" * 11 * PAGE, end) == errno.ENOSPC
        assert os.fstat(fd).st_size == end
        assert os.pwrite(fd, b"y" * 10 * PAGE, end) == 10 * PAGE  # exactly full
        kept[f] += b"y" * 10 * PAGE
        assert check_cap(m)["resident_bytes"] == CAP
        assert errno_of(os.pwrite, fd, b"z", end + 10 * PAGE) == errno.ENOSPC
        assert errno_of(os.pwrite, fd, b"z" * MIB, 0) == 0  # overwriting needs no room
        assert os.pwrite(fd, kept[f][:MIB], 0) == MIB
    finally:
        os.close(fd)
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={root / 'big'}", "bs=1M", "count=1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dd.returncode != 0 and "No space left on device" in dd.stderr
    assert (root / "big").stat().st_size == 0
    (root / "big").unlink()
    s = check_cap(m)
    assert (s["purged_bytes_total"], s["purge_events"]) == (8 * MIB, 2)
    for path, content in kept.items():
        assert path.read_bytes() == content, path
        assert purged(path) == [], path
    assert errno_of(b.read_bytes) == errno.EIO
    assert b.stat().st_size == len(b_content)

    # The cap is full; a write to a volatile file may purge that very file (no deadlock).
    mark(e, "0,0")
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={e}", "bs=4096", "count=1", "oflag=append", "conv=notrunc"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert purged(e) == [(0, 4 * MIB)]
    assert e.stat().st_size == 4 * MIB + PAGE
    with e.open("rb") as reader:
        assert os.pread(reader.fileno(), 2 * PAGE, 4 * MIB) == bytes(PAGE)
        assert errno_of(os.pread, reader.fileno(), PAGE, 0) == errno.EIO
    s = check_cap(m)
    assert (s["purged_bytes_total"], s["purge_events"]) == (12 * MIB, 3)


def test_purge_order_follows_the_latest_mark_and_split_pieces_keep_their_place(
    mounter: Mounter,
) -> None:
    m = mounter.mount("16M")
    root = m.path
    a, b, c = root / "a", root / "b", root / "c"
    a_content = store(a, 4 * MIB, seed=1)
    store(b, 4 * MIB, seed=2)
    mark(a, "0,0")
    mark(b, "0,0")
    mark(a, "1M,4K")  # inside a's unit: a is now the most recently marked
    assert volatile(a) == [(0, 4 * MIB)]
    c_content = store(c, 8 * MIB, seed=3)
    assert check_cap(m)["resident_bytes"] == CAP

    filler = root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"1" * PAGE) == PAGE  # needs one page: b goes, whole
        assert purged(b) == [(0, 4 * MIB)]
        assert purged(a) == []
        assert a.read_bytes() == a_content

        unmark(a, "2M,4K")  # split: both pieces keep a's place, older than anything new
        assert volatile(a) == [(0, 2 * MIB), (2 * MIB + PAGE, 2 * MIB - PAGE)]
        newer = root / "newer"
        store(newer, MIB, seed=4)
        mark(newer, "0,0")
        pieces = [(0, 2 * MIB), (2 * MIB + PAGE, 2 * MIB - PAGE)]
        # Fill the free space, then one page more: one piece of a goes, whole, and only it.
        free = CAP - check_cap(m)["resident_bytes"]
        assert os.write(fd, b"2" * (free + PAGE)) == free + PAGE
        gone = purged(a)
        assert gone in ([pieces[0]], [pieces[1]]), gone
        assert purged(newer) == []
        # The non-volatile page between the pieces is never purged.
        with a.open("rb") as reader:
            reader.seek(2 * MIB)
            assert reader.read(PAGE) == a_content[2 * MIB : 2 * MIB + PAGE]
        # The next overflow takes the other piece, still before the newer file.
        free = CAP - check_cap(m)["resident_bytes"]
        assert os.write(fd, b"3" * (free + PAGE)) == free + PAGE
        assert purged(a) == pieces
        assert purged(newer) == []
    finally:
        os.close(fd)
    s = check_cap(m)
    assert s["purge_events"] == 3
    assert c.read_bytes() == c_content


def test_cached_reader_never_sees_old_bytes_right_after_an_evicting_write(
    mounter: Mounter,
) -> None:
    m = mounter.mount("16M")
    # The race is lost in about a third of the trials here: stop at the first stale read;
    # all 25 would have to be won for this to pass by luck (odds about 2e-5).
    for trial in range(25):
        a, filler = m.path / f"a{trial}", m.path / "filler"
        content = store(a, 2 * MIB, seed=trial)
        mark(a, "0,0")
        with a.open("rb") as reader, filler.open("wb") as out:
            assert reader.read() == content  # cached
            out.write(b"f" * (CAP - check_cap(m)["resident_bytes"]))
            out.flush()
            out.write(b"g" * PAGE)
            out.flush()  # returns once the daemon has purged a
            first = eio_or_bytes(reader.fileno(), PAGE, 0)
        assert purged(a) == [(0, 2 * MIB)]  # it was purged, by that write
        assert first != content[:PAGE], f"trial {trial}: the purged bytes were read"
        filler.unlink()
        a.unlink()
