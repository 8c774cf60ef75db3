"""The metadata budget on the Volume: what it counts, that the count is near the real memory,
and its edges (exactly at the cap, one byte over, after freeing), with hypothesis.
"""

from __future__ import annotations

import errno
import gc
import stat
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrangefs import budget
from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import CHUNKS_PER_STEP, PAGE_SIZE, PageStore
from vrangefs.protocol import PurgeCause
from vrangefs.volume import Caller, Volume

ROOT = Caller(0, 0)
N = 5000


def new_volume(metadata_cap: int = 1 << 30, cap_pages: int = 1 << 16) -> Volume:
    return Volume(PageStore(cap_pages * PAGE_SIZE), max_inodes=10**7, metadata_cap=metadata_cap)


def regular(vol: Volume, name: bytes, parent: int = ROOT_INO) -> int:
    return vol.mknod(parent, name, stat.S_IFREG | 0o644, 0, ROOT).ino


def each(act: Callable[[int], None]) -> int:
    """Call act(i) for i below N; return N."""
    for i in range(N):
        act(i)
    return N


def measured(make: Callable[[], object]) -> tuple[int, object]:
    """Bytes Python allocated (and kept) while *make* ran, and what it returned."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "kind", ["files", "long names", "directories", "symlinks", "xattrs", "units", "pins", "chunks"]
)
def test_the_count_is_close_to_the_memory_really_used(kind: str) -> None:
    vol = new_volume()
    d = vol.mkdir(ROOT_INO, b"d", 0o755, ROOT).ino
    big = regular(vol, b"big")
    vol.write(big, 0, b"x" * (2 * N * PAGE_SIZE))
    targets = [regular(vol, b"t%06d" % i) for i in range(N)] if kind == "xattrs" else []
    makers: dict[str, Callable[[], object]] = {
        "files": lambda: [regular(vol, b"f%06d" % i, d) for i in range(N)],
        "long names": lambda: [regular(vol, b"%06d" % i * 40, d) for i in range(N)],
        "directories": lambda: [vol.mkdir(d, b"d%06d" % i, 0o755, ROOT) for i in range(N)],
        "symlinks": lambda: [vol.symlink(d, b"s%06d" % i, b"t" * 100, ROOT) for i in range(N)],
        "xattrs": lambda: each(lambda i: vol.setxattr(targets[i], b"user.key", b"v" * 100)),
        "units": lambda: each(lambda i: vol.mark_volatile(big, 2 * i * PAGE_SIZE, PAGE_SIZE)),
        "pins": lambda: each(lambda i: vol.pin(big, 2 * i * PAGE_SIZE, PAGE_SIZE, 4242, 0)),
        "chunks": lambda: [vol.write(big, (1 << 40) + i * (1 << 20), b"y") for i in range(N)],
    }
    counted_before = vol.budget.used
    real, kept = measured(makers[kind])
    counted = vol.budget.used - counted_before
    assert kept is not None
    # An estimate, but close: within -25% / +30% of what Python really keeps.
    assert 0.75 * real <= counted <= 1.3 * real, (kind, counted, real)
    vol.check_invariants()


def test_each_kind_of_state_is_refused_past_the_cap_and_nothing_changes() -> None:
    vol = new_volume(metadata_cap=1 << 20)
    f = regular(vol, b"f")
    vol.write(f, 0, b"z" * (64 * PAGE_SIZE))

    def fill(make: Callable[[int], object]) -> int:
        made = 0
        while True:
            try:
                make(made)
            except FsError as e:
                assert e.errno == errno.ENOSPC, e
                return made
            made += 1

    files = fill(lambda i: regular(vol, b"n%06d" % i))
    assert files > 100
    used = vol.budget.used
    assert used <= vol.budget.cap
    refused: list[Callable[[], object]] = [
        lambda: regular(vol, b"one-more"),
        lambda: vol.mkdir(ROOT_INO, b"dir", 0o755, ROOT),
        lambda: vol.symlink(ROOT_INO, b"sym", b"target", ROOT),
        lambda: vol.link(f, ROOT_INO, b"link"),
        lambda: vol.setxattr(f, b"user.x", b"v" * 2000),
        lambda: vol.mark_volatile(f, 0, PAGE_SIZE),
        lambda: vol.pin(f, 0, PAGE_SIZE, 1, 0),
        lambda: vol.write(f, 1 << 40, b"far away"),
    ]
    names_before = set(vol.inode(ROOT_INO).dir.entries)  # type: ignore[union-attr]
    for attempt in refused:
        with pytest.raises(FsError) as raised:
            attempt()
        assert raised.value.errno == errno.ENOSPC
        assert "metadata cap" in str(raised.value)
    assert vol.budget.used == used
    assert set(vol.inode(ROOT_INO).dir.entries) == names_before  # type: ignore[union-attr]
    assert vol.read(f, 0, 64 * PAGE_SIZE) == b"z" * (64 * PAGE_SIZE)
    # Shrinking always works, and what it frees can be used again.
    first = vol.lookup(ROOT_INO, b"n000000").ino
    vol.unlink(ROOT_INO, b"n000000")
    vol.forget(first, 2)  # the kernel's lookups (mknod's and ours): the inode is freed
    regular(vol, b"again")
    vol.check_invariants()


@settings(max_examples=60, deadline=None)
@given(
    name_length=st.integers(1, 255),
    slack=st.integers(-3, 3),
    kind=st.sampled_from(["file", "xattr", "unit", "pin", "link"]),
)
def test_exactly_at_the_cap_fits_and_one_byte_over_does_not(
    name_length: int, slack: int, kind: str
) -> None:
    vol = new_volume()
    f = regular(vol, b"f")
    vol.write(f, 0, b"a" * (4 * PAGE_SIZE))
    name = b"n" * name_length
    cases: dict[str, tuple[int, Callable[[], object]]] = {
        "file": (
            budget.INODE_BYTES + budget.FILE_BYTES + budget.name_bytes(name),
            lambda: regular(vol, name),
        ),
        "xattr": (
            budget.xattr_bytes(b"user." + name[:200], b"v" * name_length),
            lambda: vol.setxattr(f, b"user." + name[:200], b"v" * name_length),
        ),
        "unit": (budget.UNIT_BYTES, lambda: vol.mark_volatile(f, 0, PAGE_SIZE)),
        "pin": (budget.PIN_BYTES, lambda: vol.pin(f, 0, PAGE_SIZE, 7, 0)),
        "link": (budget.name_bytes(name), lambda: vol.link(f, ROOT_INO, name)),
    }
    cost, act = cases[kind]
    vol.budget.cap = vol.budget.used + cost + slack
    used = vol.budget.used
    if slack >= 0:
        act()
        assert vol.budget.used == used + cost
    else:
        with pytest.raises(FsError) as raised:
            act()
        assert raised.value.errno == errno.ENOSPC
        assert vol.budget.used == used
    vol.check_invariants()


@pytest.mark.parametrize("how", ["unlink", "evict"])
def test_the_table_of_a_freed_file_is_room_at_once(how: str) -> None:
    """A freed file's big page table waits for the reaper (PageStore.defer), its chunks
    still counted; metadata that needs their room gets it at once: the charge lets go of
    pending chunks, a few dozen at a time, before it would refuse or evict more."""
    vol = new_volume(metadata_cap=1 << 30)
    vol.store.on_returning = lambda: None  # a daemon's reaper, never run here
    d = vol.mkdir(ROOT_INO, b"cache", 0o755, ROOT).ino
    vol.set_cache_dir(d, how == "evict")
    f = vol.create(d, b"sparse", 0o644, ROOT).ino
    chunks = 300
    for ci in range(chunks):
        vol.write(f, ci << 20, b"s")
    vol.release(f)
    keep = regular(vol, b"keep")
    vol.budget.cap = vol.budget.used + 1000  # room for a 1 KB xattr value, not for 180 KB
    if how == "unlink":
        vol.unlink(d, b"sparse")
        vol.forget(f, 1)
    assert vol.store.pending_chunks == (chunks if how == "unlink" else 0)
    for name in (b"user.a", b"user.b", b"user.c"):
        vol.setxattr(keep, name, b"v" * 60_000)
        assert vol.find_xattr(keep, name) == b"v" * 60_000
    assert vol.budget.used <= vol.budget.cap
    assert vol.reclaim.statistics().evicted_files[PurgeCause.CAP] == (how == "evict")
    values = 3 * budget.xattr_bytes(b"user.a", b"v" * 60_000)
    let_go = chunks - vol.store.pending_chunks
    # It had to let go of about 150 chunks' room, and no more than a step more per charge:
    # the rest waits for the reaper.
    assert (
        values // budget.CHUNK_BYTES - 10
        <= let_go
        <= values // budget.CHUNK_BYTES + 3 * CHUNKS_PER_STEP
    )
    vol.check_invariants()
    for _ in vol.reaping():
        pass
    assert vol.store.pending_chunks == 0
    vol.check_invariants()
