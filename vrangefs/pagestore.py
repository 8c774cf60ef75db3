"""Page store: file data in 4096-byte pages with exact memory accounting.

Nothing here knows about FUSE, inodes or volatility.  The store owns one
anonymous private mapping (the *arena*) reserved for the memory cap with
``MAP_NORESERVE``: reserving address space costs nothing, a page of it only
becomes resident when written, and ``madvise(MADV_DONTNEED)`` on a freed slot
hands the memory straight back to the kernel.  This is why resident bytes are
exact (one slot = one page of data) and why freeing really lowers the daemon's
RSS, which a heap of ``bytes`` objects cannot promise: malloc keeps freed
chunks in its arenas.

The one exception is a small, bounded *pool* of freed slots that keep their
memory (``pool_bytes``, see :func:`pool_bytes_for`): on a VM, faulting fresh
memory in costs several times the copy of the data, and a file written after
another was deleted or purged would pay it again.  A pooled slot is zeroed when
handed out (a memset, far cheaper than a fault), counts in ``pool_pages`` (the
stats show it), never holds data, and lies inside the arena, so resident data
plus the pool never exceed the cap.  Memory pressure empties the pool first
(:meth:`PageStore.trim_pool`).

Returning memory is the kernel's slowest job here (``MADV_DONTNEED`` of 1 GiB:
about 0.15 s).  A store with an :attr:`PageStore.on_returning` hook does not do it
in the call that frees the pages: the slots wait, still faulted, on a *returning*
list that the daemon's reaper hands back a few thousand pages per step
(:meth:`PageStore.return_some`), so purging or evicting a gigabyte holds no request
for that long.  Like pool slots they never hold data, lie inside the arena (data
plus pool plus returning never pass the cap) and are the first reused, zeroed, by
the next write; ``returning_pages`` counts them.

Freeing a big file goes further (:meth:`FileData.free`): finding the slots in its page
table costs about 3 us per chunk that holds data, so a sparse file of 20,000 scattered
pages took 60-100 ms.  Its table is handed over whole instead, and waits *pending*
(:meth:`PageStore.defer`): its pages are free for the cap at once (``pending_pages``),
its chunks still count as metadata (``chunks``, ``pending_chunks``).  A write that
needs slots takes them out of pending tables first, only as many chunks as it needs
(:meth:`PageStore.alloc_many`); the reaper lets go of the rest a few chunks per step
(:meth:`PageStore.free_pending`), and so does the metadata budget when it needs room.

Each file has a :class:`FileData` page table: a dict of chunks, each an
``array('i')`` of CHUNK_PAGES entries holding a slot number, :data:`HOLE`
(never written, reads as zeros, costs nothing) or :data:`PURGED` (data was
discarded; reads fail unless the caller asks for zeros).  A chunk costs 1 KiB
per MiB of file, and missing chunks cost nothing, so sparse files stay cheap.

Slots handed out for consecutive pages of one write are consecutive whenever
the free list allows, so sequential I/O moves one contiguous slice per request
instead of one per page.
"""

from __future__ import annotations

import bisect
import mmap
import sys
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from vrangefs.protocol import PAGE_SIZE

PAGE_SHIFT = 12
CHUNK_SHIFT = 8
CHUNK_PAGES = 1 << CHUNK_SHIFT  # 256 pages = 1 MiB of file per chunk
CHUNK_MASK = CHUNK_PAGES - 1

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "FileData",
    "NoSpaceError",
    "PageStore",
    "PurgedPageError",
    "pages_spanned",
]

HOLE = -1
PURGED = -2

# Python < 3.13 lacks the constant; 0x4000 is its value on every Linux architecture
# that pyfuse3 supports.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
RETURN_PAGES_PER_STEP = 4096  # pages madvised away per step of the reaper (about 2 ms)
_POPULATE_MIN = 16  # below this many pages a system call costs more than the faults

_EMPTY_CHUNK = array("i", [HOLE]) * CHUNK_PAGES
_PURGED_CHUNK = array("i", [PURGED]) * CHUNK_PAGES
CHUNKS_PER_STEP = 64  # chunks freed per step of a sliced truncate (each ~5 us)
FREE_AT_ONCE = CHUNKS_PER_STEP  # a freed file with more chunks is left to the store (defer)
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZEROS = bytes(CHUNK_PAGES * PAGE_SIZE)  # calloc'ed: reading it touches no memory of ours

POOL_MAX = 32 << 20
"""The largest pool of freed, still-faulted slots a daemon keeps (bytes)."""
POOL_CAP_SHARE = 16
"""... and at most this fraction (1/16) of the memory cap."""


_LITTLE_ENDIAN = sys.byteorder == "little" and array("i").itemsize == 4
_HOLE_BYTES = array("i", [HOLE]).tobytes()
_SLOT_MARKS = bytes(b < 0x80 for b in range(256))  # top byte of an entry -> 1 for a slot
_SPARSE_SLOTS = 16  # up to this many slots in a chunk piece are picked out one by one


def _all_slots(entries: array[int]) -> bool:
    """Whether every entry is a slot (>= 0): the top byte of each has its high bit clear.
    In C (``in`` on an array makes an int object per entry: 5 us a chunk)."""
    if _LITTLE_ENDIAN:
        return entries.tobytes()[3::4].isascii()
    return min(entries, default=0) >= 0


def _may_hold_hole(entries: array[int]) -> bool:
    """False only if no entry is a hole (in C; True may be wrong, never False)."""
    if _LITTLE_ENDIAN:
        return _HOLE_BYTES in entries.tobytes()
    return HOLE in entries


def _slots_of(entries: array[int]) -> array[int]:
    """The slots (entries >= 0) of a piece of a chunk, without a Python loop over it
    (which made dropping thousands of chunks, or a big unit, take long): the piece
    itself when it holds no hole or purged page; the few slots of a sparse piece found
    with bytes.find in the entries' top bytes (a slot's has the high bit clear); else
    the tail once sorted."""
    if _all_slots(entries):
        return entries
    if _LITTLE_ENDIAN:
        tops = entries.tobytes()[3::4]
        if tops.count(0xFF) >= len(tops) - _SPARSE_SLOTS:
            marks = tops.translate(_SLOT_MARKS)
            found = array("i")
            i = marks.find(1)
            while i >= 0:
                found.append(entries[i])
                i = marks.find(1, i + 1)
            return found
    cut = sorted(entries)
    return array("i", cut[bisect.bisect_left(cut, 0) :])


def pool_bytes_for(cap_bytes: int) -> int:
    """The daemon's pool of freed, still-faulted pages: 32 MiB, or 1/16 of a smaller cap
    (within the 50 MiB a benchmark allows the daemon over its start after a delete)."""
    return min(POOL_MAX, cap_bytes // POOL_CAP_SHARE)


def _missing_in(chunk: array[int], lo: int, hi: int) -> int:
    """How many of chunk[lo:hi] hold no data (holes and purged pages), counted in C."""
    part = chunk[lo:hi]
    return part.count(HOLE) + part.count(PURGED)


def _consecutive(chunk: array[int], lo: int, hi: int, slot: int) -> bool:
    """Whether chunk[lo:hi] is slot, slot + 1, ...: compared in C, not page by page."""
    return chunk[hi - 1] == slot + (hi - 1 - lo) and chunk[lo:hi] == array(
        "i", range(slot, slot + hi - lo)
    )


def _merged(runs: Iterator[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """*runs* with neighbours joined where the slots go on across a chunk border."""
    out: list[tuple[int, int, int]] = []
    for page, count, slot in runs:
        if out:
            p_page, p_count, p_slot = out[-1]
            if (p_slot >= 0 and p_slot + p_count == slot) if slot >= 0 else p_slot == slot:
                out[-1] = (p_page, p_count + count, p_slot)
                continue
        out.append((page, count, slot))
    return out


class NoSpaceError(Exception):
    """Not enough free pages under the cap; nothing was changed."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} free pages, {free} available")
        self.needed = needed
        self.free = free


class PurgedPageError(Exception):
    """A read touched a page whose data was purged."""

    def __init__(self, page: int) -> None:
        super().__init__(f"page {page} was purged")
        self.page = page


def pages_spanned(size: int) -> int:
    """Number of pages needed to hold *size* bytes."""
    return (size + PAGE_SIZE - 1) >> PAGE_SHIFT


class PageStore:
    """The arena and its accounting: the one place that allocates page memory."""

    def __init__(self, cap_bytes: int, pool_bytes: int = 0) -> None:
        """*pool_bytes*: how much freed memory to keep faulted for reuse (default none)."""
        if cap_bytes < PAGE_SIZE:
            raise ValueError(f"memory cap {cap_bytes} is smaller than one page ({PAGE_SIZE})")
        self.capacity_pages = cap_bytes // PAGE_SIZE
        self.cap_bytes = self.capacity_pages * PAGE_SIZE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        self._mm = mmap.mmap(-1, self.cap_bytes, flags=flags)
        self.view = memoryview(self._mm)
        # Free slots, kept so that pop() yields ascending runs: freed runs are
        # pushed highest slot first.  Every slot in here has been madvised away
        # and reads as zeros.
        self._free: list[int] = []
        # The pool: free slots whose memory was kept (old bytes in them), in the same order.
        self._pool: list[int] = []
        # Freed slots beyond the pool, still faulted, waiting to be madvised away (only
        # with an on_returning hook; without one they are madvised at once).
        self._returning = array("i")  # in C: a 1 GiB purge makes no 262,144 int objects
        self.on_returning: Callable[[], None] | None = None
        # Page tables of freed files whose slots are still to be found (see defer()).
        self._pending: deque[dict[int, array[int]]] = deque()
        self.pending_pages = 0  # slots in them: free for the cap, still faulted
        self.pending_chunks = 0  # chunks in them (also counted in chunks)
        self.pool_max = max(pool_bytes, 0) // PAGE_SIZE
        self._bump = 0  # slots >= _bump have never been handed out
        self.used_pages = 0
        self.chunks = 0  # page-table chunks of all files (metadata, see vrangefs.budget)
        self._can_populate = True

    # -- accounting -------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return self.used_pages * PAGE_SIZE

    @property
    def free_pages(self) -> int:
        return self.capacity_pages - self.used_pages

    @property
    def pool_pages(self) -> int:
        """Free slots whose memory the daemon still holds (in its RSS, never data)."""
        return len(self._pool)

    @property
    def returning_pages(self) -> int:
        """Freed slots still faulted in, waiting for :meth:`return_some` (never data)."""
        return len(self._returning)

    # -- slots ------------------------------------------------------------
    def alloc_many(self, count: int) -> list[int]:
        """Hand out *count* zero-filled slots, ascending where possible.

        Raises NoSpaceError (changing nothing) if fewer than *count* are free.
        """
        if count > self.free_pages:
            raise NoSpaceError(count, self.free_pages)
        if self._pending:  # faulted already: before the free list
            short = count - len(self._pool) - len(self._returning)
            if short > 0:
                self._unpend(short, None)
        slots = self._take(self._pool, count)
        if len(slots) < count and self._returning:
            returning = self._returning
            taken = min(count - len(slots), len(returning))
            slots += returning[-taken:].tolist()
            del returning[-taken:]
            slots.sort()
        if slots:
            self._fill(slots, self._zero)
        if len(slots) < count:
            reused = self._take(self._free, count - len(slots))
            self._fill(reused, self._populate)
            slots += reused
        taken = len(slots)
        if taken < count:
            fresh = count - taken
            slots.extend(range(self._bump, self._bump + fresh))
            self._populate(self._bump, fresh)
            self._bump += fresh
        self.used_pages += count
        return slots

    @staticmethod
    def _take(free: list[int], count: int) -> list[int]:
        """Pop up to *count* slots off a free list, ascending."""
        taken = min(count, len(free))
        if not taken:
            return []
        slots = free[-taken:]
        del free[-taken:]
        slots.reverse()
        return slots

    @staticmethod
    def _fill(slots: list[int], fn: Callable[[int, int], None]) -> None:
        """Call fn(first, count) for each run of consecutive slots of ascending *slots*."""
        if not slots:
            return
        start = prev = slots[0]
        for slot in slots[1:]:
            if slot != prev + 1:
                fn(start, prev - start + 1)
                start = slot
            prev = slot
        fn(start, prev - start + 1)

    def _zero(self, slot: int, count: int) -> None:
        """Zero pooled slots (their memory is faulted: a memset, not a fault per page)."""
        view = self.view
        pos, end = slot << PAGE_SHIFT, (slot + count) << PAGE_SHIFT
        while pos < end:
            step = min(end - pos, len(_ZEROS))
            view[pos : pos + step] = _ZEROS[:step]
            pos += step

    def _populate(self, slot: int, count: int) -> None:
        """Fault never-used slots in with one system call instead of one fault per page.

        The write that follows would fault them one by one; MADV_POPULATE_WRITE
        (Linux 5.14) does the same work about a quarter faster.  Where the kernel
        lacks it, the faults simply happen on the copy.
        """
        if count < _POPULATE_MIN or not self._can_populate:
            return
        try:
            self._mm.madvise(MADV_POPULATE_WRITE, slot << PAGE_SHIFT, count << PAGE_SHIFT)
        except OSError:
            self._can_populate = False

    def release(self, slots: Sequence[int]) -> None:
        """Give slots back: up to the pool's room keep their memory, the rest returns to
        the kernel: at once, or with an :attr:`on_returning` hook by :meth:`return_some`."""
        if not slots:
            return
        self.used_pages -= len(slots)
        self._retire(slots)

    def _retire(self, slots: Sequence[int]) -> None:
        """Slots that hold no data any more: to the pool, then back to the kernel."""
        keep = max(min(len(slots), self.pool_max - len(self._pool)), 0)
        kept = sorted(slots[:keep])  # copies: callers count what they passed
        kept.reverse()
        self._pool.extend(kept)
        if len(slots) == keep:
            return
        if self.on_returning is None:
            self._discard(sorted(slots[keep:]))
            return
        waiting = len(self._returning)
        self._returning.extend(slots[keep:])  # as they come: sorted a step at a time
        if not waiting:
            self.on_returning()

    def defer(self, table: dict[int, array[int]], pages: int) -> None:
        """Free a file's page table, holding *pages* slots, without looking into it.

        The pages are free for the cap at once; their slots are found later, by
        :meth:`alloc_many` as it needs them or by :meth:`free_pending`.  The table's
        chunks stay counted in :attr:`chunks` until then.  The store owns *table* now.
        """
        self.used_pages -= pages
        if not table:
            return
        self._pending.append(table)
        self.pending_pages += pages
        self.pending_chunks += len(table)
        if self.on_returning is None:
            self._unpend(None, None)
        else:
            self.on_returning()

    def free_pending(self, chunks: int = CHUNKS_PER_STEP) -> int:
        """Let go of up to *chunks* chunks of pending tables (a step of the reaper, or
        room for metadata); returns how many (0 once none is pending)."""
        return self._unpend(None, chunks)

    def _unpend(self, pages: int | None, chunks: int | None) -> int:
        """Take chunks off the pending tables until *pages* slots are found or *chunks*
        chunks are gone (None: no such limit); the slots are retired (pool, returning).
        Returns the chunks let go."""
        pending = self._pending
        found = array("i")
        done = 0
        while pending and (pages is None or len(found) < pages) and done != chunks:
            table = pending[0]
            _, chunk = table.popitem()
            found += _slots_of(chunk)
            done += 1
            if not table:
                pending.popleft()
        self.pending_pages -= len(found)
        self.pending_chunks -= done
        self.chunks -= done
        if found:
            self._retire(found)
        return done

    def return_some(self, count: int = RETURN_PAGES_PER_STEP) -> int:
        """Hand up to *count* returning slots' memory back to the kernel; returns how
        many (0 once none waits)."""
        returning = self._returning
        first = max(len(returning) - max(count, 0), 0)  # not [-count:]: count may be 0
        slots = sorted(returning[first:])
        del returning[first:]
        self._discard(slots)
        return len(slots)

    def _discard(self, slots: list[int]) -> None:
        """madvise ascending *slots* away and put them on the free list."""
        if not slots:
            return
        self._fill(slots, self._dontneed)
        slots.reverse()
        self._free.extend(slots)

    def _dontneed(self, slot: int, count: int) -> None:
        self._mm.madvise(mmap.MADV_DONTNEED, slot << PAGE_SHIFT, count << PAGE_SHIFT)

    def trim_pool(self) -> int:
        """Return the pool's memory to the kernel (under memory pressure, after the
        returning slots: see :meth:`return_some`); pages freed."""
        pool = self._pool
        self._pool = []
        pool.sort()
        self._discard(pool)
        return len(pool)

    def check_invariants(self) -> None:
        assert 0 <= self.used_pages <= self.capacity_pages
        free, pool, returning = self._free, self._pool, self._returning
        pending = [s for table in self._pending for c in table.values() for s in c if s >= 0]
        spare = len(free) + len(pool) + len(returning) + len(pending)
        assert spare == len(set(free) | set(pool) | set(returning) | set(pending))
        assert len(self._pool) <= self.pool_max
        assert len(pending) == self.pending_pages, (len(pending), self.pending_pages)
        assert all(self._pending)  # emptied tables leave at once
        assert sum(len(table) for table in self._pending) == self.pending_chunks
        assert self.used_pages == self._bump - spare


class PageTally:
    """A running count of the resident pages of a group of files (those in cache directories).

    A file joins by setting ``FileData.tally``; from then on every page it gains or loses is
    counted here too, so the group's total never needs a walk over its files.
    """

    __slots__ = ("pages",)

    def __init__(self) -> None:
        self.pages = 0


class FileData:
    """One file's pages: a sparse page table over the shared :class:`PageStore`."""

    __slots__ = ("_chunks", "resident_pages", "size", "store", "tally")

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self._chunks: dict[int, array[int]] = {}
        self.size = 0
        self.resident_pages = 0
        self.tally: PageTally | None = None

    def _resident(self, delta: int) -> None:
        self.resident_pages += delta
        if self.tally is not None:
            self.tally.pages += delta

    def join(self, tally: PageTally | None) -> None:
        """Count this file's resident pages in *tally* (None: in none) from now on."""
        if self.tally is not None:
            self.tally.pages -= self.resident_pages
        self.tally = tally
        if tally is not None:
            tally.pages += self.resident_pages

    # -- queries ----------------------------------------------------------
    def _chunks_in(self, first: int, end: int) -> list[int]:
        """Indexes of the existing chunks holding pages [first, end), ascending.

        Walks whichever is smaller, the range or the chunks that exist, so a
        range over a huge sparse file costs what the file holds, not its size.
        """
        lo = first >> CHUNK_SHIFT
        hi = ((end - 1) >> CHUNK_SHIFT) + 1 if end > first else lo
        chunks = self._chunks
        if hi - lo <= len(chunks):
            return [ci for ci in range(lo, hi) if ci in chunks]
        return sorted(ci for ci in chunks if lo <= ci < hi)

    def slot_of(self, page: int) -> int:
        chunk = self._chunks.get(page >> CHUNK_SHIFT)
        return HOLE if chunk is None else chunk[page & CHUNK_MASK]

    def pages_needed(self, off: int, length: int) -> int:
        """How many new slots a write of *length* bytes at *off* would take."""
        if length <= 0:
            return 0
        first = off >> PAGE_SHIFT
        last = (off + length - 1) >> PAGE_SHIFT
        needed = 0
        for ci in range(first >> CHUNK_SHIFT, (last >> CHUNK_SHIFT) + 1):
            lo = max(first - (ci << CHUNK_SHIFT), 0)
            hi = min(last - (ci << CHUNK_SHIFT), CHUNK_MASK) + 1
            chunk = self._chunks.get(ci)
            needed += hi - lo if chunk is None else _missing_in(chunk, lo, hi)
        return needed

    def runs(self, first: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Yield (page, count, slot) runs covering pages [first, end).

        A run is a stretch of pages whose slots are consecutive (slot >= 0),
        or a stretch of holes (slot HOLE) or purged pages (slot PURGED).
        """
        page = first
        while page < end:
            ci = page >> CHUNK_SHIFT
            chunk = self._chunks.get(ci)
            chunk_end = min((ci + 1) << CHUNK_SHIFT, end)
            if chunk is None:
                yield page, chunk_end - page, HOLE
                page = chunk_end
                continue
            base = ci << CHUNK_SHIFT
            i = page - base
            stop = chunk_end - base
            while i < stop:
                slot = chunk[i]
                if slot >= 0 and _consecutive(chunk, i, stop, slot):
                    yield base + i, stop - i, slot  # the usual case: one run, compared in C
                    break
                j = i + 1
                if slot >= 0:
                    while j < stop and chunk[j] == slot + (j - i):
                        j += 1
                else:
                    while j < stop and chunk[j] == slot:
                        j += 1
                yield base + i, j - i, slot
                i = j
            page = chunk_end

    def purged_runs(self, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Purged pages in [first, end) as (first_page, page_count), ascending, lazily.

        Costs the chunks that exist there, so a caller that stops early pays for
        what it took.
        """
        if end is None:
            end = max(self._chunks, default=-1) + 1 << CHUNK_SHIFT
        run: tuple[int, int] | None = None
        for ci in self._chunks_in(first, end):
            chunk = self._chunks[ci]
            if PURGED not in chunk:
                continue
            base = ci << CHUNK_SHIFT
            for page, count, slot in self.runs(max(first, base), min(end, base + CHUNK_PAGES)):
                if slot != PURGED:
                    continue
                if run is not None and run[0] + run[1] == page:
                    run = (run[0], run[1] + count)
                    continue
                if run is not None:
                    yield run
                run = (page, count)
        if run is not None:
            yield run

    # -- data -------------------------------------------------------------
    def read(
        self, off: int, length: int, purged_as_zeros: bool = False
    ) -> memoryview | bytes | bytearray:
        """Return up to *length* bytes at *off*, clipped to the file size.

        Raises PurgedPageError if any page touched holds purged data (unless
        *purged_as_zeros*): the caller must fail the whole request, because a
        short reply would look like end-of-file to the kernel.
        """
        length = min(length, self.size - off)
        if length <= 0:
            return b""
        first = off >> PAGE_SHIFT
        end = ((off + length - 1) >> PAGE_SHIFT) + 1
        view = self.store.view
        pieces = _merged(self.runs(first, end))
        if not purged_as_zeros:
            for page, _count, slot in pieces:
                if slot == PURGED:
                    raise PurgedPageError(page)
        skip = off - (first << PAGE_SHIFT)
        if len(pieces) == 1 and pieces[0][2] >= 0:
            start = (pieces[0][2] << PAGE_SHIFT) + skip
            return view[start : start + length]
        out = bytearray(length)
        pos = -skip  # position in *out* of the current run's first byte
        for _page, count, slot in pieces:
            nbytes = count << PAGE_SHIFT
            if slot >= 0:
                lo = max(pos, 0)
                hi = min(pos + nbytes, length)
                src = (slot << PAGE_SHIFT) + (lo - pos)
                out[lo:hi] = view[src : src + hi - lo]
            pos += nbytes
        return out

    def write(self, off: int, data: bytes | memoryview, limit: int | None = None) -> int:
        """Store *data* at *off*, growing the file; all or nothing.

        Raises NoSpaceError, having changed nothing, when the write would take
        the store's used pages over *limit* (default: its capacity).  Writing
        a purged page makes it data again (its unwritten bytes read as zeros).
        """
        length = len(data)
        if length == 0:
            return 0
        store = self.store
        needed = self.pages_needed(off, length)
        room = (store.capacity_pages if limit is None else limit) - store.used_pages
        if needed > room:
            raise NoSpaceError(needed, max(room, 0))
        first = off >> PAGE_SHIFT
        last = (off + length - 1) >> PAGE_SHIFT
        chunks = self._chunks
        src = memoryview(data).cast("B")
        view = store.view
        pos = -(off & (PAGE_SIZE - 1))  # offset in *data* of the current page's first byte
        for ci in range(first >> CHUNK_SHIFT, (last >> CHUNK_SHIFT) + 1):
            base = ci << CHUNK_SHIFT
            lo = max(first - base, 0)
            hi = min(last - base, CHUNK_MASK) + 1
            chunk = chunks.get(ci)
            if chunk is None:
                chunk = chunks[ci] = array("i", _EMPTY_CHUNK)
                store.chunks += 1
                chunk[lo:hi] = array("i", store.alloc_many(hi - lo))
                self._resident(hi - lo)
            elif _missing_in(chunk, lo, hi):
                missing = [i for i in range(lo, hi) if chunk[i] < 0]
                # holes and purged pages get fresh, zero-filled slots
                for i, slot in zip(missing, store.alloc_many(len(missing)), strict=True):
                    chunk[i] = slot
                self._resident(len(missing))
            # Copy runs of consecutive slots with one slice assignment each.
            i = lo
            while i < hi:
                slot = chunk[i]
                if _consecutive(chunk, i, hi, slot):
                    j = hi  # the usual case: one run, found without a loop in Python
                else:
                    j = i + 1
                    while j < hi and chunk[j] == slot + (j - i):
                        j += 1
                run_lo = max(pos, 0)
                run_hi = min(pos + ((j - i) << PAGE_SHIFT), length)
                dst = (slot << PAGE_SHIFT) + (run_lo - pos)
                view[dst : dst + run_hi - run_lo] = src[run_lo:run_hi]
                pos += (j - i) << PAGE_SHIFT
                i = j
        self.size = max(self.size, off + length)
        return length

    def truncate(self, size: int) -> None:
        """Set the file size; pages wholly past it are freed, purged marks included."""
        for _ in self.truncating(size):
            pass

    def truncating(self, size: int) -> Iterator[None]:
        """:meth:`truncate` as a job: the new size holds from the first step (reads past
        it find the end of the file), the chunks past it are freed CHUNKS_PER_STEP per
        step (a sparse 1 TiB file can have 100,000 chunks: 0.3 s for 20,000 in one go).

        Writes past the new size must wait until the job is done, or the job could free
        what they wrote; for a FUSE truncate the kernel sees to that (it holds the
        inode's lock and holds back writeback until the truncate is answered).
        """
        if size < self.size:
            keep = pages_spanned(size)
            doomed = [ci for ci in self._chunks if (ci + 1) << CHUNK_SHIFT > keep]
            tail = size & (PAGE_SIZE - 1)
            if tail:  # the last page is kept: zero it past the end
                slot = self.slot_of(size >> PAGE_SHIFT)
                if slot >= 0:
                    start = (slot << PAGE_SHIFT) + tail
                    self.store.view[start : (slot + 1) << PAGE_SHIFT] = _ZERO_PAGE[tail:]
            self.size = size
            for first in range(0, len(doomed), CHUNKS_PER_STEP):
                self._drop_chunks(keep, doomed[first : first + CHUNKS_PER_STEP])
                yield
        self.size = size

    @property
    def chunk_count(self) -> int:
        """How many page-table chunks the file has (what freeing it costs)."""
        return len(self._chunks)

    def _drop_chunks(self, keep_pages: int, chunks: list[int]) -> None:
        """Free the pages >= *keep_pages* of these chunks (missing ones are skipped)."""
        freed = array("i")
        for ci in chunks:
            chunk = self._chunks.get(ci)
            if chunk is None:
                continue
            lo = max(keep_pages - (ci << CHUNK_SHIFT), 0)
            freed += _slots_of(chunk[lo:] if lo else chunk)
            if lo == 0:
                del self._chunks[ci]
                self.store.chunks -= 1
            else:
                chunk[lo:] = _EMPTY_CHUNK[lo:]
        self._resident(-len(freed))
        self.store.release(freed)

    def purge(self, first: int, end: int) -> int:
        """Discard the data of pages [first, end); holes stay holes.

        Returns the number of pages freed.
        """
        freed = array("i")
        for ci in self._chunks_in(first, end):
            chunk = self._chunks[ci]
            base = ci << CHUNK_SHIFT
            lo, hi = max(first - base, 0), min(end - base, CHUNK_PAGES)
            part = chunk[lo:hi]
            if not _may_hold_hole(part):
                # Every page is data or purged already: all become purged. In C, a few
                # microseconds a chunk: a 1 GiB unit costs 1,024 of these, not 262,144
                # turns of the loop below.
                freed += _slots_of(part)
                chunk[lo:hi] = _PURGED_CHUNK[: hi - lo]
                continue
            for i in range(lo, hi):
                slot = chunk[i]
                if slot >= 0:
                    freed.append(slot)
                    chunk[i] = PURGED
        self._resident(-len(freed))
        self.store.release(freed)
        return len(freed)

    def new_chunks(self, off: int, length: int) -> int:
        """How many page-table chunks a write of *length* bytes at *off* would add."""
        if length <= 0:
            return 0
        first = off >> (PAGE_SHIFT + CHUNK_SHIFT)
        last = (off + length - 1) >> (PAGE_SHIFT + CHUNK_SHIFT)
        chunks = self._chunks
        if last - first > len(chunks):
            return last - first + 1 - sum(1 for ci in chunks if first <= ci <= last)
        return sum(1 for ci in range(first, last + 1) if ci not in chunks)

    def any_purged(self, first: int, end: int) -> bool:
        """Whether a page in [first, end) is purged (cost: the chunks that exist there)."""
        for ci in self._chunks_in(first, end):
            base = ci << CHUNK_SHIFT
            lo, hi = max(first, base), min(end, base + CHUNK_PAGES)
            if any(slot == PURGED for _p, _count, slot in self.runs(lo, hi)):
                return True
        return False

    def resident_in(self, first: int, end: int) -> int:
        """Number of resident pages in [first, end) (cost: the chunks that exist there)."""
        total = 0
        for ci in self._chunks_in(first, end):
            base = ci << CHUNK_SHIFT
            lo, hi = max(first, base), min(end, base + CHUNK_PAGES)
            total += sum(count for _p, count, slot in self.runs(lo, hi) if slot >= 0)
        return total

    def free(self) -> None:
        """Release every page (the inode is gone): a small table at once, a big one
        handed to the store whole (:meth:`PageStore.defer`), so that freeing a file costs
        the same whatever it holds."""
        chunks = self._chunks
        if len(chunks) <= FREE_AT_ONCE:
            self._drop_chunks(0, list(chunks))
        else:
            pages = self.resident_pages
            self._chunks = {}
            self._resident(-pages)
            self.store.defer(chunks, pages)
        self.size = 0

    def check_invariants(self) -> None:
        resident = 0
        for chunk in self._chunks.values():
            resident += sum(1 for s in chunk if s >= 0)
        assert resident == self.resident_pages, (resident, self.resident_pages)
