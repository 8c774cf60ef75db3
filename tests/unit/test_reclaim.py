"""Reclaim: units that hold nothing cost nothing; purges are reported as they happen."""

from __future__ import annotations

from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import PurgeCause
from vrangefs.volume import AttrChange, Caller, Volume

ROOT = Caller(0, 0)


class Recorder:
    """A purge listener that remembers what it was told and holds nothing back."""

    def __init__(self) -> None:
        self.purges: list[tuple[int, PurgeCause, int]] = []
        self.evictions: list[tuple[int, PurgeCause, int, list[tuple[int, bytes]]]] = []

    def purged(self, ino: int, cause: PurgeCause, pages: int) -> None:
        self.purges.append((ino, cause, pages))

    def evicted(
        self, ino: int, cause: PurgeCause, pages: int, names: list[tuple[int, bytes]]
    ) -> None:
        self.evictions.append((ino, cause, pages, names))

    def unpublished(self) -> tuple[dict[PurgeCause, int], dict[PurgeCause, int]]:
        return {}, {}


def new_file(vol: Volume, name: bytes) -> int:
    inode = vol.create(ROOT_INO, name, 0o644, ROOT)
    vol.release(inode.ino)
    return inode.ino


def test_units_over_holes_stay_out_of_the_purge_order() -> None:
    """20,000 one-page units over holes: none is queued, a write at the cap purges only the
    unit that holds pages, and purge-all counts no event for the empty ones."""
    vol = Volume(PageStore(64 * PAGE_SIZE), low_watermark=1.0)
    recorder = Recorder()
    vol.reclaim.listener = recorder
    sparse = new_file(vol, b"sparse")
    vol.setattr(sparse, AttrChange(size=100_000 * 2 * PAGE_SIZE))
    for i in range(20_000):
        vol.mark_volatile(sparse, 2 * i * PAGE_SIZE, PAGE_SIZE)
    data = new_file(vol, b"data")
    vol.write(data, 0, b"d" * 64 * PAGE_SIZE)
    vol.mark_volatile(data, 0, 0)
    stats = vol.reclaim.statistics()
    assert (stats.volatile_units, stats.purgeable_units) == (20_001, 1)
    assert len(vol.reclaim.order) == 1

    other = new_file(vol, b"other")
    vol.write(other, 0, b"o" * PAGE_SIZE)  # at the cap: the data unit goes, nothing else
    assert recorder.purges == [(data, PurgeCause.CAP, 64)]
    vol.check_invariants()

    vol.write(sparse, 4 * PAGE_SIZE, b"s" * PAGE_SIZE)  # a unit over a hole gets a page
    assert vol.reclaim.statistics().purgeable_units == 1
    assert vol.reclaim.purge_all() == 1
    assert recorder.purges[-1] == (sparse, PurgeCause.EXPLICIT, 1)
    assert vol.reclaim.statistics().purge_events[PurgeCause.EXPLICIT] == 1
    vol.check_invariants()


def test_a_unit_emptied_by_truncate_leaves_the_order_when_reached() -> None:
    """A unit over holes and data, truncated down to its holes, is still queued (it lost
    its pages behind reclaim's back); reclaim drops it when it gets there, no event."""
    vol = Volume(PageStore(16 * PAGE_SIZE))
    recorder = Recorder()
    vol.reclaim.listener = recorder
    f = new_file(vol, b"f")
    vol.write(f, 4 * PAGE_SIZE, b"a" * 4 * PAGE_SIZE)  # pages 0..3 holes, 4..7 data
    vol.mark_volatile(f, 0, 0)
    assert vol.reclaim.statistics().purgeable_units == 1
    vol.setattr(f, AttrChange(size=4 * PAGE_SIZE))  # the unit keeps pages 0..3: holes
    vol.check_invariants()
    assert vol.reclaim.purge_all() == 0
    assert recorder.purges == []
    stats = vol.reclaim.statistics()
    assert (stats.volatile_units, stats.purgeable_units) == (1, 0)
    assert stats.purge_events[PurgeCause.EXPLICIT] == 0
    vol.write(f, 0, b"b")  # a page again: purgeable again
    assert vol.reclaim.purge_all() == 1
    assert recorder.purges == [(f, PurgeCause.EXPLICIT, 1)]
    vol.check_invariants()
