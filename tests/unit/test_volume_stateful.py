"""Random mark / unmark / write / truncate / purge / unlink / pin / unpin / process-exit
sequences on the volume, checked after every step against a plain per-page reference model.

The model knows nothing of interval trees, heaps or page slots: each file is a
list of pages (bytes, a hole or purged) and a list of units (a set of pages,
the mark sequence number, a purged flag); pins are a count per (file, pages,
process), charged to the process's user.  After every step the volume's
volatile ranges, purged ranges, resident pages, pins and file contents must be
what the model says, and the volume's own invariant check must pass.

Cache directories: files made, opened, closed, renamed and linked between a cache
directory ``c`` and an ordinary one ``o`` (either flag may be toggled), kept, unkept,
pinned, unlinked, and writes to an ordinary file ``w`` that force evictions.  The model
keeps each file's bytes, names, handles, pins, kept flag and last use; every purge or
eviction must take the oldest entry of the one order of units and unheld cache files
with pages, and no more of them than the write needs; evicted names stay ghosts until
the unlinker runs.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vrangefs import pagestore
from vrangefs.errors import FsError
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import PurgeCause, nonvolatile_pages, pin_pages, volatile_pages
from vrangefs.volume import AttrChange, Caller, Volume
from vrangefs.vrange import CacheFile, PurgeUnit

MAX_PAGES = 8
NAMES = (b"a", b"b")
CAP_PAGES = 64
PIN_LIMIT_PAGES = 12
PROCESSES = (101, 102, 103)  # tgids; 101 and 102 belong to the same user
UID_OF = {101: 1000, 102: 1000, 103: 1001}
ROOT = 1
CALLER = Caller(0, 0)
HOLE = None
# Cache directories: four places (directory label, name); pins by a process of their own.
DIRS = ("c", "o")
SLOTS = tuple((d, n) for d in DIRS for n in (b"x", b"y"))
CACHE_TGID = 104
CACHE_UID = 1002


class Purged:
    """Marker for a purged page in the model."""


PURGED = Purged()


@dataclass
class ModelUnit:
    pages: set[int]
    seq: int
    purged: bool = False


@dataclass
class ModelFile:
    size: int = 0
    pages: dict[int, bytes | Purged] = field(default_factory=dict)  # missing = hole
    units: list[ModelUnit] = field(default_factory=list)
    pins: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    """(start, end, tgid) -> [count, uid charged]"""

    def pinned_pages(self) -> set[int]:
        return {p for start, end, _ in self.pins for p in range(start, end)}


@dataclass(eq=False)
class CacheModel:
    """A regular file of the cache-directory rules: its bytes, names and what holds it."""

    ino: int
    names: set[tuple[str, bytes]]
    content: bytes = b""
    opens: int = 0
    kept: bool = False
    pins: int = 0
    seq: int = 0  # its last use (an open, or joining a cache directory) while a member

    @property
    def pages(self) -> int:
        return _ceil_pages(len(self.content))


class Observer:
    """Reclaim's observer: every purge (with its unit) and eviction, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[PurgeUnit | int, PurgeCause, int]] = []

    def purged(self, unit: PurgeUnit, cause: PurgeCause, pages: int) -> None:
        self.events.append((unit, cause, pages))

    def evicted(
        self, ino: int, cause: PurgeCause, pages: int, names: list[tuple[int, bytes]]
    ) -> None:
        self.events.append((ino, cause, pages))

    def statistics(self) -> dict[str, int | str]:
        return {}

    def take(self) -> list[tuple[PurgeUnit | int, PurgeCause, int]]:
        events, self.events = self.events, []
        return events


# Mostly page-aligned values (where units begin and end), some arbitrary ones (rounding).
offsets = st.one_of(
    st.integers(0, MAX_PAGES).map(lambda p: p * PAGE_SIZE), st.integers(0, MAX_PAGES * PAGE_SIZE)
)
lengths = st.one_of(
    st.just(0),
    st.integers(1, 3).map(lambda p: p * PAGE_SIZE),
    st.integers(0, 3 * PAGE_SIZE),
)


class VolumeMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.volume = Volume(
            PageStore(CAP_PAGES * PAGE_SIZE),
            max_inodes=100,
            pin_limit=PIN_LIMIT_PAGES * PAGE_SIZE,
            low_watermark=1.0,  # a write at the cap purges what it needs, no more
        )
        # Every freed file's table waits for the reaper (PageStore.defer), as a big one
        # does in the daemon: writes take their slots out of it (see reaper_runs).
        self._free_at_once = pagestore.FREE_AT_ONCE
        pagestore.FREE_AT_ONCE = 0
        self.volume.store.on_returning = lambda: None
        self.released_by_exit = 0
        # Exits being released step by step, as the daemon's reaper does (see
        # process_exit_steps); the daemon holds back the pid's pin requests meanwhile.
        self.exiting: dict[int, Iterator[int]] = {}
        self.inos: dict[bytes, int] = {}
        self.model: dict[bytes, ModelFile] = {}
        self.seq = 0
        for name in NAMES:
            self._create(name)
        volume = self.volume
        self.observer = Observer()
        volume.reclaim.observer = self.observer
        self.dir_ino = {d: volume.mkdir(ROOT, d.encode(), 0o755, CALLER).ino for d in DIRS}
        volume.set_cache_dir(self.dir_ino["c"], True)
        self.flags = {"c": True, "o": False}
        self.w = volume.create(ROOT, b"w", 0o644, CALLER).ino  # open for good, empty between steps
        self.slots: dict[tuple[str, bytes], CacheModel] = {}
        self.ghosts: dict[tuple[str, bytes], int] = {}
        self.evicted_inos: set[int] = set()
        self.evicted = {c: [0, 0] for c in PurgeCause}  # cause -> [files, pages]
        # Closed files in both directories from the start, so that purges find some.
        for slot, length in ((("c", b"x"), 2 * PAGE_SIZE), (("c", b"y"), 3 * PAGE_SIZE)):
            self.cache_write(slot, length, 0x63, keep_open=False)
        self.cache_write(("o", b"x"), PAGE_SIZE, 0x6F, keep_open=False)

    def teardown(self) -> None:
        pagestore.FREE_AT_ONCE = getattr(self, "_free_at_once", pagestore.FREE_AT_ONCE)

    def _create(self, name: bytes) -> None:
        inode = self.volume.create(ROOT, name, 0o644, CALLER)
        self.volume.release(inode.ino)
        self.inos[name] = inode.ino
        self.model[name] = ModelFile()

    # -- rules -------------------------------------------------------------------------
    @rule(
        name=st.sampled_from(NAMES),
        off=offsets,
        length=st.integers(1, 3 * PAGE_SIZE),
        byte=st.integers(1, 255),
    )
    def write(self, name: bytes, off: int, length: int, byte: int) -> None:
        m = self.model[name]
        first, last = off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE
        new_pages = sum(1 for p in range(first, last + 1) if not isinstance(m.pages.get(p), bytes))
        if self.volume.store.used_pages + new_pages > self.volume.store.capacity_pages:
            return  # eviction at the cap has its own tests; keep this model simple
        self.volume.write(self.inos[name], off, bytes([byte]) * length)
        for p in range(first, last + 1):
            old = m.pages.get(p)
            page = bytearray(old if isinstance(old, bytes) else bytes(PAGE_SIZE))
            lo = max(off, p * PAGE_SIZE) - p * PAGE_SIZE
            hi = min(off + length, (p + 1) * PAGE_SIZE) - p * PAGE_SIZE
            page[lo:hi] = bytes([byte]) * (hi - lo)
            m.pages[p] = bytes(page)
            for unit in m.units:
                if p in unit.pages:
                    unit.purged = False  # written again: purgeable again
        m.size = max(m.size, off + length)

    @rule(
        name=st.sampled_from(NAMES),
        off=st.integers(0, MAX_PAGES - 1).map(lambda p: p * PAGE_SIZE),
        pages=st.integers(1, 4),
        byte=st.integers(1, 255),
    )
    def write_volatile(self, name: bytes, off: int, pages: int, byte: int) -> None:
        """Write whole pages and mark them volatile: units with data, for pins to hold."""
        self.write(name, off, pages * PAGE_SIZE, byte)
        self.mark_volatile(name, off, pages * PAGE_SIZE)

    @rule(name=st.sampled_from(NAMES), size=st.integers(0, MAX_PAGES * PAGE_SIZE))
    def truncate(self, name: bytes, size: int) -> None:
        self.volume.setattr(self.inos[name], AttrChange(size=size))
        m = self.model[name]
        keep = -(-size // PAGE_SIZE)
        for p in [p for p in m.pages if p >= keep]:
            del m.pages[p]
        tail = size % PAGE_SIZE
        last = m.pages.get(size // PAGE_SIZE)
        if tail and isinstance(last, bytes) and size < m.size:
            m.pages[size // PAGE_SIZE] = last[:tail] + bytes(PAGE_SIZE - tail)
        self._cut(m, keep, 1 << 40)
        m.size = size

    @rule(name=st.sampled_from(NAMES), off=offsets, length=lengths)
    def mark_volatile(self, name: bytes, off: int, length: int) -> None:
        m = self.model[name]
        self.volume.mark_volatile(self.inos[name], off, length)
        pages = volatile_pages(off, length, m.size)
        if pages is None:
            return
        new = set(range(*pages))
        merged = [u for u in m.units if u.pages & new]
        for u in merged:
            new |= u.pages
            m.units.remove(u)
        self.seq += 1
        m.units.append(ModelUnit(new, self.seq))

    @rule(name=st.sampled_from(NAMES), off=offsets, length=lengths)
    def mark_nonvolatile(self, name: bytes, off: int, length: int) -> None:
        m = self.model[name]
        purged = self.volume.mark_nonvolatile(self.inos[name], off, length)
        pages = nonvolatile_pages(off, length, m.size)
        if pages is None:
            assert purged == []
            return
        self._cut(m, *pages)
        expected = [
            (p * PAGE_SIZE, min(PAGE_SIZE, m.size - p * PAGE_SIZE))
            for p in range(*pages)
            if m.pages.get(p) is PURGED
        ]
        assert _merge(purged) == _merge(expected)

    @staticmethod
    def _cut(m: ModelFile, start: int, end: int) -> None:
        """Remove pages [start, end) from the units; split pieces keep seq and flag."""
        out = []
        for u in m.units:
            left = {p for p in u.pages if p < start}
            right = {p for p in u.pages if p >= end}
            out += [ModelUnit(piece, u.seq, u.purged) for piece in (left, right) if piece]
        m.units[:] = out

    def _resident(self, name: bytes, unit: ModelUnit) -> bool:
        pages = self.model[name].pages
        return any(isinstance(pages.get(p), bytes) for p in unit.pages)

    def _model_unit(self, ino: int, start: int, end: int) -> tuple[ModelUnit, bytes]:
        [found] = [
            (u, name)
            for name, m in self.model.items()
            if self.inos[name] == ino
            for u in m.units
            if u.pages == set(range(start, end))
        ]
        return found

    @rule()
    def purge_oldest(self) -> None:
        reclaim = self.volume.reclaim
        unit = reclaim.order.oldest()
        holding = [
            (u, name)
            for name, m in self.model.items()
            for u in m.units
            if not u.purged and self._resident(name, u) and not self._pinned(name, u)
        ]
        if unit is None:
            assert holding == [] and self._candidates() == []
            return
        if isinstance(unit, CacheFile):
            self._reclaiming(lambda: reclaim.for_pressure(1), PurgeCause.PRESSURE, 1)
            return
        model_unit, name = self._model_unit(unit.ino, unit.start, unit.end)
        assert not model_unit.purged and not self._pinned(name, model_unit)
        # No unit marked earlier that holds pages is behind it in the order.
        key = (model_unit.seq, min(model_unit.pages))
        assert all((u.seq, min(u.pages)) >= key for u, _ in holding), "order skipped a unit"
        freed = reclaim.purge_unit(unit, PurgeCause.EXPLICIT)
        if not self._resident(name, model_unit):
            assert freed == 0 and unit not in reclaim.order  # held nothing: dropped
            return
        assert freed > 0
        self.observer.take()
        self._purged(model_unit, name)

    def _purged(self, model_unit: ModelUnit, name: bytes) -> None:
        model_unit.purged = True
        m = self.model[name]
        for p in model_unit.pages:
            if isinstance(m.pages.get(p), bytes):
                m.pages[p] = PURGED

    def _pinned(self, name: bytes, unit: ModelUnit) -> bool:
        return bool(unit.pages & self.model[name].pinned_pages())

    def _charged(self, uid: int) -> int:
        return sum(
            end - start
            for m in self.model.values()
            for (start, end, _), (_, charged) in m.pins.items()
            if charged == uid
        )

    @rule(
        name=st.sampled_from(NAMES),
        off=offsets,
        length=lengths,
        tgid=st.sampled_from(PROCESSES),
    )
    def pin(self, name: bytes, off: int, length: int, tgid: int) -> None:
        if tgid in self.exiting:
            return
        m = self.model[name]
        uid = UID_OF[tgid]
        pages = pin_pages(off, length, m.size)
        key = None if pages is None else (*pages, tgid)
        over = (
            key is not None
            and key not in m.pins
            and self._charged(uid) + key[1] - key[0] > PIN_LIMIT_PAGES
        )
        try:
            self.volume.pin(self.inos[name], off, length, tgid, uid)
        except FsError as e:
            assert e.errno == errno.EDQUOT and over, e
            return
        assert not over
        if key is not None:
            m.pins.setdefault(key, [0, uid])[0] += 1

    @rule(
        name=st.sampled_from(NAMES),
        off=offsets,
        length=lengths,
        tgid=st.sampled_from(PROCESSES),
    )
    def unpin(self, name: bytes, off: int, length: int, tgid: int) -> None:
        if tgid in self.exiting:
            return
        m = self.model[name]
        pages = pin_pages(off, length, m.size)
        key = None if pages is None else (*pages, tgid)
        try:
            self.volume.unpin(self.inos[name], off, length, tgid)
        except FsError as e:
            assert e.errno == errno.ENOENT and key is not None and key not in m.pins, e
            return
        if key is not None:
            pin = m.pins[key]
            pin[0] -= 1
            if not pin[0]:
                del m.pins[key]

    @rule(name=st.sampled_from(NAMES), tgid=st.sampled_from(PROCESSES))
    def unpin_as_listed(self, name: bytes, tgid: int) -> None:
        """Unpin one of the process's pins by the range user.vrange.pins shows."""
        if tgid in self.exiting:
            return
        m = self.model[name]
        mine = sorted(key for key in m.pins if key[2] == tgid)
        if not mine:
            return
        start, end, _ = mine[0]
        self.volume.unpin(self.inos[name], start * PAGE_SIZE, (end - start) * PAGE_SIZE, tgid)
        m.pins[mine[0]][0] -= 1
        if not m.pins[mine[0]][0]:
            del m.pins[mine[0]]

    @rule(tgid=st.sampled_from(PROCESSES))
    def process_exits(self, tgid: int) -> None:
        if tgid in self.exiting:
            self.process_exit_steps(tgid, len(PROCESSES) * 1000)
            return
        released = self.volume.release_owner(tgid)
        expected = 0
        for m in self.model.values():
            for key in [key for key in m.pins if key[2] == tgid]:
                expected += m.pins.pop(key)[0]
        assert released == expected
        self.released_by_exit += expected

    @rule(tgid=st.sampled_from(PROCESSES), steps=st.integers(1, 3))
    def process_exit_steps(self, tgid: int, steps: int) -> None:
        """The daemon's way: an exit is released one pin per step here, with other
        rules in between; the pins not released yet still hold their pages."""
        job = self.exiting.get(tgid)
        if job is None:
            job = self.exiting[tgid] = self.volume.reclaim.releasing_owner(tgid, per_step=1)
        for _ in range(steps):
            released = next(job, None)
            if released is None:
                del self.exiting[tgid]
                return
            gone = 0
            for name, m in self.model.items():
                held = {
                    (p.start, p.end, p.tgid): p.count
                    for p in self.volume.pins(self.inos[name])
                    if p.tgid == tgid
                }
                for key in [key for key in m.pins if key[2] == tgid]:
                    if key in held:
                        assert held[key] == m.pins[key][0]
                    else:
                        gone += m.pins.pop(key)[0]
            assert gone == released
            self.released_by_exit += released

    @rule(name=st.sampled_from(NAMES))
    def unlink_and_recreate(self, name: bytes) -> None:
        self.volume.unlink(ROOT, name)
        self.volume.forget(self.inos[name], 1)
        self._create(name)

    # -- cache directories ---------------------------------------------------------------
    def _tick(self) -> int:
        self.seq += 1
        return self.seq

    def _files(self) -> list[CacheModel]:
        """The cache-rule files that have a name, each once."""
        return list({id(f): f for f in self.slots.values()}.values())

    def _member(self, f: CacheModel) -> bool:
        return bool(f.names) and all(self.flags[d] for d, _ in f.names)

    def _queued(self, f: CacheModel) -> bool:
        return self._member(f) and not (f.opens or f.kept or f.pins) and f.pages > 0

    def _membership(self) -> dict[int, bool]:
        return {f.ino: self._member(f) for f in self._files()}

    def _joined(self, before: dict[int, bool]) -> None:
        """Files that have just become members took the newest place in the order (those
        of one toggle share it: the model does not know the directory's entry order)."""
        joined = [f for f in self._files() if self._member(f) and not before.get(f.ino, False)]
        if joined:
            seq = self._tick()
            for f in joined:
                f.seq = seq

    def _opened(self, f: CacheModel) -> None:
        f.opens += 1
        if self._member(f):
            f.seq = self._tick()

    def _close(self, f: CacheModel) -> None:
        self.volume.release(f.ino)
        f.opens -= 1

    def _gone_if_nameless(self, f: CacheModel) -> None:
        """Its last name went: the kernel forgets it and its handles close; it is freed."""
        if f.names:
            return
        inode = self.volume.inodes.get(f.ino)
        assert inode is not None and not inode.evicted
        self.volume.forget(f.ino, inode.lookups)
        while f.opens:
            self._close(f)
        assert self.volume.inodes.get(f.ino) is None

    def _unit_key(self, u: PurgeUnit) -> tuple[int, int]:
        unit, _ = self._model_unit(u.ino, u.start, u.end)
        return unit.seq, min(unit.pages)

    def _candidates(self) -> list[tuple[int, int]]:
        """The keys of everything a purge may take: units and unheld cache files."""
        keys = [
            (u.seq, min(u.pages))
            for name, m in self.model.items()
            for u in m.units
            if not u.purged and self._resident(name, u) and not self._pinned(name, u)
        ]
        return keys + [(f.seq, 0) for f in self._files() if self._queued(f)]

    def _reclaiming(self, action: Callable[[], object], cause: PurgeCause, must_free: int) -> bool:
        """Run *action*, which purges for *must_free* pages; check every purge and eviction
        against the model as it was then (the oldest entry, no more than needed) and apply it.
        Returns False if the action failed with ENOSPC, which it may only with nothing left."""
        try:
            action()
            failed = False
        except FsError as e:
            assert e.errno == errno.ENOSPC, e
            failed = True
        freed = 0
        for what, got_cause, pages in self.observer.take():
            assert got_cause is cause
            assert freed < must_free, "purged more than needed"
            candidates = self._candidates()
            assert candidates, "purged when nothing was purgeable"
            if isinstance(what, int):
                [f] = [f for f in self._files() if f.ino == what]
                assert self._queued(f), f"evicted a held or ordinary file: {f}"
                assert (f.seq, 0) == min(candidates), "evicted out of order"
                assert pages == f.pages
                self._evict(f, cause)
            else:
                unit, name = self._model_unit(what.ino, what.start, what.end)
                assert (unit.seq, min(unit.pages)) == min(candidates), "purged out of order"
                self._purged(unit, name)
            freed += pages
        if failed:
            assert freed < must_free and self._candidates() == []
        elif freed < must_free:  # only a purge of all there is may stop short
            assert cause is not PurgeCause.CAP and self._candidates() == []
        return not failed

    def _evict(self, f: CacheModel, cause: PurgeCause) -> None:
        for slot in f.names:
            del self.slots[slot]
            self.ghosts[slot] = f.ino
        self.evicted_inos.add(f.ino)
        self.evicted[cause][0] += 1
        self.evicted[cause][1] += f.pages
        inode = self.volume.inodes.get(f.ino)
        assert inode is not None and inode.evicted
        self.volume.forget(f.ino, inode.lookups)  # the kernel drops it; its ghosts hold it

    def _place(self, slot: tuple[str, bytes]) -> tuple[int, bytes]:
        return self.dir_ino[slot[0]], slot[1]

    @rule(
        slot=st.sampled_from(SLOTS),
        length=st.one_of(
            st.integers(0, 8).map(lambda p: p * PAGE_SIZE), st.integers(2, 8 * PAGE_SIZE)
        ),
        byte=st.integers(1, 255),
        keep_open=st.sampled_from((False, False, True)),
    )
    def cache_write(self, slot: tuple[str, bytes], length: int, byte: int, keep_open: bool) -> None:
        """Make a file or open one with O_TRUNC, write it whole, close it or keep it open.
        (Length 1 is left out: cache_unkeep could not take back a one-page mark of it.)"""
        volume = self.volume
        f = self.slots.get(slot)
        if f is None:
            before = self._membership()
            f = CacheModel(volume.create(*self._place(slot), 0o644, CALLER).ino, {slot})
            self.ghosts.pop(slot, None)  # a ghost's name made again: buried
            self.slots[slot] = f
            self._joined(before)
        else:
            volume.open(f.ino, os.O_WRONLY | os.O_TRUNC)
            f.content = b""
        self._opened(f)
        buf = bytes([byte]) * length
        ino = f.ino
        if self._reclaiming(
            lambda: volume.write(ino, 0, buf),
            PurgeCause.CAP,
            _ceil_pages(length) - volume.store.free_pages,
        ):
            f.content = buf
        if not keep_open:
            self._close(f)

    @rule(slot=st.sampled_from(SLOTS))
    def cache_open(self, slot: tuple[str, bytes]) -> None:
        f = self.slots.get(slot)
        if f is not None:
            self.volume.open(f.ino, os.O_RDONLY)
            self._opened(f)

    @rule(slot=st.sampled_from(SLOTS))
    def cache_close(self, slot: tuple[str, bytes]) -> None:
        f = self.slots.get(slot)
        if f is not None and f.opens:
            self._close(f)

    @rule(src=st.sampled_from(SLOTS), dst=st.sampled_from(SLOTS))
    def cache_rename(self, src: tuple[str, bytes], dst: tuple[str, bytes]) -> None:
        f = self.slots.get(src)
        if f is None:
            return
        target = self.slots.get(dst)
        before = self._membership()
        self.volume.rename(*self._place(src), *self._place(dst), 0)
        if target is f:
            return  # two names of one file (or the same name): nothing happens
        self.ghosts.pop(dst, None)
        del self.slots[src]
        f.names.remove(src)
        f.names.add(dst)
        self.slots[dst] = f
        if target is not None:
            target.names.remove(dst)
        self._joined(before)
        if target is not None:
            self._gone_if_nameless(target)

    @rule(src=st.sampled_from(SLOTS), dst=st.sampled_from(SLOTS))
    def cache_link(self, src: tuple[str, bytes], dst: tuple[str, bytes]) -> None:
        f = self.slots.get(src)
        if f is None or dst in self.slots:
            return
        self.volume.link(f.ino, *self._place(dst))
        self.ghosts.pop(dst, None)
        f.names.add(dst)
        self.slots[dst] = f

    @rule(slot=st.sampled_from(SLOTS))
    def cache_unlink(self, slot: tuple[str, bytes]) -> None:
        f = self.slots.get(slot)
        if f is None:
            return
        before = self._membership()
        self.volume.unlink(*self._place(slot))
        del self.slots[slot]
        f.names.remove(slot)
        self._joined(before)
        self._gone_if_nameless(f)

    @rule(slot=st.sampled_from(SLOTS))
    def cache_keep(self, slot: tuple[str, bytes]) -> None:
        f = self.slots.get(slot)
        if f is not None:
            assert self.volume.mark_nonvolatile(f.ino, 0, 0) == []
            f.kept = True

    @rule(slot=st.sampled_from(SLOTS))
    def cache_unkeep(self, slot: tuple[str, bytes]) -> None:
        """Mark the whole file volatile, then take the unit that made back with a mark that
        is not of the whole file (ranges inside cache files: see test_cache_dirs.py)."""
        f = self.slots.get(slot)
        if f is not None:
            self.volume.mark_volatile(f.ino, 0, 0)
            self.volume.mark_nonvolatile(f.ino, 1, 0)
            assert list(self.volume.volatile_ranges(f.ino)) == []
            f.kept = False

    @rule(slot=st.sampled_from(SLOTS))
    def cache_pin(self, slot: tuple[str, bytes]) -> None:
        f = self.slots.get(slot)
        if f is not None:
            self.volume.pin(f.ino, 0, PAGE_SIZE, CACHE_TGID, CACHE_UID)
            f.pins += 1

    @rule(slot=st.sampled_from(SLOTS))
    def cache_unpin(self, slot: tuple[str, bytes]) -> None:
        f = self.slots.get(slot)
        if f is None:
            return
        try:
            self.volume.unpin(f.ino, 0, PAGE_SIZE, CACHE_TGID)
        except FsError as e:
            assert e.errno == errno.ENOENT and not f.pins, e
            return
        f.pins -= 1

    @rule()
    def cache_process_exits(self) -> None:
        expected = sum(f.pins for f in self._files())
        assert self.volume.release_owner(CACHE_TGID) == expected
        for f in self._files():
            f.pins = 0
        self.released_by_exit += expected

    @rule(d=st.sampled_from(DIRS))
    def toggle_cache_dir(self, d: str) -> None:
        before = self._membership()
        self.flags[d] = not self.flags[d]
        self.volume.set_cache_dir(self.dir_ino[d], self.flags[d])
        assert self.volume.is_cache_dir(self.dir_ino[d]) == self.flags[d]
        self._joined(before)

    @rule(short=st.integers(1, 8))
    def force_write(self, short: int) -> None:
        """An ordinary file's write *short* pages longer than what is free: it purges and
        evicts what it needs (or fails with ENOSPC, having taken everything there was)."""
        volume = self.volume
        pages = volume.store.free_pages + short
        self._reclaiming(
            lambda: volume.write(self.w, 0, b"w" * pages * PAGE_SIZE), PurgeCause.CAP, short
        )
        volume.setattr(self.w, AttrChange(size=0))

    @rule(pages=st.integers(1, 8))
    def pressure(self, pages: int) -> None:
        reclaim = self.volume.reclaim
        self._reclaiming(lambda: reclaim.for_pressure(pages), PurgeCause.PRESSURE, pages)

    @rule()
    def purge_all(self) -> None:
        reclaim = self.volume.reclaim
        self._reclaiming(reclaim.purge_all, PurgeCause.EXPLICIT, CAP_PAGES + 1)

    @rule(chunks=st.integers(1, 3), pages=st.integers(1, 16))
    def reaper_runs(self, chunks: int, pages: int) -> None:
        """A step of the daemon's reaper: tables of freed files let go of, memory returned."""
        store = self.volume.store
        store.free_pending(chunks)
        store.return_some(pages)

    @rule()
    def unlinker_runs(self) -> None:
        """The daemon's unlinker catches up: every ghost name is unlinked, inodes freed."""
        for slot in sorted(self.ghosts):
            assert self.volume.ghost_unlink(*self._place(slot))
        self.ghosts.clear()

    def _check_cache_files(self) -> None:
        volume = self.volume
        for d in DIRS:
            entries = volume.inode(self.dir_ino[d]).dir.entries  # type: ignore[union-attr]
            assert entries == {n: f.ino for (dd, n), f in self.slots.items() if dd == d}
        assert volume.ghosts == {self._place(slot): ino for slot, ino in self.ghosts.items()}
        members = [f for f in self._files() if self._member(f)]
        for f in self._files():
            assert volume.inode(f.ino).nlink == len(f.names)
            assert bytes(volume.read(f.ino, 0, len(f.content) + 1)) == f.content, f
        for ino in self.evicted_inos:
            lingers = volume.inodes.get(ino) is not None
            assert lingers == (ino in self.ghosts.values())
            if lingers:
                try:
                    volume.inode(ino)
                except FsError as e:
                    assert e.errno == errno.ESTALE
                else:
                    raise AssertionError(f"evicted inode {ino} answers")
        stats = volume.reclaim.statistics()
        assert stats.cache_dir_files == len(members)
        assert stats.cache_dir_pages == sum(f.pages for f in members)
        assert stats.evicted_files == {c: n for c, (n, _) in self.evicted.items()}
        assert stats.evicted_pages == {c: n for c, (_, n) in self.evicted.items()}

    # -- checks ------------------------------------------------------------------------
    @invariant()
    def agrees_with_model(self) -> None:
        volume = self.volume
        volume.check_invariants()
        resident = 0
        for name, m in self.model.items():
            ino = self.inos[name]
            assert volume.inode(ino).size == m.size
            units = sorted(
                (min(u.pages) * PAGE_SIZE, min(max(u.pages) * PAGE_SIZE + PAGE_SIZE, m.size))
                for u in m.units
            )
            got_units = [(o, o + n) for o, n in list(volume.volatile_ranges(ino))]
            assert got_units == [(a, b) for a, b in units if a < b]
            purged = [
                (p * PAGE_SIZE, min(PAGE_SIZE, m.size - p * PAGE_SIZE))
                for p in sorted(m.pages)
                if m.pages[p] is PURGED and p * PAGE_SIZE < m.size
            ]
            assert _merge(list(volume.purged_ranges(ino))) == _merge(purged)
            resident += sum(1 for page in m.pages.values() if isinstance(page, bytes))
            for p in range(-(-m.size // PAGE_SIZE)):
                want = m.pages.get(p, HOLE)
                n = min(PAGE_SIZE, m.size - p * PAGE_SIZE)
                try:
                    got = bytes(volume.read(ino, p * PAGE_SIZE, n))
                except FsError as e:
                    assert e.errno == errno.EIO and want is PURGED, (name, p)
                    continue
                assert want is not PURGED, (name, p)
                assert got == (want[:n] if isinstance(want, bytes) else bytes(n)), (name, p)
        resident += sum(f.pages for f in self._files())
        assert volume.store.used_pages == resident
        self._check_cache_files()
        # Pins: the listing, the counts, and what pins hold back.
        held_back = 0
        for name, m in self.model.items():
            listed = volume.pins(self.inos[name])
            assert [(p.start, p.end, p.tgid, p.count) for p in listed] == sorted(
                (*key, count) for key, (count, _) in m.pins.items()
            )
            held_back += sum(
                1
                for u in m.units
                if not u.purged and self._pinned(name, u)
                for p in u.pages
                if isinstance(m.pages.get(p), bytes)
            )
        stats = volume.reclaim.statistics()
        assert stats.pins == sum(c for m in self.model.values() for c, _ in m.pins.values()) + sum(
            f.pins for f in self._files()
        )
        assert stats.pinned_volatile_pages == held_back
        assert stats.pins_released_by_exit == self.released_by_exit
        # The purge order: every unit that is not purged and holds pages, and only units
        # that are not purged, oldest mark first (split pieces keep their mark, in page
        # order); units that hold nothing leave it when reclaim reaches them.
        # Cache files share it, each at its last use, queued while unheld and holding pages.
        entries = list(volume.reclaim.order)
        order = [(u.ino, u.start, u.end) for u in entries if not isinstance(u, CacheFile)]
        for ino, start, end in order:
            unit, name = self._model_unit(ino, start, end)
            assert not unit.purged and not self._pinned(name, unit)
        files = {f.ino: f for f in self._files()}
        assert {u.ino for u in entries if isinstance(u, CacheFile)} == {
            f.ino for f in files.values() if self._queued(f)
        }
        keys = [
            (files[u.ino].seq, 0) if isinstance(u, CacheFile) else self._unit_key(u)
            for u in entries
        ]
        assert keys == sorted(keys)
        holding = {
            (self.inos[name], min(u.pages), max(u.pages) + 1)
            for name, m in self.model.items()
            for u in m.units
            if not u.purged and self._resident(name, u) and not self._pinned(name, u)
        }
        assert holding <= set(order)


def _ceil_pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Coalesce adjacent (offset, length) ranges, to compare page lists with runs."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


VolumeMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestVolumeStateful = VolumeMachine.TestCase
