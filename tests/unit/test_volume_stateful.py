"""Random mark / unmark / write / truncate / purge / unlink / pin / unpin / process-exit
sequences on the volume, checked after every step against a plain per-page reference model.

The model knows nothing of interval trees, heaps or page slots: each file is a
list of pages (bytes, a hole or purged) and a list of units (a set of pages,
the mark sequence number, a purged flag); pins are a count per (file, pages,
process), charged to the process's user.  After every step the volume's
volatile ranges, purged ranges, resident pages, pins and file contents must be
what the model says, and the volume's own invariant check must pass.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vrangefs.errors import FsError
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import PurgeCause, nonvolatile_pages, pin_pages, volatile_pages
from vrangefs.volume import AttrChange, Caller, Volume

MAX_PAGES = 8
NAMES = (b"a", b"b")
CAP_PAGES = 64
PIN_LIMIT_PAGES = 12
PROCESSES = (101, 102, 103)  # tgids; 101 and 102 belong to the same user
UID_OF = {101: 1000, 102: 1000, 103: 1001}
ROOT = 1
CALLER = Caller(0, 0)
HOLE = None


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
        )
        self.released_by_exit = 0
        self.inos: dict[bytes, int] = {}
        self.model: dict[bytes, ModelFile] = {}
        self.seq = 0
        for name in NAMES:
            self._create(name)

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
            assert holding == []
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
        released = self.volume.release_owner(tgid)
        expected = 0
        for m in self.model.values():
            for key in [key for key in m.pins if key[2] == tgid]:
                expected += m.pins.pop(key)[0]
        assert released == expected
        self.released_by_exit += expected

    @rule(name=st.sampled_from(NAMES))
    def unlink_and_recreate(self, name: bytes) -> None:
        self.volume.unlink(ROOT, name)
        self.volume.forget(self.inos[name], 1)
        self._create(name)

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
        assert volume.store.used_pages == resident
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
        assert stats.pins == sum(c for m in self.model.values() for c, _ in m.pins.values())
        assert stats.pinned_volatile_pages == held_back
        assert stats.pins_released_by_exit == self.released_by_exit
        # The purge order: every unit that is not purged and holds pages, and only units
        # that are not purged, oldest mark first (split pieces keep their mark, in page
        # order); units that hold nothing leave it when reclaim reaches them.
        order = [(u.ino, u.start, u.end) for u in volume.reclaim.order]
        for ino, start, end in order:
            unit, name = self._model_unit(ino, start, end)
            assert not unit.purged and not self._pinned(name, unit)
        keys = [(self._model_unit(*entry)[0].seq, entry[1]) for entry in order]
        assert keys == sorted(keys)
        holding = {
            (self.inos[name], min(u.pages), max(u.pages) + 1)
            for name, m in self.model.items()
            for u in m.units
            if not u.purged and self._resident(name, u) and not self._pinned(name, u)
        }
        assert holding <= set(order)


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
