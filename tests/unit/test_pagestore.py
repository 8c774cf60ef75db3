"""PageStore and FileData: page bytes and exact memory accounting, without FUSE."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrangefs.pagestore import (
    CHUNK_PAGES,
    CHUNKS_PER_STEP,
    HOLE,
    PAGE_SIZE,
    PURGED,
    FileData,
    NoSpaceError,
    PageStore,
    PurgedPageError,
    pages_spanned,
    pool_bytes_for,
)

MiB = 1 << 20
CHUNK = CHUNK_PAGES * PAGE_SIZE  # bytes of file per page-table chunk (1 MiB)


@pytest.fixture
def store() -> Iterator[PageStore]:
    s = PageStore(64 * MiB)
    yield s
    s.check_invariants()


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def test_chunk_is_one_mib() -> None:
    assert MiB == CHUNK


def test_sparse_holes_cost_nothing(store: PageStore) -> None:
    f = FileData(store)
    f.truncate(1 << 30)
    assert f.size == 1 << 30
    assert f.resident_pages == 0
    assert store.used_pages == 0
    assert bytes(f.read(700 * MiB + 123, 10_000)) == bytes(10_000)
    f.write(512 * MiB + 5, b"x")
    assert f.resident_pages == 1
    assert store.resident_bytes == PAGE_SIZE
    assert f.size == 1 << 30
    f.check_invariants()


@pytest.mark.parametrize(
    ("off", "length", "pages"),
    [
        (0, 1, 1),
        (0, PAGE_SIZE, 1),
        (PAGE_SIZE - 1, 2, 2),
        (4095, 10, 2),
        (CHUNK - 3, 7, 2),
        (CHUNK - PAGE_SIZE - 1, 2 * PAGE_SIZE + 2, 4),
        (3 * CHUNK + 17, 2 * CHUNK, 2 * CHUNK_PAGES + 1),
    ],
)
def test_resident_accounting_is_exact(store: PageStore, off: int, length: int, pages: int) -> None:
    f = FileData(store)
    assert f.pages_needed(off, length) == pages
    f.write(off, pattern(length))
    assert f.resident_pages == pages
    assert store.used_pages == pages
    assert store.resident_bytes == pages * PAGE_SIZE
    assert f.pages_needed(off, length) == 0  # rewriting costs nothing
    f.write(off, pattern(length, seed=2))
    assert store.used_pages == pages
    f.check_invariants()


@pytest.mark.parametrize(
    ("off", "length"),
    [
        (1, 10),
        (PAGE_SIZE - 7, 14),
        (CHUNK - 5, 10),
        (CHUNK - 3 * PAGE_SIZE + 11, 5 * PAGE_SIZE + 3),
        (2 * CHUNK - 1, CHUNK + 2),
        (12345, 3 * CHUNK + 777),
    ],
)
def test_write_read_round_trip_across_boundaries(store: PageStore, off: int, length: int) -> None:
    f = FileData(store)
    data = pattern(length, seed=off)
    assert f.write(off, data) == length
    assert f.size == off + length
    assert bytes(f.read(off, length)) == data
    assert bytes(f.read(0, off)) == bytes(off)  # the hole before reads as zeros
    # Reads at odd offsets and lengths within the data, over page and chunk edges.
    for start, n in [(off + 1, length - 2), (off + length // 3, length // 2), (off, 1)]:
        assert bytes(f.read(start, n)) == data[start - off : start - off + n]
    # Reads past the end are clipped.
    assert bytes(f.read(off + length - 3, 100)) == data[-3:]
    assert bytes(f.read(off + length, 100)) == b""
    assert bytes(f.read(off + length + 5000, 100)) == b""


def test_overwrite_in_the_middle(store: PageStore) -> None:
    f = FileData(store)
    f.write(0, b"a" * (3 * CHUNK))
    f.write(CHUNK - 2, b"XYZW")
    assert bytes(f.read(CHUNK - 4, 8)) == b"aaXYZWaa"
    assert f.size == 3 * CHUNK


def test_truncate_shrink_zeroes_the_tail(store: PageStore) -> None:
    f = FileData(store)
    f.write(0, b"\xff" * (2 * CHUNK + 100))
    f.truncate(CHUNK + 10)
    assert f.size == CHUNK + 10
    assert f.resident_pages == CHUNK_PAGES + 1
    assert store.used_pages == CHUNK_PAGES + 1
    f.truncate(2 * CHUNK + 100)  # extend again: everything past CHUNK + 10 reads zeros
    assert bytes(f.read(CHUNK, 10)) == b"\xff" * 10
    assert bytes(f.read(CHUNK + 10, CHUNK + 90)) == bytes(CHUNK + 90)
    assert f.resident_pages == CHUNK_PAGES + 1  # extending adds holes, not pages
    f.check_invariants()


def test_truncate_to_zero_frees_everything(store: PageStore) -> None:
    f = FileData(store)
    f.write(100, pattern(5 * PAGE_SIZE))
    f.truncate(0)
    assert f.resident_pages == 0
    assert store.used_pages == 0
    f.truncate(PAGE_SIZE)
    assert bytes(f.read(0, PAGE_SIZE)) == bytes(PAGE_SIZE)


def test_purge_marks_pages_purged(store: PageStore) -> None:
    f = FileData(store)
    f.write(0, pattern(4 * PAGE_SIZE))
    f.truncate(8 * PAGE_SIZE)  # pages 4..7 are holes
    assert f.purge(1, 6) == 3  # pages 1, 2, 3 had data; 4, 5 are holes and stay holes
    assert [f.slot_of(p) for p in range(1, 6)] == [PURGED, PURGED, PURGED, HOLE, HOLE]
    assert f.slot_of(0) >= 0
    assert list(f.purged_runs()) == [(1, 3)]
    assert f.resident_pages == 1
    assert store.used_pages == 1
    f.check_invariants()


def test_read_of_purged_page_raises(store: PageStore) -> None:
    f = FileData(store)
    data = pattern(4 * PAGE_SIZE)
    f.write(0, data)
    f.purge(2, 3)
    with pytest.raises(PurgedPageError) as info:
        f.read(0, 4 * PAGE_SIZE)
    assert info.value.page == 2
    with pytest.raises(PurgedPageError):
        f.read(3 * PAGE_SIZE - 1, 1)
    # Intact pages keep working.
    assert bytes(f.read(0, 2 * PAGE_SIZE)) == data[: 2 * PAGE_SIZE]
    assert bytes(f.read(3 * PAGE_SIZE, PAGE_SIZE)) == data[3 * PAGE_SIZE :]


def test_purged_as_zeros(store: PageStore) -> None:
    f = FileData(store)
    data = pattern(4 * PAGE_SIZE)
    f.write(0, data)
    f.purge(1, 3)
    got = bytes(f.read(10, 4 * PAGE_SIZE, purged_as_zeros=True))
    expected = data[10:PAGE_SIZE] + bytes(2 * PAGE_SIZE) + data[3 * PAGE_SIZE :]
    assert got == expected


def test_partial_write_into_purged_page(store: PageStore) -> None:
    f = FileData(store)
    f.write(0, b"\x77" * (3 * PAGE_SIZE))
    f.purge(0, 3)
    assert store.used_pages == 0
    f.write(PAGE_SIZE + 100, b"new")
    assert f.slot_of(1) >= 0
    assert list(f.purged_runs()) == [(0, 1), (2, 1)]
    page = bytes(f.read(PAGE_SIZE, PAGE_SIZE))
    assert page == bytes(100) + b"new" + bytes(PAGE_SIZE - 103)
    assert f.resident_pages == 1
    # A whole-page write over a purged page works too.
    f.write(2 * PAGE_SIZE, b"\x01" * PAGE_SIZE)
    assert list(f.purged_runs()) == [(0, 1)]
    with pytest.raises(PurgedPageError):
        f.read(0, 1)
    f.check_invariants()


def test_truncate_drops_purged_marks(store: PageStore) -> None:
    f = FileData(store)
    f.write(0, pattern(4 * PAGE_SIZE))
    f.purge(2, 4)
    f.truncate(2 * PAGE_SIZE)
    assert list(f.purged_runs()) == []
    f.truncate(4 * PAGE_SIZE)
    assert bytes(f.read(2 * PAGE_SIZE, 2 * PAGE_SIZE)) == bytes(2 * PAGE_SIZE)


def test_no_space_changes_nothing() -> None:
    store = PageStore(8 * PAGE_SIZE)
    f = FileData(store)
    first = pattern(5 * PAGE_SIZE)
    f.write(0, first)
    g = FileData(store)
    with pytest.raises(NoSpaceError) as info:
        f.write(3 * PAGE_SIZE, pattern(6 * PAGE_SIZE, seed=9))  # needs 4 new, 3 free
    assert (info.value.needed, info.value.free) == (4, 3)
    with pytest.raises(NoSpaceError):
        g.write(0, pattern(4 * PAGE_SIZE))
    assert f.size == 5 * PAGE_SIZE
    assert bytes(f.read(0, f.size)) == first
    assert (f.resident_pages, g.resident_pages, store.used_pages) == (5, 0, 5)
    assert g.size == 0
    # What fits still fits, exactly to the cap.
    g.write(0, pattern(3 * PAGE_SIZE))
    assert store.free_pages == 0
    store.check_invariants()


def test_free_returns_every_slot(store: PageStore) -> None:
    files = [FileData(store) for _ in range(3)]
    for i, f in enumerate(files):
        f.write(i * CHUNK + 11, pattern(CHUNK + 3 * PAGE_SIZE, seed=i))
    files[1].purge(0, 10**6)
    assert store.used_pages > 0
    for f in files:
        f.free()
        assert f.resident_pages == 0
        assert f.size == 0
    assert store.used_pages == 0
    assert store.free_pages == store.capacity_pages
    # Freed slots are handed out again and read as zeros before being written.
    f = FileData(store)
    f.write(PAGE_SIZE - 1, b"z")
    assert bytes(f.read(0, 2 * PAGE_SIZE)) == bytes(PAGE_SIZE - 1) + b"z"


def test_cap_is_rounded_to_pages_and_must_hold_one() -> None:
    assert PageStore(3 * PAGE_SIZE + 5).capacity_pages == 3
    with pytest.raises(ValueError, match="smaller than one page"):
        PageStore(PAGE_SIZE - 1)


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_rss_drops_after_free() -> None:
    store = PageStore(512 * MiB)
    f = FileData(store)
    block = b"\x5a" * MiB
    before = _vm_rss()
    for i in range(256):
        f.write(i * MiB, block)
    during = _vm_rss()
    assert during - before >= 240 * MiB, (before, during)
    f.free()
    after = _vm_rss()
    assert after - before < 8 * MiB, (before, during, after)
    assert store.used_pages == 0


# -- FileData against a bytearray model -----------------------------------------------
@dataclass
class Model:
    """What a file should hold: bytes (purged pages as zeros), written and purged pages."""

    data: bytearray = field(default_factory=bytearray)
    resident: set[int] = field(default_factory=set)
    purged: set[int] = field(default_factory=set)

    def write(self, off: int, payload: bytes) -> None:
        if not payload:
            return  # an empty write does not extend the file
        if len(self.data) < off + len(payload):
            self.data.extend(bytes(off + len(payload) - len(self.data)))
        self.data[off : off + len(payload)] = payload
        pages = set(range(off // PAGE_SIZE, (off + len(payload) - 1) // PAGE_SIZE + 1))
        self.resident |= pages
        self.purged -= pages

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
            keep = pages_spanned(size)
            self.resident = {p for p in self.resident if p < keep}
            self.purged = {p for p in self.purged if p < keep}
        else:
            self.data.extend(bytes(size - len(self.data)))

    def purge(self, first: int, end: int) -> None:
        hit = {p for p in self.resident if first <= p < end}
        self.resident -= hit
        self.purged |= hit
        for p in hit:
            lo = p * PAGE_SIZE
            hi = min(lo + PAGE_SIZE, len(self.data))
            self.data[lo:hi] = bytes(max(hi - lo, 0))

    def touches_purged(self, off: int, length: int) -> bool:
        length = min(length, len(self.data) - off)
        if length <= 0:
            return False
        pages = range(off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1)
        return any(p in self.purged for p in pages)


# Offsets cluster around page and chunk boundaries, where the bugs live.
_edges = [k * PAGE_SIZE for k in (0, 1, 2, 255, 256, 257, 511, 512, 513)]
offsets = st.one_of(
    st.integers(0, 3 * CHUNK),
    st.builds(lambda e, d: max(e + d, 0), st.sampled_from(_edges), st.integers(-5, 5)),
)
lengths = st.one_of(st.integers(0, 3 * PAGE_SIZE), st.integers(0, CHUNK + 3 * PAGE_SIZE))
ops = st.one_of(
    st.tuples(st.just("write"), offsets, lengths),
    st.tuples(st.just("truncate"), offsets, st.just(0)),
    st.tuples(st.just("read"), offsets, lengths),
    st.tuples(st.just("purge"), st.integers(0, 3 * CHUNK_PAGES), st.integers(0, 600)),
    st.tuples(st.just("return"), st.integers(0, 600), st.just(0)),
)


@pytest.mark.parametrize(
    ("pool", "deferred"),
    [(0, False), (MiB, False), (0, True), (MiB, True)],
    ids=["no-pool", "pool", "returning", "pool-returning"],
)
@settings(max_examples=60, deadline=None)
@given(st.lists(ops, max_size=25))
def test_filedata_matches_bytearray_model(
    pool: int, deferred: bool, steps: list[tuple[str, int, int]]
) -> None:
    """With a pool, and with freed memory returned later: reused pooled or returning slots
    read as zeros wherever nothing was written."""
    store = PageStore(16 * MiB, pool_bytes=pool)
    if deferred:
        store.on_returning = lambda: None
    f = FileData(store)
    model = Model()
    for n, (op, a, b) in enumerate(steps):
        if op == "return":
            waiting = store.returning_pages
            assert store.return_some(a) == min(a, waiting)
        elif op == "write":
            payload = pattern(b, seed=n)
            f.write(a, payload)
            model.write(a, payload)
        elif op == "truncate":
            f.truncate(a)
            model.truncate(a)
        elif op == "purge":
            f.purge(a, a + b)
            model.purge(a, a + b)
        else:
            expected = bytes(model.data[a : a + b])
            if model.touches_purged(a, b):
                with pytest.raises(PurgedPageError):
                    f.read(a, b)
            else:
                assert bytes(f.read(a, b)) == expected
            assert bytes(f.read(a, b, purged_as_zeros=True)) == expected
        assert f.size == len(model.data)
        assert f.resident_pages == len(model.resident) == store.used_pages
        assert list(f.purged_runs()) == _runs(model.purged)
        f.check_invariants()
        store.check_invariants()
    assert bytes(f.read(0, f.size, purged_as_zeros=True)) == bytes(model.data)
    f.free()
    assert store.used_pages == 0


def _runs(pages: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def test_a_truncate_of_many_chunks_is_a_job_of_small_steps(store: PageStore) -> None:
    """The new size holds from the first step; the chunks past it go a few per step;
    the pages kept, the zeroed tail and the counts end as a one-step truncate leaves them."""
    f = FileData(store)
    chunks = 3 * CHUNKS_PER_STEP + 5
    kept = pattern(PAGE_SIZE + 10)
    f.write(0, kept)
    for ci in range(1, chunks + 1):  # one page in each chunk, a sparse file
        f.write(ci * CHUNK + PAGE_SIZE, b"\x77" * PAGE_SIZE)
    job = f.truncating(PAGE_SIZE + 5)
    next(job)
    assert f.size == PAGE_SIZE + 5
    left = [f.chunk_count]
    for _ in job:
        left.append(f.chunk_count)
    assert left[0] < chunks + 1 and len(left) == 4  # 64 chunks per step
    assert left[-1] == 1 and f.resident_pages == store.used_pages == 2
    assert bytes(f.read(0, PAGE_SIZE + 5)) == kept[: PAGE_SIZE + 5]
    f.truncate(2 * PAGE_SIZE)
    assert bytes(f.read(PAGE_SIZE + 5, PAGE_SIZE - 5)) == bytes(PAGE_SIZE - 5)  # zeroed tail
    f.check_invariants()


def test_a_file_freed_during_a_truncate_job_ends_it(store: PageStore) -> None:
    f = FileData(store)
    for ci in range(2 * CHUNKS_PER_STEP):
        f.write(ci * CHUNK, b"\x01" * PAGE_SIZE)
    job = f.truncating(0)
    next(job)
    f.free()
    assert list(job) == [None]  # its last step finds nothing left to free
    assert f.resident_pages == store.used_pages == 0


def test_sequential_read_across_a_chunk_border_is_one_view(store: PageStore) -> None:
    """Slots of a sequential write go on across chunks: a READ spanning the border is a
    view into the arena, not a copy."""
    f = FileData(store)
    data = pattern(3 * CHUNK)
    for off in range(0, len(data), CHUNK):
        f.write(off, data[off : off + CHUNK])
    got = f.read(CHUNK // 2, CHUNK)
    assert isinstance(got, memoryview)
    assert bytes(got) == data[CHUNK // 2 : CHUNK // 2 + CHUNK]


def test_purged_run_is_not_joined_with_the_slot_after_it(store: PageStore) -> None:
    """Pages 0-3 purged, page 4 in slot 2 (= PURGED + 4): two runs, not one."""
    f = FileData(store)
    f.write(0, pattern(4 * PAGE_SIZE))  # slots 0-3
    f.purge(0, 4)  # frees slots 0-3
    f.write(20 * PAGE_SIZE, bytes(2 * PAGE_SIZE))  # takes slots 0 and 1
    page4 = pattern(PAGE_SIZE, seed=7)
    f.write(4 * PAGE_SIZE, page4)  # slot 2
    assert f.slot_of(4) == PURGED + 4
    got = bytes(f.read(0, 5 * PAGE_SIZE, purged_as_zeros=True))
    assert got == bytes(4 * PAGE_SIZE) + page4
    with pytest.raises(PurgedPageError):
        f.read(0, 5 * PAGE_SIZE)
    assert f.pages_needed(0, 5 * PAGE_SIZE) == 4


# -- the pool of freed, still-faulted slots ----------------------------------------------
def test_pool_keeps_freed_memory_up_to_its_bound_and_zeroes_it() -> None:
    store = PageStore(64 * MiB, pool_bytes=MiB)
    f = FileData(store)
    f.write(0, b"\xee" * 4 * MiB)
    f.free()
    assert store.pool_pages == MiB // PAGE_SIZE  # the rest went back to the kernel
    h = FileData(store)
    h.write(0, b"\xdd" * MiB)
    assert h.purge(0, CHUNK_PAGES) == CHUNK_PAGES  # counted whether the pool takes them or not
    assert store.pool_pages == MiB // PAGE_SIZE
    assert store.used_pages == 0
    g = FileData(store)
    g.write(PAGE_SIZE + 10, b"x")  # a partial write into a pooled slot
    assert bytes(g.read(0, 2 * PAGE_SIZE)) == bytes(PAGE_SIZE + 10) + b"x"  # up to the size
    g.write(3 * PAGE_SIZE, b"y" * 4 * MiB)  # the pool's remaining slots, then free ones
    assert store.pool_pages == 0
    assert bytes(g.read(0, 3 * PAGE_SIZE)) == bytes(PAGE_SIZE + 10) + b"x" + bytes(
        2 * PAGE_SIZE - 11
    )
    assert store.used_pages + store.pool_pages <= store.capacity_pages
    store.check_invariants()


def test_pool_pages_are_free_pages_under_the_cap() -> None:
    store = PageStore(8 * MiB, pool_bytes=8 * MiB)
    f = FileData(store)
    f.write(0, pattern(8 * MiB))
    f.free()
    assert store.pool_pages == store.capacity_pages
    assert store.free_pages == store.capacity_pages  # pooled slots are free for any write
    g = FileData(store)
    data = pattern(8 * MiB, seed=3)
    g.write(0, data)
    assert bytes(g.read(0, 8 * MiB)) == data
    with pytest.raises(NoSpaceError):
        g.write(8 * MiB, b"z")
    store.check_invariants()


def test_trim_pool_returns_the_memory() -> None:
    store = PageStore(512 * MiB, pool_bytes=256 * MiB)
    f = FileData(store)
    before = _vm_rss()
    f.write(0, b"\x5a" * 256 * MiB)
    f.free()
    kept = _vm_rss()
    assert store.pool_pages == 256 * MiB // PAGE_SIZE
    assert kept - before >= 240 * MiB, (before, kept)  # honest: the pool is resident
    assert store.trim_pool() == 256 * MiB // PAGE_SIZE
    assert store.pool_pages == 0
    assert _vm_rss() - before < 8 * MiB
    store.check_invariants()


def test_freed_memory_can_wait_to_be_returned_and_is_reused_first() -> None:
    """With an on_returning hook, freed slots past the pool wait (still resident, free
    for the cap) until return_some() hands them back a step at a time; a write first
    reuses them, zeroed. The hook is called when the first ones start waiting."""
    store = PageStore(512 * MiB, pool_bytes=MiB)
    calls: list[int] = []
    store.on_returning = lambda: calls.append(store.returning_pages)
    f = FileData(store)
    before = _vm_rss()
    f.write(0, b"\x5a" * 256 * MiB)
    f.purge(0, 256 * MiB // PAGE_SIZE)  # a 256 MiB unit
    returning = (255 * MiB) // PAGE_SIZE  # all but the pool's 1 MiB
    assert (store.used_pages, store.pool_pages, store.returning_pages) == (0, 256, returning)
    assert calls == [returning]
    assert _vm_rss() - before >= 240 * MiB  # honest: still resident
    g = FileData(store)
    g.write(PAGE_SIZE + 1, b"y")  # a pool slot, zeroed
    g.write(2 * MiB + 5, b"z")  # another pool slot
    assert bytes(g.read(0, PAGE_SIZE + 2)) == bytes(PAGE_SIZE + 1) + b"y"
    assert bytes(g.read(2 * MiB, 6)) == bytes(5) + b"z"
    store.check_invariants()
    assert store.returning_pages == returning  # the two writes took pool slots
    steps = 0
    while store.return_some(4096):
        steps += 1
    assert steps == -(-returning // 4096)
    assert store.returning_pages == 0 and calls == [returning]
    assert _vm_rss() - before < 16 * MiB
    store.check_invariants()
    f.write(0, b"\x11" * 8 * MiB)  # allocations after it come from the free list
    assert bytes(f.read(0, 8 * MiB)) == b"\x11" * 8 * MiB
    store.check_invariants()


def test_a_purge_of_whole_chunks_keeps_holes_and_purged_pages_apart(store: PageStore) -> None:
    """The C path (no hole in the chunk's range) and the loop (holes) agree."""
    f = FileData(store)
    f.write(0, b"a" * 3 * CHUNK)  # three full chunks
    assert f.purge(10, 20) == 10  # some purged pages inside the next purge's range
    f.write(3 * CHUNK + 5 * PAGE_SIZE, b"b")  # a fourth chunk with holes
    freed = f.purge(0, 3 * CHUNK_PAGES + CHUNK_PAGES)
    assert freed == 3 * CHUNK_PAGES - 10 + 1
    assert list(f.purged_runs()) == [(0, 3 * CHUNK_PAGES), (3 * CHUNK_PAGES + 5, 1)]
    assert f.slot_of(3 * CHUNK_PAGES) == HOLE and f.slot_of(3 * CHUNK_PAGES + 5) == PURGED
    assert f.resident_pages == 0 == store.used_pages
    f.check_invariants()


def test_pool_bound() -> None:
    assert pool_bytes_for(64 * MiB) == 4 * MiB
    assert pool_bytes_for(64 << 30) == 32 * MiB


def _scattered(store: PageStore, chunks: int) -> FileData:
    """A file with one page of its own bytes in each of *chunks* chunks."""
    f = FileData(store)
    for ci in range(chunks):
        f.write(ci * CHUNK + (ci % CHUNK_PAGES) * PAGE_SIZE, bytes([ci % 251 + 1]) * PAGE_SIZE)
    return f


def test_a_big_freed_table_is_pending_and_a_write_looks_into_only_what_it_needs() -> None:
    """Freeing a file of many chunks hands its table to the store unopened: its pages are
    free for the cap at once, its chunks still count as metadata. A write takes slots out
    of one chunk per page it needs here (each holds one), zeroed; the reaper's steps let
    go of the rest CHUNKS_PER_STEP chunks at a time."""
    store = PageStore(64 * MiB)
    woken: list[int] = []
    store.on_returning = lambda: woken.append(store.pending_pages)
    chunks = 10 * CHUNKS_PER_STEP
    f = _scattered(store, chunks)
    assert (store.used_pages, store.chunks) == (chunks, chunks)
    f.free()
    assert (f.resident_pages, f.chunk_count, f.size) == (0, 0, 0)
    assert (store.used_pages, store.free_pages) == (0, store.capacity_pages)
    assert (store.pending_pages, store.pending_chunks, store.chunks) == (chunks, chunks, chunks)
    assert woken == [chunks]
    store.check_invariants()
    g = FileData(store)
    g.write(100, b"g" * (3 * PAGE_SIZE))  # 4 pages: 4 chunks looked into, no more
    assert store.pending_chunks == chunks - 4 and store.pending_pages == chunks - 4
    assert store.chunks == chunks - 4 + g.chunk_count
    g.truncate(4 * PAGE_SIZE)
    expected = bytes(100) + b"g" * (3 * PAGE_SIZE) + bytes(PAGE_SIZE - 100)
    assert bytes(g.read(0, 4 * PAGE_SIZE)) == expected
    store.check_invariants()
    steps = 0
    while store.free_pending():
        steps += 1
        store.check_invariants()
    assert steps == -(-(chunks - 4) // CHUNKS_PER_STEP)
    assert (store.pending_pages, store.pending_chunks, store.chunks) == (0, 0, g.chunk_count)
    while store.return_some():
        pass
    assert store.returning_pages == 0 and store.used_pages == g.resident_pages == 4
    store.check_invariants()


def test_a_freed_table_of_slotless_chunks_is_let_go_by_the_steps() -> None:
    """Chunks whose pages were all purged hold no slot: they still leave, a step at a time,
    and a write past them finds the slots of the later ones."""
    store = PageStore(64 * MiB)
    store.on_returning = lambda: None
    chunks = 3 * CHUNKS_PER_STEP
    f = _scattered(store, chunks)
    f.purge(CHUNK_PAGES, chunks * CHUNK_PAGES)  # every chunk but the first loses its page
    while store.return_some():  # the purged pages' slots: not where the write finds one
        pass
    f.free()
    assert (store.pending_pages, store.pending_chunks) == (1, chunks)
    g = FileData(store)
    g.write(0, b"x")
    g.truncate(PAGE_SIZE)
    assert store.pending_pages == 0 and bytes(g.read(0, PAGE_SIZE)) == b"x" + bytes(4095)
    store.check_invariants()
    while store.free_pending():
        store.check_invariants()
    assert store.pending_chunks == 0 and store.chunks == 1


def test_without_a_reaper_a_big_table_is_freed_at_once() -> None:
    store = PageStore(64 * MiB)
    f = _scattered(store, 2 * CHUNKS_PER_STEP)
    f.free()
    assert (store.used_pages, store.pending_pages, store.pending_chunks, store.chunks) == (0,) * 4
    store.check_invariants()


file_ops = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 1), offsets, lengths),
    st.tuples(
        st.just("purge"), st.integers(0, 1), st.integers(0, 3 * CHUNK_PAGES), st.integers(0, 600)
    ),
    st.tuples(st.just("free"), st.integers(0, 1), st.just(0), st.just(0)),
    st.tuples(st.just("read"), st.integers(0, 1), offsets, lengths),
    st.tuples(st.just("step"), st.just(0), st.integers(0, 3), st.integers(0, 600)),
)


@pytest.mark.parametrize("reaper", [False, True], ids=["at-once", "pending"])
@settings(max_examples=80, deadline=None)
@given(st.lists(file_ops, max_size=30))
def test_freed_tables_match_a_model(reaper: bool, steps: list[tuple[str, int, int, int]]) -> None:
    """Two files in a small store (every freed table is pending: FREE_AT_ONCE is 0),
    the reaper's steps between: data is exact, slots taken from freed tables read as
    zeros, and the accounting holds after every step."""
    store = PageStore(8 * MiB, pool_bytes=MiB // 2)
    if reaper:
        store.on_returning = lambda: None
    files = [FileData(store), FileData(store)]
    models = [Model(), Model()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vrangefs.pagestore.FREE_AT_ONCE", 0)
        for n, (op, i, a, b) in enumerate(steps):
            f, model = files[i], models[i]
            if op == "write":
                payload = pattern(b, seed=n)
                try:
                    f.write(a, payload)
                except NoSpaceError:
                    continue
                model.write(a, payload)
            elif op == "purge":
                f.purge(a, a + b)
                model.purge(a, a + b)
            elif op == "free":
                f.free()
                files[i], models[i] = FileData(store), Model()
            elif op == "read":
                expected = bytes(model.data[a : a + b])
                assert bytes(f.read(a, b, purged_as_zeros=True)) == expected
            else:
                store.free_pending(a)
                store.return_some(b)
            assert store.used_pages == sum(len(m.resident) for m in models)
            assert store.chunks == store.pending_chunks + sum(g.chunk_count for g in files)
            store.check_invariants()
