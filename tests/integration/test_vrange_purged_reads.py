"""Reading purged pages: EIO (SIGBUS through mmap) by default, zeros with purged_reads=zeros.

Each test stores an 8-page file whose pages 3 and 4 form one volatile unit, purges it, and
reads through read(), pread(), other processes' tools and mmap (in forked children, which
may die of SIGBUS).  A read request touching a purged page must fail as a whole, never come
back short (the kernel would take a short reply for end-of-file), while intact pages keep
reading right, also through a file descriptor or a mapping made before the purge.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import Mount, errno_of
from tests.integration.vrange_helpers import (
    PAGE,
    child_signal,
    in_child,
    mark,
    module_mount,
    new_dir,
    pattern,
    purge_all,
    purged,
)

PAGES = 8
LOST = (3, 5)  # pages [3, 5) are purged
SIZE = PAGES * PAGE


def store(mount: Mount) -> tuple[Path, bytes]:
    """An 8-page file whose pages 3 and 4 are purged; returns it and its original content."""
    f = new_file(mount)
    content = pattern(PAGES)
    f.write_bytes(content)
    mark(f, f"{LOST[0] * PAGE},{(LOST[1] - LOST[0]) * PAGE}")
    purge_all(mount.path)
    assert purged(f) == [(LOST[0] * PAGE, (LOST[1] - LOST[0]) * PAGE)]
    return f, content


def expected_zeros(content: bytes) -> bytes:
    lo, hi = LOST[0] * PAGE, LOST[1] * PAGE
    return content[:lo] + bytes(hi - lo) + content[hi:]


@contextmanager
def opened(path: Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def mmap_read(path: Path, offset: int, length: int, flags: int = mmap.MAP_SHARED) -> bytes:
    """Read through a fresh mapping of the whole file (may raise SIGBUS)."""
    with opened(path) as fd, mmap.mmap(fd, SIZE, flags=flags, prot=mmap.PROT_READ) as mm:
        return mm[offset : offset + length]


@pytest.fixture(scope="module")
def eio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A default mount (purged pages read as EIO) shared by this module's tests."""
    yield from module_mount(tmp_path_factory)


@pytest.fixture(scope="module", params=["--purged-reads", "-o"])
def zeros(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mount]:
    """A purged_reads=zeros mount, made with either spelling of the option."""
    if request.param == "-o":
        yield from module_mount(tmp_path_factory, options=["purged_reads=zeros"])
    else:
        yield from module_mount(tmp_path_factory, args=["--purged-reads", "zeros"])


def new_file(mount: Mount) -> Path:
    """A path for a new file, in a directory of its own (the mounts are shared)."""
    return new_dir(mount) / "f"


# -- default: EIO ------------------------------------------------------------------------------
def test_a_read_request_touching_a_purged_page_fails_whole(eio: Mount) -> None:
    """With O_DIRECT each pread is one READ request to the daemon, of the size asked."""
    f, content = store(eio)
    with opened(f, os.O_RDONLY | os.O_DIRECT) as fd:
        for offset, length in [
            (2 * PAGE, 3 * PAGE),  # pages 2-4: intact, purged, purged
            (2 * PAGE + 100, 2 * PAGE),  # pages 2-3
            (4 * PAGE + 4000, 2 * PAGE),  # pages 4-6
            (3 * PAGE + 5, 1),  # one byte
            (0, SIZE),  # everything
        ]:
            assert errno_of(os.pread, fd, length, offset) == errno.EIO, (offset, length)
        assert os.pread(fd, 3 * PAGE, 0) == content[: 3 * PAGE]  # never short
        assert os.pread(fd, 3 * PAGE, 5 * PAGE) == content[5 * PAGE :]
        assert os.pread(fd, 2 * SIZE, 5 * PAGE) == content[5 * PAGE :]
        assert os.pread(fd, 10, SIZE - 10) == content[-10:]


def test_buffered_reads_give_intact_bytes_then_eio_never_eof(eio: Mount) -> None:
    """Through the page cache a read(2) that starts on intact pages returns them and stops
    at the first purged page (as for any I/O error mid-read); the next read fails with EIO.
    Neither comes back empty, and the file keeps its size: nothing looks like end-of-file.
    """
    f, content = store(eio)
    with opened(f) as fd:
        # Intact pages first, while nothing is cached: readahead reaches the purged pages
        # and fails, and that must not break these reads.
        assert os.pread(fd, PAGE, 2 * PAGE) == content[2 * PAGE : 3 * PAGE]
        assert os.pread(fd, 3 * PAGE, 0) == content[: 3 * PAGE]
        assert os.pread(fd, 3 * PAGE, 2 * PAGE) == content[2 * PAGE : 3 * PAGE]
        assert os.pread(fd, SIZE, 0) == content[: 3 * PAGE]
        for offset, length in [(3 * PAGE, 3 * PAGE), (3 * PAGE + 5, 1), (4 * PAGE + 4000, PAGE)]:
            assert errno_of(os.pread, fd, length, offset) == errno.EIO, (offset, length)
        assert os.pread(fd, 3 * PAGE, 5 * PAGE) == content[5 * PAGE :]
        assert os.pread(fd, 10, SIZE - 10) == content[-10:]
        os.lseek(fd, 0, os.SEEK_SET)
        got = b""
        with pytest.raises(OSError) as err:
            while chunk := os.read(fd, 5000):
                got += chunk
        assert err.value.errno == errno.EIO
        assert got == content[: 3 * PAGE]
        assert os.fstat(fd).st_size == SIZE
    assert errno_of(f.read_bytes) == errno.EIO
    # Other processes: cat fails with EIO, dd of intact pages works.
    cat = subprocess.run(["cat", str(f)], capture_output=True, check=False)
    assert cat.returncode != 0
    assert b"Input/output error" in cat.stderr
    dd = subprocess.run(
        ["dd", f"if={f}", "bs=4096", "skip=5", "status=none"], capture_output=True, check=True
    )
    assert dd.stdout == content[5 * PAGE :]
    assert os.stat(f).st_size == SIZE
    assert purged(f) == [(3 * PAGE, 2 * PAGE)]


def test_mmap_of_a_purged_page_raises_sigbus(eio: Mount) -> None:
    f, content = store(eio)
    assert child_signal(lambda: mmap_read(f, 3 * PAGE, 1)) == signal.SIGBUS
    assert child_signal(lambda: mmap_read(f, 4 * PAGE + 10, 1, mmap.MAP_PRIVATE)) == signal.SIGBUS

    def intact_pages() -> bool:
        return (
            mmap_read(f, 0, 3 * PAGE) == content[: 3 * PAGE]
            and mmap_read(f, 5 * PAGE, 3 * PAGE) == content[5 * PAGE :]
        )

    assert in_child(intact_pages) is True


def test_file_read_and_mapped_before_the_purge_fails_after_it(eio: Mount) -> None:
    f = new_file(eio)
    content = pattern(PAGES)
    f.write_bytes(content)
    mark(f, f"{3 * PAGE},{2 * PAGE}")
    with (
        opened(f) as fd,
        opened(f) as map_fd,
        mmap.mmap(map_fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm,
    ):
        assert os.pread(fd, SIZE, 0) == content  # now in the kernel's page cache
        assert mm[:] == content  # and mapped
        purge_all(eio.path)  # returns once the kernel's cache is invalidated

        assert errno_of(os.pread, fd, PAGE, 3 * PAGE) == errno.EIO  # not the old bytes
        assert errno_of(os.pread, fd, 10, 4 * PAGE + 100) == errno.EIO
        assert os.pread(fd, PAGE, 0) == content[:PAGE]
        assert os.pread(fd, 3 * PAGE, 5 * PAGE) == content[5 * PAGE :]
        # The mapping made before the purge: children inherit it.
        assert child_signal(lambda: mm[3 * PAGE]) == signal.SIGBUS
        assert child_signal(lambda: mm[5 * PAGE - 1]) == signal.SIGBUS
        assert in_child(lambda: mm[: 3 * PAGE] == content[: 3 * PAGE]) is True
        assert in_child(lambda: mm[5 * PAGE :] == content[5 * PAGE :]) is True
    assert errno_of(f.read_bytes) == errno.EIO


def test_rewritten_purged_page_reads_again_everywhere(eio: Mount) -> None:
    f, _ = store(eio)
    with opened(f, os.O_RDWR) as fd:
        assert errno_of(os.pread, fd, PAGE, 3 * PAGE) == errno.EIO
        assert os.pwrite(fd, b"new", 3 * PAGE + 1) == 3
        page3 = b"\0new" + bytes(PAGE - 4)
        assert os.pread(fd, PAGE, 3 * PAGE) == page3
        assert errno_of(os.pread, fd, PAGE, 4 * PAGE) == errno.EIO
    assert in_child(lambda: mmap_read(f, 3 * PAGE, PAGE) == page3) is True
    assert child_signal(lambda: mmap_read(f, 4 * PAGE, 1)) == signal.SIGBUS
    assert purged(f) == [(4 * PAGE, PAGE)]


# -- purged_reads=zeros ----------------------------------------------------------------------
def test_zeros_mode_reads_purged_pages_as_zeros_through_every_path(zeros: Mount) -> None:
    f, content = store(zeros)
    want = expected_zeros(content)
    with opened(f) as fd:
        assert os.pread(fd, SIZE, 0) == want  # full length: never short
        assert os.pread(fd, 3 * PAGE, 2 * PAGE) == want[2 * PAGE : 5 * PAGE]
        assert os.pread(fd, 1, 3 * PAGE + 5) == b"\0"
        assert os.read(fd, SIZE + PAGE) == want
    with opened(f, os.O_RDONLY | os.O_DIRECT) as fd:
        assert os.pread(fd, SIZE, 0) == want  # one READ request: full length
        assert os.pread(fd, 2 * PAGE, 3 * PAGE) == bytes(2 * PAGE)
    assert f.read_bytes() == want
    cat = subprocess.run(["cat", str(f)], capture_output=True, check=True)
    assert cat.stdout == want
    assert in_child(lambda: mmap_read(f, 0, SIZE) == want) is True
    assert in_child(lambda: mmap_read(f, 0, SIZE, mmap.MAP_PRIVATE) == want) is True
    assert purged(f) == [(3 * PAGE, 2 * PAGE)]  # still listed as purged
    assert os.stat(f).st_size == SIZE


def test_zeros_mode_cached_reader_sees_zeros_not_old_bytes(zeros: Mount) -> None:
    f = new_file(zeros)
    content = pattern(PAGES)
    f.write_bytes(content)
    mark(f, f"{3 * PAGE},{2 * PAGE}")
    want = expected_zeros(content)
    with (
        opened(f) as fd,
        opened(f) as map_fd,
        mmap.mmap(map_fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm,
    ):
        assert os.pread(fd, SIZE, 0) == content
        assert mm[:] == content
        purge_all(zeros.path)
        assert os.pread(fd, SIZE, 0) == want
        assert in_child(lambda: mm[:] == want) is True
        assert mm[:] == want


# -- stores through a mapping ------------------------------------------------------------------
def store_through_mapping(path: Path, offset: int, data: bytes) -> bool:
    """Store *data* through a shared mapping and write it back (may raise SIGBUS)."""
    with opened(path, os.O_RDWR) as fd, mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED) as mm:
        mm[offset : offset + len(data)] = data
        mm.flush()
    return True


def test_zeros_mode_store_through_a_mapping_into_a_purged_page_works(zeros: Mount) -> None:
    f, content = store(zeros)
    assert in_child(lambda: store_through_mapping(f, 3 * PAGE + 1, b"new")) is True
    assert purged(f) == [(4 * PAGE, PAGE)]
    with opened(f) as fd:
        assert os.pread(fd, PAGE, 3 * PAGE) == b"\0new" + bytes(PAGE - 4)
        assert os.pread(fd, 3 * PAGE, 0) == content[: 3 * PAGE]


@pytest.mark.xfail(
    reason="contract: 'Writes into purged pages, partial ones included, always work'; a "
    "store through a mapping makes the kernel read the page first, the read fails with "
    "EIO, and the storing process dies of SIGBUS",
    strict=True,
)
def test_store_through_a_mapping_into_a_purged_page_works(eio: Mount) -> None:
    f, _ = store(eio)
    assert child_signal(lambda: store_through_mapping(f, 3 * PAGE + 1, b"new")) is None
    assert purged(f) == [(4 * PAGE, PAGE)]
