"""Volatile ranges: each inode's ``VrangeRoot`` and the mount-wide ``PurgeOrder``.

Pure bookkeeping in page numbers: no FUSE, no page data. This is the only module that imports
intervaltree.

A *purge unit* is a run of pages [start, end) of one inode that is purged as a whole. Units
of one inode never overlap (two may be adjacent). The ``PurgeOrder`` lists the units that can
free memory, least recently marked first: units that are not purged and (the reclaim module
sees to that) hold resident pages. Reclaim purges from its head.

Pay only for what is used: a mark is one small object and a few pointers. A root keeps its
units in one sorted index by start page, which answers every query the daemon makes; its
interval tree (``VrangeRoot.tree``, an ``intervaltree.IntervalTree`` of
``Interval(start, end, unit)``) is built from that index when something asks for it and
dropped at the next change, because keeping a tree node set per unit up to date cost about
two thirds of a unit's memory and most of a mark's time, for queries nobody made.

Concurrency: everything here is synchronous and the daemon never awaits between reading a root
and changing it, so marking, unmarking, truncating and purging are each atomic and need no
lock. The contract's ``vrange_root`` is this interval tree *plus a lock* that orders purges
against readers: until the kernel has dropped its cached copy of purged pages, a reader that
asks what was purged must wait. Waiting is an event-loop matter, so that lock lives in the
daemon's adapter, in :class:`vrangefs.invalidation.Invalidator`, keyed by inode number; the
core only reports each purge to it, in the same atomic step. A unit's fields are changed only
by this module (and ``purged`` by reclaim when a write refills a purged unit).
"""

from __future__ import annotations

import itertools
import operator
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

from intervaltree import Interval, IntervalTree

_COMPACT_MIN = 64
_ORDER_LOAD = 512  # the purge order splits a chunk past 2 * _ORDER_LOAD entries
_OWNERS_MAX = 16  # roots a purge-order chunk names before it counts as mixed
_LOAD = 512  # a root's index splits a chunk past 2 * _LOAD units, merges one of _LOAD // 2
_start_of = operator.attrgetter("start")


class PurgeUnit:
    """A run of pages [start, end) of inode ``ino``, purged as a whole.

    ``seq`` is the mark order (larger = more recently marked; pieces of a split unit share
    it). ``purged`` is True once the unit's pages were discarded and until a page of it is
    written again (then the unit is requeued) or it is marked volatile again (merged).
    Whether each page reads as purged is the page store's business, not this flag's.
    ``pinned`` is reclaim's: True while a pin holds a page of the unit, which keeps it out of
    the purge order (parked, with its seq, until the last pin goes). Pieces of a split unit
    inherit both flags; reclaim then looks again at whether the pieces are still pinned.
    ``root`` is the root that holds it (None for a unit in no root: a piece cut out, a
    cache file): a root that is dropped takes its units out of the purge order at once.
    """

    __slots__ = ("_entry", "end", "ino", "pinned", "purged", "root", "seq", "start")

    def __init__(
        self,
        ino: int,
        start: int,
        end: int,
        seq: int,
        purged: bool = False,
        pinned: bool = False,
    ) -> None:
        self.ino = ino
        self.start = start
        self.end = end
        self.seq = seq
        self.purged = purged
        self.pinned = pinned
        self.root: VrangeRoot | None = None
        self._entry: Entry | None = None  # its live PurgeOrder entry

    def __len__(self) -> int:
        """The number of pages."""
        return self.end - self.start

    def __repr__(self) -> str:
        state = (" purged" if self.purged else "") + (" pinned" if self.pinned else "")
        return f"<PurgeUnit ino={self.ino} pages=[{self.start},{self.end}) seq={self.seq}{state}>"


Entry = tuple[int, int, PurgeUnit]
"""A PurgeOrder entry: (seq, start, unit).

No two distinct units share (seq, start) (seqs are unique per mark and the pieces of a split
unit are disjoint), and tuples compare equal items by identity first, so units themselves are
never compared."""


class CacheFile(PurgeUnit):
    """A whole file of a cache directory in the purge order: purging it evicts the file.

    Its ``seq`` is the time of its last open, so files and range units share one order,
    least recently used first.  ``opens`` and ``kept`` mirror the inode (open handles;
    marked non-volatile as a whole); reclaim queues it only while neither holds it, no pin
    holds it and it has pages to free.
    """

    __slots__ = ("kept", "opens")

    def __init__(self, ino: int, seq: int, opens: int, kept: bool) -> None:
        super().__init__(ino, 0, 0, seq)
        self.opens = opens
        self.kept = kept

    def __repr__(self) -> str:
        held = (
            f" opens={self.opens}"
            + (" kept" if self.kept else "")
            + (" pinned" if self.pinned else "")
        )
        return f"<CacheFile ino={self.ino} seq={self.seq}{held}>"


class PurgeOrder:
    """The mount-wide order of the units that are not purged, least recently marked first.

    Sorted by (seq, start): pieces of a split unit keep the original ``seq`` and so keep
    their place, in page order among themselves. A sorted list of entries in chunks of up
    to 2 * _ORDER_LOAD, with lazy deletion: ``add`` appends to the last chunk (marks come
    in time order) or bisects, ``discard`` is O(1), and so is dropping a whole root
    (:meth:`VrangeRoot.drop`): its entries go stale together.

    Stale entries cost little wherever they are. Each chunk names the roots its entries
    came from (up to _OWNERS_MAX; more make it *mixed*): a chunk whose named roots are all
    dropped is all stale and goes whole, so the million entries of a deleted file cost
    the next purge a thousand chunks, not a million entries (76 ms).  Other stale
    entries at the front are skipped by :meth:`oldest` in a tight loop and deleted in C
    (about 0.1 us each, a tenth of a heap pop). Elsewhere, once they outnumber the live
    ones, a compaction filters one chunk per later call, so no call rebuilds the whole (a
    heap's rebuild of a million entries held the daemon 105 ms).
    """

    def __init__(self) -> None:
        self._chunks: list[list[Entry]] = []
        self._firsts: list[Entry] = []  # each chunk's first entry, for bisecting
        # Per chunk, the roots its entries came from (a superset), or None: mixed.
        self._owners: list[set[VrangeRoot | None] | None] = []
        # Chunks of stale entries taken out whole, for the caller to let go of a few at a
        # time (bury()): freeing a million entries takes milliseconds. on_garbage is told
        # when the first one waits.
        self._graveyard: list[list[Entry]] = []
        self.on_garbage: Callable[[], None] | None = None
        self._entries = 0  # stale ones included
        self._live = 0
        self._compacting = -1  # the next chunk a compaction filters, or -1
        self._last_seq = 0

    def next_seq(self) -> int:
        """A new sequence number, larger than all before: the monotonic clock in ns.

        Being a time, the oldest entry's seq also tells its age (:meth:`oldest_age`).
        """
        seq = time.monotonic_ns()  # every mark asks: no max() call
        if seq <= self._last_seq:
            seq = self._last_seq + 1
        self._last_seq = seq
        return seq

    def oldest_age(self) -> float:
        """Seconds since the oldest entry was marked or last opened (0.0 if none)."""
        unit = self.oldest()
        return 0.0 if unit is None else max(time.monotonic_ns() - unit.seq, 0) / 1e9

    def __len__(self) -> int:
        return self._live

    def __contains__(self, unit: PurgeUnit) -> bool:
        return unit._entry is not None

    def __iter__(self) -> Iterator[PurgeUnit]:
        """The units, oldest first (a copy: for tests and debugging)."""
        return iter([entry[2] for entry in self._live_entries()])

    def add(self, unit: PurgeUnit) -> None:
        """Add a unit that is not purged and not in the order, at (unit.seq, unit.start)."""
        if unit._entry is not None:
            raise ValueError(f"{unit!r} is already in the purge order")
        if unit.purged or unit.pinned:
            raise ValueError(f"{unit!r} is purged or pinned: it cannot be purged")
        entry = (unit.seq, unit.start, unit)
        unit._entry = entry
        self._live += 1
        self._entries += 1
        chunks = self._chunks
        root = unit.root
        if chunks and entry > chunks[-1][-1]:  # the newest: the common case
            i = len(chunks) - 1
            chunks[i].append(entry)
        elif not chunks:
            chunks.append([entry])
            self._firsts.append(entry)
            self._owners.append({root})
            return
        else:
            firsts = self._firsts
            i = max(bisect_right(firsts, entry) - 1, 0)
            chunk = chunks[i]
            j = bisect_right(chunk, entry)
            chunk.insert(j, entry)
            if j == 0:
                firsts[i] = entry
        owners = self._owners[i]
        if owners is not None and root not in owners:
            if len(owners) < _OWNERS_MAX:
                owners.add(root)
            else:
                self._owners[i] = None
        if len(chunks[i]) > 2 * _ORDER_LOAD:
            chunk = chunks[i]
            chunks.insert(i + 1, chunk[_ORDER_LOAD:])
            del chunk[_ORDER_LOAD:]
            self._firsts.insert(i + 1, chunks[i + 1][0])
            owners = self._owners[i]
            self._owners.insert(i + 1, None if owners is None else set(owners))
        if self._compacting >= 0:
            self._compact_step()

    def discard(self, unit: PurgeUnit) -> bool:
        """Remove a unit if it is in the order; whether it was."""
        if unit._entry is None:
            return False
        unit._entry = None
        self._live -= 1
        self._maybe_compact()
        return True

    def forget(self, count: int) -> None:
        """*count* entries went stale at once (a root was dropped)."""
        self._live -= count
        self._maybe_compact()

    def oldest(self) -> PurgeUnit | None:
        """The least recently marked unit, or None if there is none."""
        if self._compacting >= 0:
            self._compact_step()
        chunks, owners = self._chunks, self._owners
        while chunks:
            gone = 0  # chunks of dropped roots at the front go in one slice
            while gone < len(chunks) and _all_dropped(owners[gone]):
                gone += 1
            if not gone:
                chunk = chunks[0]
                for i, entry in enumerate(chunk):
                    unit = entry[2]
                    if unit._entry is entry and (unit.root is None or not unit.root.dead):
                        if i:  # (the test is _is_live, inlined)
                            del chunk[:i]
                            self._entries -= i
                            self._firsts[0] = entry
                        return unit
                gone = 1
            self._entries -= sum(map(len, chunks[:gone]))
            self._to_graveyard(chunks[:gone])
            del chunks[:gone], self._firsts[:gone], owners[:gone]
            if self._compacting > 0:
                self._compacting = max(self._compacting - gone, 0)
        return None

    def _to_graveyard(self, chunks: list[list[Entry]]) -> None:
        if not self._graveyard and self.on_garbage is not None:
            self.on_garbage()
        self._graveyard += chunks

    @property
    def graveyard(self) -> int:
        """Chunks of stale entries waiting to be let go of (see :meth:`bury`)."""
        return len(self._graveyard)

    def bury(self, chunks: int) -> int:
        """Let go of up to *chunks* chunks of stale entries taken out whole; returns how
        many (without a caller that buries them, they simply wait)."""
        graveyard = self._graveyard
        count = min(chunks, len(graveyard))
        del graveyard[len(graveyard) - count :]
        return count

    def _maybe_compact(self) -> None:
        dead = self._entries - self._live
        if self._compacting >= 0:
            self._compact_step()
        elif dead > _COMPACT_MIN and dead > self._live:
            self._compacting = 0
            self._compact_step()

    def _compact_step(self) -> None:
        """Filter the stale entries out of one chunk (merged into the one before if small)."""
        i, chunks = self._compacting, self._chunks
        if i >= len(chunks):
            self._compacting = -1
            return
        chunk = chunks[i]
        owners = self._owners
        if _all_dropped(owners[i]):
            self._entries -= len(chunk)
            self._to_graveyard([chunk])
            del chunks[i], self._firsts[i], owners[i]
            return
        kept = [entry for entry in chunk if _is_live(entry)]
        self._entries -= len(chunk) - len(kept)
        if i and len(kept) + len(chunks[i - 1]) <= _ORDER_LOAD:
            chunks[i - 1] += kept
            before, these = owners[i - 1], _owners_of(kept)
            merged = None if before is None or these is None else before | these
            owners[i - 1] = merged if merged is not None and len(merged) <= _OWNERS_MAX else None
            del chunks[i], self._firsts[i], owners[i]
        elif kept:
            chunk[:] = kept
            self._firsts[i] = kept[0]
            owners[i] = _owners_of(kept)
            self._compacting = i + 1
        else:
            del chunks[i], self._firsts[i], owners[i]

    def _live_entries(self) -> list[Entry]:
        return [entry for chunk in self._chunks for entry in chunk if _is_live(entry)]

    def check_invariants(self) -> None:
        """Raise AssertionError if the order's bookkeeping is inconsistent."""
        live = self._live_entries()
        _check(len(live) == self._live, f"{len(live)} live entries, counted {self._live}")
        for seq, start, unit in live:
            _check(not unit.purged, f"purged {unit!r} is in the purge order")
            _check(not unit.pinned, f"pinned {unit!r} is in the purge order")
            _check((seq, start) == (unit.seq, unit.start), f"stale key for {unit!r}")
        entries = [entry for chunk in self._chunks for entry in chunk]
        _check(len(entries) == self._entries, f"{len(entries)} entries, counted {self._entries}")
        holders: dict[tuple[int, int], PurgeUnit] = {}
        for seq, start, unit in entries:  # stale too: they are compared with the rest
            held = holders.setdefault((seq, start), unit)
            _check(held is unit, f"{unit!r} and {held!r} share the key {(seq, start)}")
        _check(all(a <= b for a, b in itertools.pairwise(entries)), "order not sorted")
        _check(len(self._firsts) == len(self._chunks), "chunk table out of step")
        _check(len(self._owners) == len(self._chunks), "owner table out of step")
        for first, chunk, owners in zip(self._firsts, self._chunks, self._owners, strict=True):
            _check(0 < len(chunk) <= 2 * _ORDER_LOAD, f"order chunk of {len(chunk)} entries")
            _check(first is chunk[0], "chunk table out of date")
            if owners is not None:
                roots = {entry[2].root for entry in chunk if _is_live(entry)}
                _check(roots <= owners, f"a chunk's owners {owners} miss some of {roots}")
                _check(len(owners) <= _OWNERS_MAX, f"{len(owners)} owners of a chunk")


def _all_dropped(owners: set[VrangeRoot | None] | None) -> bool:
    """Whether every entry of a chunk with these owners is stale: each one was dropped."""
    return owners is not None and all(root is not None and root.dead for root in owners)


def _owners_of(entries: list[Entry]) -> set[VrangeRoot | None] | None:
    """The roots of *entries*, or None (mixed) past _OWNERS_MAX of them."""
    owners: set[VrangeRoot | None] = set()
    for entry in entries:
        root = entry[2].root
        if root not in owners:
            if len(owners) == _OWNERS_MAX:
                return None
            owners.add(root)
    return owners


def let_go(units: list[PurgeUnit]) -> None:
    """Units of a dropped root (see :meth:`VrangeRoot.drop`) can be freed: their entries,
    stale now, no longer point back (a unit and its entry would be a reference cycle, left
    to the cyclic collector, which never frees what the daemon froze)."""
    for unit in units:
        unit._entry = None


def _is_live(entry: Entry) -> bool:
    """Whether an entry is its unit's current one and the unit's root is not dropped."""
    unit = entry[2]
    return unit._entry is entry and (unit.root is None or not unit.root.dead)


class _UnitIndex:
    """A root's units sorted by start page (units are disjoint: starts are unique).

    Chunks of up to 2 * _LOAD units, found by bisecting the chunks' first start pages:
    a lookup is two bisections, an insertion or removal moves at most one chunk. About one
    pointer per unit, where a dict and a sorted table of boundaries cost over a hundred bytes.
    """

    __slots__ = ("_chunks", "_firsts", "_len")

    def __init__(self) -> None:
        self._chunks: list[list[PurgeUnit]] = []
        self._firsts: list[int] = []  # the start page of each chunk's first unit
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[PurgeUnit]:
        return itertools.chain.from_iterable(self._chunks)

    def last(self) -> PurgeUnit | None:
        return self._chunks[-1][-1] if self._chunks else None

    def at_or_before(self, page: int) -> PurgeUnit | None:
        """The unit with the largest start <= page, or None."""
        i = bisect_right(self._firsts, page) - 1
        if i < 0:
            return None
        chunk = self._chunks[i]
        return chunk[bisect_right(chunk, page, key=_start_of) - 1]

    def overlapping(self, start: int, end: int) -> list[PurgeUnit]:
        """The units sharing a page with [start, end), by start page."""
        chunks = self._chunks
        i = bisect_right(self._firsts, start) - 1
        found = []
        if i < 0:
            i = j = 0
        else:
            chunk = chunks[i]
            j = bisect_right(chunk, start, key=_start_of)
            if chunk[j - 1].end > start:
                found.append(chunk[j - 1])
        while i < len(chunks):
            chunk = chunks[i]
            for k in range(j, len(chunk)):
                unit = chunk[k]
                if unit.start >= end:
                    return found
                found.append(unit)
            i += 1
            j = 0
        return found

    def starting_in(self, start: int, end: int) -> Iterator[PurgeUnit]:
        """The units whose start page lies in (start, end), by start page, lazily.

        The index must not change while this is iterated.
        """
        chunks = self._chunks
        i = bisect_right(self._firsts, start) - 1
        j = 0 if i < 0 else bisect_right(chunks[i], start, key=_start_of)
        for chunk in itertools.islice(chunks, max(i, 0), None):
            for unit in itertools.islice(chunk, j, None):
                if unit.start >= end:
                    return
                yield unit
            j = 0

    def insert(self, unit: PurgeUnit) -> None:
        start = unit.start
        firsts = self._firsts
        self._len += 1
        if not firsts:
            self._chunks.append([unit])
            firsts.append(start)
            return
        i = max(bisect_right(firsts, start) - 1, 0)
        chunk = self._chunks[i]
        j = bisect_right(chunk, start, key=_start_of)
        chunk.insert(j, unit)
        if j == 0:
            firsts[i] = start
        if len(chunk) > 2 * _LOAD:
            self._split(i)

    def remove(self, unit: PurgeUnit) -> None:
        chunks, firsts = self._chunks, self._firsts
        i = bisect_right(firsts, unit.start) - 1
        chunk = chunks[i] if i >= 0 else []
        j = bisect_left(chunk, unit.start, key=_start_of)
        if j == len(chunk) or chunk[j] is not unit:
            raise ValueError(f"{unit!r} is not in the index")
        del chunk[j]
        self._len -= 1
        if not chunk:
            del chunks[i], firsts[i]
            return
        if j == 0:
            firsts[i] = chunk[0].start
        if len(chunk) <= _LOAD // 2 and len(chunks) > 1:  # merge it into a neighbour
            i = min(i, len(chunks) - 2)
            chunks[i] += chunks[i + 1]
            del chunks[i + 1], firsts[i + 1]
            if len(chunks[i]) > 2 * _LOAD:
                self._split(i)

    def _split(self, i: int) -> None:
        chunk = self._chunks[i]
        self._chunks.insert(i + 1, chunk[_LOAD:])
        del chunk[_LOAD:]
        self._firsts.insert(i + 1, self._chunks[i + 1][0].start)

    def detach(self) -> list[list[PurgeUnit]]:
        """Empty the index; return its chunks."""
        chunks = self._chunks
        self._chunks, self._firsts, self._len = [], [], 0
        return chunks

    def check_invariants(self) -> None:
        _check(sum(map(len, self._chunks)) == self._len, "index length miscounted")
        _check(len(self._firsts) == len(self._chunks), "index chunk table out of step")
        for first, chunk in zip(self._firsts, self._chunks, strict=True):
            _check(0 < len(chunk) <= 2 * _LOAD, f"index chunk of {len(chunk)} units")
            _check(first == chunk[0].start, "index chunk table out of date")
        starts = [unit.start for unit in self]
        _check(starts == sorted(set(starts)), "index not sorted by start page")


class VrangeRoot:
    """The volatile ranges of one inode: its purge units, an interval tree when asked.

    Page arguments are half-open [start, end) page numbers with 0 <= start < end. Purged
    units stay (the file's volatile ranges include them) until they are marked
    non-volatile, truncated away or cleared.

    The units live in an index sorted by start page (see the module docstring): every
    query here is a bisection or two. :attr:`tree` builds the contract's interval tree
    from it on demand.

    ``queued`` counts its units in the purge order, so that :meth:`drop` takes them all
    out at once; units enter and leave the order through :meth:`queue` and
    :meth:`unqueue`. ``queued_pages`` and ``parked_pages`` are reclaim's: the resident
    pages of its queued units and of its pinned ones, for the same reason.
    """

    __slots__ = (
        "_index",
        "_pages",
        "_tree",
        "dead",
        "ino",
        "order",
        "parked_pages",
        "queued",
        "queued_pages",
    )

    def __init__(self, ino: int, order: PurgeOrder) -> None:
        self.ino = ino
        self.order = order
        self._index = _UnitIndex()
        self._tree: IntervalTree | None = None
        self._pages = 0
        self.queued = 0
        self.queued_pages = 0
        self.parked_pages = 0
        self.dead = False

    def __len__(self) -> int:
        """The number of units (purged ones included)."""
        return len(self._index)

    def __repr__(self) -> str:
        return f"<VrangeRoot ino={self.ino} units={len(self)} pages={self._pages}>"

    @property
    def tree(self) -> IntervalTree:
        """The units as an ``IntervalTree`` of ``Interval(start, end, unit)``, for interval
        queries of any kind; built on first use after a change (O(n log n)), then kept
        until the next change. Read it, never change it."""
        if self._tree is None:
            self._tree = IntervalTree(Interval(u.start, u.end, u) for u in self._index)
        return self._tree

    # Queries

    def units(self) -> list[PurgeUnit]:
        """All units, sorted by start page."""
        return list(self._index)

    def units_overlapping(self, start: int, end: int) -> list[PurgeUnit]:
        """The units sharing at least one page with [start, end), sorted by start page."""
        if not 0 <= start < end:  # _check_pages, inlined: every mark asks
            _check_pages(start, end)
        return self._index.overlapping(start, end)

    def last_page(self) -> int:
        """The end page of the last unit (0 if there is none)."""
        last = self._index.last()
        return 0 if last is None else last.end

    def slice_end(self, start: int, end: int, units: int) -> int:
        """A page in (start, end] such that [start, it) overlaps at most about *units* units.

        For doing a change over many units in slices: cheap, O(log n + units). The page is
        the start of a unit (or *end*), so no unit is cut there.
        """
        if end - start <= units + 1:  # too few pages for more units to start inside
            return end
        for i, unit in enumerate(self._index.starting_in(start, end)):
            if i >= units:
                return unit.start
        return end

    def unit_at(self, page: int) -> PurgeUnit | None:
        """The unit holding ``page``, or None."""
        unit = self._index.at_or_before(page)
        return unit if unit is not None and unit.end > page else None

    def volatile_page_count(self) -> int:
        """The number of pages in units (purged ones included)."""
        return self._pages

    # Changes

    def queue(self, unit: PurgeUnit) -> None:
        """Put a unit of this root into the purge order (see PurgeOrder.add)."""
        self.order.add(unit)
        self.queued += 1

    def unqueue(self, unit: PurgeUnit) -> bool:
        """Take a unit of this root out of the purge order; whether it was in."""
        if self.order.discard(unit):
            self.queued -= 1
            return True
        return False

    def mark_volatile(
        self, start: int, end: int, found: list[PurgeUnit] | None = None, *, queue: bool = True
    ) -> PurgeUnit:
        """Make pages [start, end) volatile and return their unit, now the newest.

        Every unit overlapping the range is merged with it into one unit spanning the union;
        merely adjacent units stay separate. The merged unit is not purged and not pinned,
        whatever the merged units were, and it is in the purge order unless *queue* is False
        (then the caller decides). The merged units leave the root and the order, except
        that when the range lies inside one existing unit that unit object is kept and just
        gets the new seq. *found*, if given, must be ``units_overlapping(start, end)``
        (a caller that looked them up already saves the second look-up).
        """
        if found is None:
            found = self.units_overlapping(start, end)
        order = self.order
        seq = order.next_seq()
        if len(found) == 1 and found[0].start <= start and end <= found[0].end:
            unit = found[0]
            self.unqueue(unit)
            unit.seq = seq
            unit.purged = unit.pinned = False  # reclaim parks it again if pins hold it
            if queue:
                self.queue(unit)
            return unit
        if found:
            start = min(start, found[0].start)
            end = max(end, found[-1].end)
        for old in found:
            self._remove(old)
            self.unqueue(old)
        unit = PurgeUnit(self.ino, start, end, seq)
        unit.root = self
        self._index.insert(unit)  # _insert, inlined: every new mark comes here
        self._pages += end - start
        self._tree = None
        if queue:
            order.add(unit)  # queue(), inlined
            self.queued += 1
        return unit

    def mark_nonvolatile(self, start: int, end: int) -> list[PurgeUnit]:
        """Make pages [start, end) non-volatile; return what was cut out, sorted by start.

        Units wholly inside the range leave the root and the order. A unit partly inside is
        trimmed or split: the pieces that remain keep its seq, purged flag and place in the
        purge order (the left piece, or the only piece, is the original unit object).

        The result describes exactly the pages that stopped being volatile: a unit removed
        whole is returned itself; for a unit trimmed or split, a new unit (same ino, seq,
        purged and pinned flags) covering the pages cut from it. Returned units are in no
        root and no order.
        """
        _check_pages(start, end)
        return self._cut(start, end)

    def truncate(self, page_count: int) -> list[PurgeUnit]:
        """Drop every volatile page >= page_count; return what was cut out, as above."""
        if page_count < 0:
            raise ValueError(f"negative page count {page_count}")
        last = self.last_page()
        return self._cut(page_count, last) if page_count < last else []

    def drop(self) -> list[list[PurgeUnit]]:
        """The inode is freed: every unit leaves the root and the purge order at once.

        O(1) in the number of units: their order entries go stale together (the root is
        marked dead) and are dropped lazily. Returns the units, in chunks, for the caller
        to let go of a few chunks at a time (deallocating a million units takes tens of
        ms). The root must not be used afterwards.
        """
        self.dead = True
        self.order.forget(self.queued)
        self.queued = self.queued_pages = self.parked_pages = 0
        chunks = self._index.detach()
        self._tree = None
        self._pages = 0
        return chunks

    def mark_purged(self, unit: PurgeUnit) -> None:
        """Record that ``unit`` (in this root) was purged: it leaves the purge order.

        It stays in the root, listed as volatile, until marked non-volatile. Freeing the
        pages is the caller's job.
        """
        self._check_mine(unit)
        unit.purged = True
        self.unqueue(unit)

    # Internals

    def _check_mine(self, unit: PurgeUnit) -> None:
        if self._index.at_or_before(unit.start) is not unit:
            raise ValueError(f"{unit!r} is not in {self!r}")

    def _insert(self, unit: PurgeUnit) -> None:
        self._index.insert(unit)
        self._pages += unit.end - unit.start
        self._tree = None

    def _remove(self, unit: PurgeUnit) -> None:
        self._index.remove(unit)
        self._pages -= unit.end - unit.start
        self._tree = None

    def _cut(self, start: int, end: int) -> list[PurgeUnit]:
        cut_out = []
        order = self.order
        for unit in self._index.overlapping(start, end):
            if start <= unit.start and unit.end <= end:  # wholly inside: it goes
                self._remove(unit)
                self.unqueue(unit)
                unit.root = None
                cut_out.append(unit)
                continue
            cut_start, cut_end = max(unit.start, start), min(unit.end, end)
            cut_out.append(
                PurgeUnit(unit.ino, cut_start, cut_end, unit.seq, unit.purged, unit.pinned)
            )
            self._pages -= cut_end - cut_start
            self._tree = None
            if unit.start < start:  # the unit keeps its left part (and its start page)
                right_end = unit.end
                unit.end = start
                if right_end > end:  # a right piece too, at the unit's place in the order
                    piece = PurgeUnit(unit.ino, end, right_end, unit.seq, unit.purged, unit.pinned)
                    piece.root = self
                    self._index.insert(piece)
                    if unit in order:
                        self.queue(piece)
            else:  # the unit keeps its right part: its start, part of its order key, moves
                queued = self.unqueue(unit)
                self._index.remove(unit)
                unit.start = end
                self._index.insert(unit)
                if queued:
                    self.queue(unit)
        return cut_out

    def check_invariants(self) -> None:
        """Raise AssertionError unless index, page count, order (and tree, if built) agree.

        Checks that units are sorted and disjoint, each belongs to this inode and is not
        empty, the page count matches, purged units are not in the purge order, and a
        tree that was built holds exactly the units. (Whether a unit that is not purged
        must be queued depends on its pages: reclaim checks that.)
        """
        self._index.check_invariants()
        previous_end = None
        pages = queued = 0
        _check(not self.dead, f"{self!r} was dropped")
        for unit in self._index:
            _check(unit.root is self, f"{unit!r} thinks it is in {unit.root!r}")
            queued += unit in self.order
            _check(isinstance(unit, PurgeUnit), f"{unit!r} is no PurgeUnit")
            _check(unit.ino == self.ino, f"{unit!r} in the root of inode {self.ino}")
            _check(unit.start < unit.end, f"empty {unit!r}")
            _check(previous_end is None or previous_end <= unit.start, f"{unit!r} overlaps")
            previous_end = unit.end
            pages += unit.end - unit.start
            if unit.purged:
                _check(unit not in self.order, f"purged {unit!r} is in the purge order")
        _check(pages == self._pages, f"counted {self._pages} pages, units hold {pages}")
        _check(queued == self.queued, f"counted {self.queued} queued units, {queued} are")
        if self._tree is not None:
            held = sorted((iv.begin, iv.end, id(iv.data)) for iv in self._tree)
            units = [(unit.start, unit.end, id(unit)) for unit in self._index]
            _check(held == units, "the interval tree is out of date")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_pages(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"invalid page range [{start}, {end})")
