"""Reclaim: what may be purged, in which order, when, and what it cost.

One :class:`Reclaim` per mount owns the mount-wide purge order, the watermarks,
the count of purgeable resident pages and the purge statistics.  The volume
calls it for every change that touches volatility (mark, unmark, write,
truncate, freeing an inode) and for every purge (a write that needs room under
the cap, memory pressure, purge-all); nothing else changes the order or the
counts.  It is the place where further kinds of purgeable things plug in.

Every purge is reported, in the same synchronous step, to the
:class:`PurgeListener` (the daemon's invalidator, which drops the kernel's
cached copy of the purged pages): no caller can forget to.

A unit is in the purge order only while it holds resident pages and is not
purged, so units over holes cost reclaim nothing.  A unit that loses its pages
otherwise (a truncate, a split) is dropped from the order when reclaim reaches
it; a write into a unit that is out of the order puts it back, with its old
mark time.

Pins (:mod:`vrangefs.pins`) plug in here.  A unit that contains a pinned page
is *parked*: flagged ``pinned`` and kept out of the purge order, so purges
never see it and a million pinned units cost a purge nothing.  Its resident
pages are counted apart (``pinned_pages``).  When its last pin goes it is put
back, with its old mark time, so it keeps its place in the order.  Every
change that makes, merges or splits units looks at the pins of the pages
concerned: merged units are parked if pinned, pieces of a split unit inherit
the flag and are put back if no pin holds them any more.

Files of cache directories plug in too.  Each is a :class:`CacheFile` in the same
order as the units, placed by the time of its last open, and queued only while
nobody holds it: no open handle, no pin, not kept (marked non-volatile as a
whole) and holding pages.  Purging it *evicts* the file: the volume removes
every name of it and frees it (the ``evict_file`` callback), and the listener
hears of it.  Their resident pages are tallied apart (``cache_pages``).

Pure and synchronous, like the rest of the core: no FUSE, no event loop.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from vrangefs.pagestore import (
    PAGE_SHIFT,
    FileData,
    NoSpaceError,
    PageStore,
    PageTally,
    pages_spanned,
)
from vrangefs.pins import PinTable
from vrangefs.protocol import PurgeCause
from vrangefs.vrange import CacheFile, PurgeOrder, PurgeUnit, VrangeRoot

log = logging.getLogger(__name__)

# Beyond what the request itself needs, one write purges at most this many
# pages on its way to the low watermark: the work a request may do is bounded.
RECLAIM_EXTRA_PAGES = 16384  # 64 MiB
RECLAIM_EXTRA_UNITS = 256  # ...and at most this many units (each costs ~15 us)
PINS_PER_STEP = 32  # pins of an exited process dropped per step (each costs ~10 us)


Link = tuple[int, bytes]
"""A name of a file: (directory inode number, name)."""


class PurgeListener(Protocol):
    """Told of every purge, synchronously, before the purging call returns."""

    def purged(self, ino: int, cause: PurgeCause, pages: int) -> None: ...

    def evicted(self, ino: int, cause: PurgeCause, pages: int, names: list[Link]) -> None:
        """A cache-directory file was evicted: *names* are the (directory, name) it had."""
        ...

    def unpublished(self) -> tuple[dict[PurgeCause, int], dict[PurgeCause, int]]:
        """(pages, units) per cause of purges readers cannot observe yet: left out of stats."""
        ...


def worth_evicting(data: FileData) -> bool:
    """Whether evicting a closed cache-directory file does any good: it holds pages, or
    pages of it were purged (a range purge): evicting turns their EIO into a miss.

    A file left without either (empty, or all holes) is left alone.
    """
    return bool(data.resident_pages) or data.any_purged(0, pages_spanned(data.size))


def _resident(data: FileData, start: int, end: int) -> int:
    """``data.resident_in(start, end)``, a one-page range (the commonest mark) looked up
    directly: a tenth of the cost."""
    if end - start == 1:
        return 1 if data.slot_of(start) >= 0 else 0
    return data.resident_in(start, end)


class ReclaimObserver(Protocol):
    """Told of every purge and eviction after the listener (the daemon's event stream).

    Called synchronously, inside reclaim's step: it must not change the volume and
    must not block (it may look things up, e.g. a path).
    """

    def purged(self, unit: PurgeUnit, cause: PurgeCause, pages: int) -> None: ...

    def evicted(self, ino: int, cause: PurgeCause, pages: int, names: list[Link]) -> None: ...

    def statistics(self) -> dict[str, int | str]:
        """Its own figures, appended to the mount statistics."""
        ...


FileOf = Callable[[int], tuple[FileData, VrangeRoot | None]]
"""Maps an inode number to its data and volatile ranges, if any (the inode table's view)."""

EvictFile = Callable[[int], list[Link]]
"""Removes every name of a file and frees it (the volume's part of an eviction)."""


@dataclass(frozen=True, slots=True)
class ReclaimStats:
    """A snapshot of reclaim's state and counters, in pages and units."""

    capacity_pages: int
    resident_pages: int
    volatile_pages: int  # resident pages in units that are not purged, pinned ones included
    pinned_volatile_pages: int  # the part of volatile_pages that pins hold back
    volatile_units: int  # every unit of the mount, purged ones and those over holes included
    purgeable_units: int  # units in the purge order: not purged, not pinned, holding pages
    high_pages: int
    low_pages: int
    purged_pages: dict[PurgeCause, int]
    purge_events: dict[PurgeCause, int]
    pins: int  # live pins, counted
    pinned_pages: int  # pages charged for pins (see vrangefs.pins)
    pin_owners: int  # processes holding pins
    pins_released_by_exit: int  # pins dropped because their process exited
    evicted_files: dict[PurgeCause, int]
    evicted_pages: dict[PurgeCause, int]
    cache_dir_files: int  # regular files whose every name is in a cache directory
    cache_dir_pages: int  # their resident pages
    oldest_age: float  # seconds since the head of the order was marked or last opened

    def minus(self, pages: dict[PurgeCause, int], units: dict[PurgeCause, int]) -> ReclaimStats:
        """The same snapshot without some purges (those readers cannot observe yet)."""
        return dataclasses.replace(
            self,
            purged_pages={c: n - pages.get(c, 0) for c, n in self.purged_pages.items()},
            purge_events={c: n - units.get(c, 0) for c, n in self.purge_events.items()},
        )


class Reclaim:
    """The mount's reclaim policy and volatility accounting (see the module docstring)."""

    def __init__(
        self,
        store: PageStore,
        file_of: FileOf,
        evict_file: EvictFile | None = None,
        *,
        high_watermark: float = 1.0,
        low_watermark: float = 0.95,
        pin_limit_pages: int | None = None,
    ) -> None:
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError(
                f"watermarks must satisfy 0 < low ({low_watermark}) <= high ({high_watermark}) <= 1"
            )
        self.store = store
        self._file_of = file_of
        self.order = PurgeOrder()
        self.listener: PurgeListener | None = None
        self.observer: ReclaimObserver | None = None
        # A write that would take resident data over the high watermark purges
        # volatile units down to the low one, so writes streaming near the cap
        # do not purge on every request.
        self.high_pages = max(int(store.capacity_pages * high_watermark), 1)
        self.low_pages = min(int(store.capacity_pages * low_watermark), self.high_pages)
        self._purged_pages = dict.fromkeys(PurgeCause, 0)
        self._purge_events = dict.fromkeys(PurgeCause, 0)
        # Resident pages inside units that are not purged (queued ones, and parked
        # ones apart), and all units, kept up to date by every change so that stats
        # and reclaim need not walk them.
        self.volatile_pages = 0
        self.pinned_pages = 0
        self.units = 0
        self.pins = PinTable(pin_limit_pages)
        self._evict_file = evict_file
        self.cache_files: dict[int, CacheFile] = {}
        # The queued cache files alone, oldest first (lazy: an entry counts while its file
        # is queued with that seq), for making room for metadata rather than data.
        self._files_heap: list[tuple[int, int, CacheFile]] = []
        self.cache_pages = PageTally()
        self._evicted_files = dict.fromkeys(PurgeCause, 0)
        self._evicted_pages = dict.fromkeys(PurgeCause, 0)

    def new_root(self, ino: int) -> VrangeRoot:
        return VrangeRoot(ino, self.order)

    # -- volatility changes -------------------------------------------------
    def mark_volatile(self, root: VrangeRoot, data: FileData, start: int, end: int) -> None:
        found = root.units_overlapping(start, end)
        if len(found) == 1 and found[0].start <= start and end <= found[0].end:
            # Inside one unit: the same unit and pages, made the newest. Count them once.
            unit = found[0]
            resident = _resident(data, unit.start, unit.end)
            if not unit.purged:
                if unit.pinned:
                    self.pinned_pages -= resident
                    root.parked_pages -= resident
                else:
                    self.volatile_pages -= resident
                    root.queued_pages -= resident
            root.mark_volatile(start, end, found, queue=False)
        else:
            if found:
                self._uncount(root, data, found)
            unit = root.mark_volatile(start, end, found, queue=False)
            self.units += 1 - len(found)
            resident = _resident(data, unit.start, unit.end)
        # Neither purged nor pinned, and not queued yet: queued below if it may be purged.
        if self.pins.covers(root.ino, unit.start, unit.end):
            unit.pinned = True
            self.pinned_pages += resident
            root.parked_pages += resident
            return
        self.volatile_pages += resident
        root.queued_pages += resident
        if resident:  # else nothing to free: a write queues it
            root.queue(unit)

    def mark_nonvolatile(self, root: VrangeRoot, data: FileData, start: int, end: int) -> None:
        units = len(root)
        self._uncount(root, data, root.mark_nonvolatile(start, end))
        self.units += len(root) - units
        # The pieces left of a split unit inherited its pin flag; pins may not hold them.
        if start:
            self._recheck_pin(root, data, root.unit_at(start - 1))
        self._recheck_pin(root, data, root.unit_at(end))

    def truncate(self, root: VrangeRoot, data: FileData, page_count: int) -> None:
        """Pages from *page_count* on are about to be cut from the file."""
        units = len(root)
        self._uncount(root, data, root.truncate(page_count))
        self.units += len(root) - units
        if page_count:
            self._recheck_pin(root, data, root.unit_at(page_count - 1))

    def forget(
        self, ino: int, root: VrangeRoot | None, data: FileData | None
    ) -> list[list[PurgeUnit]]:
        """The inode is being freed: its units and pins go.

        Its units leave at once, however many (see VrangeRoot.drop); they are returned in
        chunks, for the caller to let go of a few at a time.
        """
        self.pins.forget_inode(ino)
        if data is not None:
            self.cache_leave(ino, data)
        if root is None:
            return []
        self.units -= len(root)
        self.volatile_pages -= root.queued_pages
        self.pinned_pages -= root.parked_pages
        return root.drop()

    def _uncount(self, root: VrangeRoot, data: FileData, units: Iterable[PurgeUnit]) -> None:
        """Units (or pieces cut from them) stop being volatile: uncount their resident pages."""
        for unit in units:
            if not unit.purged:
                resident = _resident(data, unit.start, unit.end)
                if unit.pinned:
                    self.pinned_pages -= resident
                    root.parked_pages -= resident
                else:
                    self.volatile_pages -= resident
                    root.queued_pages -= resident

    # -- pins ------------------------------------------------------------------
    def pin(self, ino: int, start: int, end: int, tgid: int, uid: int) -> None:
        """One more pin of process *tgid* on pages [start, end) of *ino* (see PinTable.pin).

        Units that contain a page of the range are parked: no purge takes them.
        """
        if not self.pins.pin(ino, start, end, tgid, uid):
            return
        cache_file = self.cache_files.get(ino)
        if cache_file is not None:
            self.order.discard(cache_file)
            cache_file.pinned = True
        data, root = self._file_of(ino)
        if root is None:
            return
        for unit in root.units_overlapping(start, end):
            if not unit.pinned:
                if root.unqueue(unit):
                    resident = data.resident_in(unit.start, unit.end)
                    self.volatile_pages -= resident
                    self.pinned_pages += resident
                    root.queued_pages -= resident
                    root.parked_pages += resident
                unit.pinned = True  # not queued and not purged: it holds no page yet

    def unpin(self, ino: int, start: int, end: int, tgid: int) -> None:
        """Drop one pin of *tgid* on exactly pages [start, end) (NotPinnedError if none).

        Units no pin holds any more go back into the purge order, at their old place.
        """
        if self.pins.unpin(ino, start, end, tgid):
            self._released(ino, start, end)

    def release_owner(self, tgid: int) -> int:
        """Drop every pin of a process that exited; returns how many (counted) went."""
        return sum(self.releasing_owner(tgid))

    def releasing_owner(self, tgid: int, per_step: int = PINS_PER_STEP) -> Iterator[int]:
        """Drop every pin of a process that exited, *per_step* at a time (a job: a
        process may hold 100,000 pins); yields how many (counted) each step dropped.

        Its remaining pins hold their pages meanwhile, as if it were still exiting.
        """
        while True:
            before = self.pins.pins
            released = self.pins.release_some(tgid, per_step)
            if not released:
                return
            for ino, start, end in released:
                self._released(ino, start, end)
            yield before - self.pins.pins

    def _released(self, ino: int, start: int, end: int) -> None:
        """A pin on pages [start, end) of *ino* is gone: put back the units it alone held."""
        data, root = self._file_of(ino)
        if root is not None:
            for unit in root.units_overlapping(start, end):
                self._recheck_pin(root, data, unit)
        cache_file = self.cache_files.get(ino)
        if cache_file is not None:
            self._requeue(cache_file, data)

    def _recheck_pin(self, root: VrangeRoot, data: FileData, unit: PurgeUnit | None) -> None:
        """Put a parked unit back into the order if no pin holds any of its pages now."""
        if unit is None or not unit.pinned or self.pins.covers(root.ino, unit.start, unit.end):
            return
        unit.pinned = False
        if unit.purged:
            return  # a write puts it back
        resident = data.resident_in(unit.start, unit.end)
        if resident:
            self.pinned_pages -= resident
            self.volatile_pages += resident
            root.parked_pages -= resident
            root.queued_pages += resident
            root.queue(unit)

    def write(self, root: VrangeRoot | None, data: FileData, off: int, buf: bytes) -> int:
        """Write *buf* at *off*, purging volatile units for room; NoSpaceError if none is left.

        Written pages of units become purgeable again (purged units and units
        that held nothing return to the order with their old mark time).
        """
        try:
            return self._store_counted(root, data, off, buf, self.high_pages)
        except NoSpaceError as e:
            needed = e.needed
        while True:
            # Purging may free pages of this very write's range, which it must then
            # allocate again: retry until it fits or nothing volatile is left.
            if not self.for_write(needed) and self.store.free_pages < needed:
                raise NoSpaceError(needed, self.store.free_pages)
            try:
                return self._store_counted(root, data, off, buf, None)
            except NoSpaceError as again:
                needed = again.needed

    def _store_counted(
        self, root: VrangeRoot | None, data: FileData, off: int, buf: bytes, limit: int | None
    ) -> int:
        if root is None or not len(root) or not buf:
            return data.write(off, buf, limit)
        first, end = off >> PAGE_SHIFT, ((off + len(buf) - 1) >> PAGE_SHIFT) + 1
        units = root.units_overlapping(first, end)
        before = [
            0 if u.purged else data.resident_in(max(u.start, first), min(u.end, end)) for u in units
        ]
        written = data.write(off, buf, limit)
        order = self.order
        for unit, held in zip(units, before, strict=True):
            gained = data.resident_in(max(unit.start, first), min(unit.end, end)) - held
            unit.purged = False  # a page of it holds data again (if it did not already)
            if unit.pinned:
                self.pinned_pages += gained
                root.parked_pages += gained
                continue
            if unit not in order:
                root.queue(unit)
            self.volatile_pages += gained
            root.queued_pages += gained
        return written

    # -- cache-directory files ------------------------------------------------------
    def cache_join(self, ino: int, data: FileData, opens: int, kept: bool) -> None:
        """The file's every name is now in a cache directory: it may be evicted when unheld.

        Joining counts as a use: the file takes the newest place in the order.
        """
        if ino in self.cache_files:
            return
        cache_file = self.cache_files[ino] = CacheFile(ino, self.order.next_seq(), opens, kept)
        data.join(self.cache_pages)
        self._requeue(cache_file, data)

    def cache_leave(self, ino: int, data: FileData) -> None:
        """The file is no longer (wholly) in cache directories, or is going: never evict it."""
        cache_file = self.cache_files.pop(ino, None)
        if cache_file is not None:
            self.order.discard(cache_file)
            data.join(None)

    def cache_opened(self, ino: int) -> None:
        """An open of a cache-directory file: held, and the most recently used."""
        cache_file = self.cache_files.get(ino)
        if cache_file is not None:
            self.order.discard(cache_file)
            cache_file.opens += 1
            cache_file.seq = self.order.next_seq()

    def cache_closed(self, ino: int, data: FileData) -> None:
        """A handle of the file was released: evictable once the last one is."""
        cache_file = self.cache_files.get(ino)
        if cache_file is not None:
            cache_file.opens -= 1
            self._requeue(cache_file, data)

    def cache_keep(self, ino: int, data: FileData, kept: bool) -> None:
        """The file was marked non-volatile (kept) or volatile (evictable) as a whole."""
        cache_file = self.cache_files.get(ino)
        if cache_file is not None:
            cache_file.kept = kept
            self._requeue(cache_file, data)

    def cache_changed(self, ino: int, data: FileData) -> None:
        """Its pages changed while closed (a truncate): it may have nothing left to free."""
        cache_file = self.cache_files.get(ino)
        if cache_file is not None:
            self._requeue(cache_file, data)

    def _requeue(self, cache_file: CacheFile, data: FileData) -> None:
        """Queue the file if nothing holds it and it has pages; take it out otherwise."""
        cache_file.pinned = self.pins.of(cache_file.ino) is not None
        free = not (cache_file.opens or cache_file.kept or cache_file.pinned)
        if free and worth_evicting(data):
            if cache_file not in self.order:
                self.order.add(cache_file)
                heap = self._files_heap
                heapq.heappush(heap, (cache_file.seq, cache_file.ino, cache_file))
                if len(heap) > 64 and len(heap) > 2 * len(self.cache_files):
                    self._files_heap = [e for e in heap if self._queued_file(e)]
                    heapq.heapify(self._files_heap)
        else:
            self.order.discard(cache_file)

    def _queued_file(self, entry: tuple[int, int, CacheFile]) -> bool:
        seq, _, cache_file = entry
        return cache_file in self.order and cache_file.seq == seq

    def evict_file(self, cause: PurgeCause, spare: int | None = None) -> bool:
        """Evict the least recently used evictable cache file but *spare* (to make room for
        metadata: an inode, names, the budget); False if there is none."""
        heap = self._files_heap
        spared = None
        while heap:
            entry = heap[0]
            if not self._queued_file(entry):
                heapq.heappop(heap)
            elif entry[2].ino == spare:
                spared = heapq.heappop(heap)
            else:
                break
        victim = heapq.heappop(heap)[2] if heap else None
        if spared is not None:
            heapq.heappush(heap, spared)
        if victim is None:
            return False
        self._evict(victim, cause)
        return True

    def _evict(self, cache_file: CacheFile, cause: PurgeCause) -> int:
        """Evict a queued cache-directory file; returns the pages freed."""
        assert self._evict_file is not None and cache_file in self.order, cache_file
        ino = cache_file.ino
        data, _ = self._file_of(ino)
        pages = data.resident_pages
        names = self._evict_file(ino)  # calls forget(): the file leaves the order
        assert cache_file not in self.order and ino not in self.cache_files, cache_file
        self._evicted_files[cause] += 1
        self._evicted_pages[cause] += pages
        log.debug("evicted %r (%s): %d pages", cache_file, cause.value, pages)
        if self.listener is not None:
            self.listener.evicted(ino, cause, pages, names)
        if self.observer is not None:
            self.observer.evicted(ino, cause, pages, names)
        return pages

    # -- purging ----------------------------------------------------------
    def for_write(self, pages: int) -> int:
        """Make room for a write of *pages* new pages; returns the pages purged.

        Purges volatile units, least recently marked first, until the write
        fits under the cap, then goes on toward the low watermark by at most
        RECLAIM_EXTRA_PAGES and RECLAIM_EXTRA_UNITS more.  Non-volatile data is
        never touched.  The caller finds out from the page store whether the
        write now fits.
        """
        store = self.store
        freed = 0
        extra_units = 0
        must_free = pages - store.free_pages  # to fit under the hard cap
        want_free = store.used_pages + pages - self.low_pages
        want_free = min(want_free, max(must_free, 0) + RECLAIM_EXTRA_PAGES)
        while freed < max(must_free, want_free):
            if freed >= must_free:  # only the watermark wants more: bounded work
                extra_units += 1
                if extra_units > RECLAIM_EXTRA_UNITS:
                    break
            got = self._purge_oldest(PurgeCause.CAP)
            if got is None:
                break
            freed += got
        return freed

    def for_pressure(self, pages: int, purges: int | None = None) -> int:
        """Purge units, oldest mark first, until *pages* pages are freed or none is left,
        or *purges* units or files have gone (a step of a longer relief)."""
        freed = 0
        while freed < pages and purges != 0:
            got = self._purge_oldest(PurgeCause.PRESSURE)
            if got is None:
                break
            freed += got
            if purges is not None:
                purges -= 1
        return freed

    def purge_all(self) -> int:
        """Purge every volatile unit now (like ashmem's PURGE_ALL_CACHES); returns units."""
        units = 0
        for got in self.purging_all():
            units += got > 0
        return units

    def purging_all(self) -> Iterator[int]:
        """Purge-all as a job of small steps (one unit or file each, yielding its pages).

        What is marked or closed after it started is left alone, so that it ends
        however busy the mount is; between steps other requests may run.
        """
        started = self.order.next_seq()
        while (unit := self.order.oldest()) is not None and unit.seq < started:
            yield self._purge_oldest(PurgeCause.EXPLICIT) or 0

    def purge_unit(self, unit: PurgeUnit, cause: PurgeCause) -> int:
        """Discard one queued unit's resident pages; returns how many were freed."""
        data, root = self._file_of(unit.ino)
        assert root is not None and unit in self.order, f"{unit!r} is not purgeable"
        freed = data.purge(unit.start, unit.end)
        if not freed:  # its pages went otherwise (truncate, split): nothing to purge
            root.unqueue(unit)
            return 0
        self.volatile_pages -= freed
        root.queued_pages -= freed
        root.mark_purged(unit)
        self._purged_pages[cause] += freed
        self._purge_events[cause] += 1
        log.debug("purged %r (%s): %d pages", unit, cause.value, freed)
        if self.listener is not None:
            self.listener.purged(unit.ino, cause, freed)
        if self.observer is not None:
            self.observer.purged(unit, cause, freed)
        return freed

    def _purge_oldest(self, cause: PurgeCause) -> int | None:
        """Purge the least recently used unit or cache file; None if there is none."""
        unit = self.order.oldest()
        if unit is None:
            return None
        if isinstance(unit, CacheFile):
            return self._evict(unit, cause)
        return self.purge_unit(unit, cause)

    # -- introspection ------------------------------------------------------
    def statistics(self) -> ReclaimStats:
        """The counters as readers may see them: purges the listener holds back are left out."""
        stats = self._statistics()
        if self.listener is None:
            return stats
        return stats.minus(*self.listener.unpublished())

    def _statistics(self) -> ReclaimStats:
        store = self.store
        pins = self.pins
        return ReclaimStats(
            capacity_pages=store.capacity_pages,
            resident_pages=store.used_pages,
            volatile_pages=self.volatile_pages + self.pinned_pages,
            pinned_volatile_pages=self.pinned_pages,
            volatile_units=self.units,
            purgeable_units=len(self.order),
            high_pages=self.high_pages,
            low_pages=self.low_pages,
            purged_pages=dict(self._purged_pages),
            purge_events=dict(self._purge_events),
            pins=pins.pins,
            pinned_pages=pins.pinned_pages,
            pin_owners=pins.owners(),
            pins_released_by_exit=pins.released_by_exit,
            evicted_files=dict(self._evicted_files),
            evicted_pages=dict(self._evicted_pages),
            cache_dir_files=len(self.cache_files),
            cache_dir_pages=self.cache_pages.pages,
            oldest_age=self.order.oldest_age(),
        )

    def check_invariants(self, files: Iterable[tuple[FileData, VrangeRoot]]) -> None:
        """Assert the order and the counts agree with every file's units, pages and pins."""
        self.order.check_invariants()
        self.pins.check_invariants()
        queued = parked = units = 0
        for data, root in files:
            root.check_invariants()
            units += len(root)
            root_queued = root_parked = 0
            for unit in root.units():
                resident = data.resident_in(unit.start, unit.end)
                pinned = self.pins.covers(root.ino, unit.start, unit.end)
                assert unit.pinned == pinned, f"{unit!r}: pinned flag wrong"
                if unit in self.order:
                    root_queued += resident
                elif unit.pinned and not unit.purged:
                    root_parked += resident
                else:
                    assert not resident, f"{unit!r} holds pages but is not queued"
            assert root.queued_pages == root_queued, (root, root.queued_pages, root_queued)
            assert root.parked_pages == root_parked, (root, root.parked_pages, root_parked)
            queued += root_queued
            parked += root_parked
        assert queued == self.volatile_pages, (queued, self.volatile_pages)
        assert parked == self.pinned_pages, (parked, self.pinned_pages)
        assert units == self.units, (units, self.units)
