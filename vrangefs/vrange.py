"""Volatile ranges: each inode's ``VrangeRoot`` and the mount-wide ``PurgeOrder``.

Pure bookkeeping in page numbers: no FUSE, no page data. This is the only module that imports
intervaltree.

A *purge unit* is a run of pages [start, end) of one inode that is purged as a whole. A
root's ``tree`` holds ``Interval(start, end, unit)`` for each of its units; intervals never
overlap (two units may be adjacent). The ``PurgeOrder`` lists the units that can free memory,
least recently marked first: units that are not purged and (the reclaim module sees to that)
hold resident pages. Reclaim purges from its head.

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

import heapq
import itertools
import time
from collections.abc import Iterator
from typing import Any

from intervaltree import Interval, IntervalTree

_COMPACT_MIN = 64


class PurgeUnit:
    """A run of pages [start, end) of inode ``ino``, purged as a whole.

    ``seq`` is the mark order (larger = more recently marked; pieces of a split unit share
    it). ``purged`` is True once the unit's pages were discarded and until a page of it is
    written again (then the unit is requeued) or it is marked volatile again (merged).
    Whether each page reads as purged is the page store's business, not this flag's.
    ``pinned`` is reclaim's: True while a pin holds a page of the unit, which keeps it out of
    the purge order (parked, with its seq, until the last pin goes). Pieces of a split unit
    inherit both flags; reclaim then looks again at whether the pieces are still pinned.
    """

    __slots__ = ("_entry", "end", "ino", "pinned", "purged", "seq", "start")

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
        self._entry: tuple[int, int, int, PurgeUnit] | None = None  # live PurgeOrder entry

    def __len__(self) -> int:
        """The number of pages."""
        return self.end - self.start

    def __repr__(self) -> str:
        state = (" purged" if self.purged else "") + (" pinned" if self.pinned else "")
        return f"<PurgeUnit ino={self.ino} pages=[{self.start},{self.end}) seq={self.seq}{state}>"


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
    their place, in page order among themselves. A binary heap with lazy deletion: ``add``
    and popping are O(log n), ``discard`` is O(1), and discarded entries are dropped when
    they reach the top or when they outnumber the live ones (amortised O(1) per discard).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, PurgeUnit]] = []
        self._live = 0
        self._last_seq = 0
        self._tick = itertools.count()

    def next_seq(self) -> int:
        """A new sequence number, larger than all before: the monotonic clock in ns.

        Being a time, the oldest entry's seq also tells its age (:meth:`oldest_age`).
        """
        self._last_seq = max(self._last_seq + 1, time.monotonic_ns())
        return self._last_seq

    def oldest_age(self) -> float:
        """Seconds since the oldest entry was marked or last opened (0.0 if none)."""
        unit = self.oldest()
        return 0.0 if unit is None else max(time.monotonic_ns() - unit.seq, 0) / 1e9

    def __len__(self) -> int:
        return self._live

    def __contains__(self, unit: PurgeUnit) -> bool:
        return unit._entry is not None

    def __iter__(self) -> Iterator[PurgeUnit]:
        """The units, oldest first (sorts a copy: O(n log n), for tests and debugging)."""
        return iter([entry[3] for entry in sorted(self._live_entries())])

    def add(self, unit: PurgeUnit) -> None:
        """Add a unit that is not purged and not in the order, at (unit.seq, unit.start)."""
        if unit._entry is not None:
            raise ValueError(f"{unit!r} is already in the purge order")
        if unit.purged or unit.pinned:
            raise ValueError(f"{unit!r} is purged or pinned: it cannot be purged")
        entry = (unit.seq, unit.start, next(self._tick), unit)
        unit._entry = entry
        heapq.heappush(self._heap, entry)
        self._live += 1

    def discard(self, unit: PurgeUnit) -> None:
        """Remove a unit if it is in the order."""
        if unit._entry is None:
            return
        unit._entry = None
        self._live -= 1
        dead = len(self._heap) - self._live
        if dead > _COMPACT_MIN and dead > self._live:
            self._heap = self._live_entries()
            heapq.heapify(self._heap)

    def oldest(self) -> PurgeUnit | None:
        """The least recently marked unit, or None if there is none."""
        heap = self._heap
        while heap and heap[0][3]._entry is not heap[0]:
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def _live_entries(self) -> list[tuple[int, int, int, PurgeUnit]]:
        return [entry for entry in self._heap if entry[3]._entry is entry]

    def check_invariants(self) -> None:
        """Raise AssertionError if the order's bookkeeping is inconsistent."""
        live = self._live_entries()
        _check(len(live) == self._live, f"{len(live)} live entries, counted {self._live}")
        for seq, start, _, unit in live:
            _check(not unit.purged, f"purged {unit!r} is in the purge order")
            _check(not unit.pinned, f"pinned {unit!r} is in the purge order")
            _check((seq, start) == (unit.seq, unit.start), f"stale key for {unit!r}")
        for i in range(1, len(self._heap)):
            _check(self._heap[(i - 1) // 2] <= self._heap[i], "heap order broken")


class VrangeRoot:
    """The volatile ranges of one inode: an interval tree of purge units.

    Page arguments are half-open [start, end) page numbers with 0 <= start < end. Purged
    units stay in the tree (the file's volatile ranges include them) until they are marked
    non-volatile, truncated away or cleared.

    Units are indexed by start page as well (``_starts``), and lookups use the tree's own
    sorted boundary table: that is several times faster than ``IntervalTree.overlap``.
    """

    __slots__ = ("_pages", "_starts", "ino", "order", "tree")

    def __init__(self, ino: int, order: PurgeOrder) -> None:
        self.ino = ino
        self.order = order
        self.tree = IntervalTree()
        self._starts: dict[int, PurgeUnit] = {}
        self._pages = 0

    def __len__(self) -> int:
        """The number of units (purged ones included)."""
        return len(self._starts)

    def __repr__(self) -> str:
        return f"<VrangeRoot ino={self.ino} units={len(self)} pages={self._pages}>"

    # Queries

    def units(self) -> list[PurgeUnit]:
        """All units, sorted by start page."""
        starts = self._starts
        return [starts[page] for page in sorted(starts)]

    def units_overlapping(self, start: int, end: int) -> list[PurgeUnit]:
        """The units sharing at least one page with [start, end), sorted by start page."""
        _check_pages(start, end)
        first = self.unit_at(start)
        found = [] if first is None else [first]
        if end - start > 1:  # other units begin strictly inside the range
            starts = self._starts
            for page in self._bounds().irange(start, end, inclusive=(False, False)):
                unit = starts.get(page)
                if unit is not None:
                    found.append(unit)
        return found

    def last_page(self) -> int:
        """The end page of the last unit (0 if there is none)."""
        return int(self._bounds().keys()[-1]) if self._starts else 0

    def slice_end(self, start: int, end: int, units: int) -> int:
        """A page in (start, end] such that [start, it) overlaps at most about *units* units.

        For doing a change over many units in slices: cheap, O(log n + units).
        """
        for i, page in enumerate(self._bounds().irange(start, end, inclusive=(False, False))):
            if i >= 2 * units:  # each unit has two boundaries
                return int(page)
        return end

    def unit_at(self, page: int) -> PurgeUnit | None:
        """The unit holding ``page``, or None."""
        # A unit holding `page` begins at the last boundary <= page: no boundary lies inside
        # a unit, since units are disjoint.
        for start in self._bounds().irange(maximum=page, reverse=True):
            unit = self._starts.get(start)
            return unit if unit is not None and unit.end > page else None
        return None

    def volatile_page_count(self) -> int:
        """The number of pages in units (purged ones included)."""
        return self._pages

    # Changes

    def mark_volatile(self, start: int, end: int) -> PurgeUnit:
        """Make pages [start, end) volatile and return their unit, now the newest.

        Every unit overlapping the range is merged with it into one unit spanning the union;
        merely adjacent units stay separate. The merged unit is not purged and not pinned (it
        is in the purge order), whatever the merged units were. The merged units leave the
        tree and the order, except that when the range lies inside one existing unit that unit
        object is kept and just gets the new seq.
        """
        found = self.units_overlapping(start, end)
        seq = self.order.next_seq()
        if len(found) == 1 and found[0].start <= start and end <= found[0].end:
            unit = found[0]
            self.order.discard(unit)
            unit.seq = seq
            unit.purged = unit.pinned = False  # reclaim parks it again if pins hold it
            self.order.add(unit)
            return unit
        if found:
            start = min(start, found[0].start)
            end = max(end, found[-1].end)
        for old in found:
            self._remove(old)
            self.order.discard(old)
        unit = PurgeUnit(self.ino, start, end, seq)
        self._insert(unit)
        self.order.add(unit)
        return unit

    def mark_nonvolatile(self, start: int, end: int) -> list[PurgeUnit]:
        """Make pages [start, end) non-volatile; return what was cut out, sorted by start.

        Units wholly inside the range leave the tree and the order. A unit partly inside is
        trimmed or split: the pieces that remain keep its seq, purged flag and place in the
        purge order (the left piece, or the only piece, is the original unit object).

        The result describes exactly the pages that stopped being volatile: a unit removed
        whole is returned itself; for a unit trimmed or split, a new unit (same ino, seq,
        purged and pinned flags) covering the pages cut from it. Returned units are in no
        tree and no order.
        """
        _check_pages(start, end)
        return self._cut(start, end)

    def truncate(self, page_count: int) -> list[PurgeUnit]:
        """Drop every volatile page >= page_count; return what was cut out, as above."""
        if page_count < 0:
            raise ValueError(f"negative page count {page_count}")
        if not self._starts:
            return []
        last = self._bounds().keys()[-1]
        return self._cut(page_count, last) if page_count < last else []

    def clear(self) -> list[PurgeUnit]:
        """Remove every unit (the inode is freed); return them, sorted by start."""
        removed = self.units()
        for unit in removed:
            self.order.discard(unit)
        self.tree.clear()
        self._starts.clear()
        self._pages = 0
        return removed

    def mark_purged(self, unit: PurgeUnit) -> None:
        """Record that ``unit`` (in this root) was purged: it leaves the purge order.

        It stays in the tree, listed as volatile, until marked non-volatile. Freeing the
        pages is the caller's job.
        """
        self._check_mine(unit)
        unit.purged = True
        self.order.discard(unit)

    # Internals

    def _bounds(self) -> Any:
        """The tree's boundary table: a SortedDict whose keys are all units' start and end
        pages (an intervaltree attribute that its own queries use)."""
        return self.tree.boundary_table

    def _check_mine(self, unit: PurgeUnit) -> None:
        if self._starts.get(unit.start) is not unit:
            raise ValueError(f"{unit!r} is not in {self!r}")

    def _insert(self, unit: PurgeUnit) -> None:
        self.tree.add(Interval(unit.start, unit.end, unit))
        self._starts[unit.start] = unit
        self._pages += unit.end - unit.start

    def _remove(self, unit: PurgeUnit) -> None:
        self.tree.remove(Interval(unit.start, unit.end, unit))
        del self._starts[unit.start]
        self._pages -= unit.end - unit.start

    def _cut(self, start: int, end: int) -> list[PurgeUnit]:
        cut_out = []
        for unit in self.units_overlapping(start, end):
            self._remove(unit)
            keep_left = unit.start < start
            keep_right = unit.end > end
            if not keep_left and not keep_right:
                self.order.discard(unit)
                cut_out.append(unit)
                continue
            cut_start, cut_end = max(unit.start, start), min(unit.end, end)
            cut_out.append(
                PurgeUnit(unit.ino, cut_start, cut_end, unit.seq, unit.purged, unit.pinned)
            )
            if keep_left:
                right_end = unit.end
                unit.end = start
                self._insert(unit)
                if keep_right:
                    piece = PurgeUnit(unit.ino, end, right_end, unit.seq, unit.purged, unit.pinned)
                    self._insert(piece)
                    if unit in self.order:  # the piece keeps the unit's place
                        self.order.add(piece)
            else:
                queued = unit in self.order
                self.order.discard(unit)  # its key (seq, start) changes
                unit.start = end
                self._insert(unit)
                if queued:
                    self.order.add(unit)
        return cut_out

    def check_invariants(self) -> None:
        """Raise AssertionError unless tree, index, page count and order agree.

        Checks that intervals are disjoint, each holds a unit of this inode with matching
        start/end, the start index and page count match the tree, and purged units are not
        in the purge order. (Whether a unit that is not purged must be queued depends on its
        pages: reclaim checks that.)
        """
        intervals = sorted(self.tree, key=lambda iv: iv.begin)
        _check(len(intervals) == len(self._starts), "tree and start index differ in size")
        previous_end = None
        pages = 0
        for iv in intervals:
            unit = iv.data
            _check(isinstance(unit, PurgeUnit), f"{iv!r} holds no PurgeUnit")
            _check((unit.start, unit.end) == (iv.begin, iv.end), f"{iv!r} vs {unit!r}")
            _check(unit.ino == self.ino, f"{unit!r} in the tree of inode {self.ino}")
            _check(iv.begin < iv.end, f"empty {unit!r}")
            _check(self._starts.get(unit.start) is unit, f"{unit!r} missing from the index")
            _check(previous_end is None or previous_end <= iv.begin, f"{unit!r} overlaps")
            previous_end = iv.end
            pages += iv.end - iv.begin
            if unit.purged:
                _check(unit not in self.order, f"purged {unit!r} is in the purge order")
        _check(pages == self._pages, f"counted {self._pages} pages, tree holds {pages}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_pages(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"invalid page range [{start}, {end})")
