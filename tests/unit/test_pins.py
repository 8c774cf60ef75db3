"""Pins: the table (counted, owned, charged) and how reclaim parks the units they hold."""

from __future__ import annotations

import errno

import pytest

from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.pins import NotPinnedError, PinInfo, PinLimitError, PinTable
from vrangefs.protocol import PinLine, PurgeCause, RangeError, format_pins, parse_pins, pin_pages
from vrangefs.volume import Caller, Volume

P = PAGE_SIZE
ROOT = Caller(0, 0)
A, B = 1001, 1002  # two processes
UID = 1000


class Gone:
    """A pin listener that records the owners that no longer hold pins."""

    def __init__(self) -> None:
        self.owners: list[int] = []

    def owner_gone(self, tgid: int) -> None:
        self.owners.append(tgid)


# -- the table -------------------------------------------------------------------------------
def test_pins_are_counted_per_process_and_range() -> None:
    table = PinTable()
    assert table.pin(7, 0, 4, A, UID) is True
    assert table.pin(7, 0, 4, A, UID) is False  # counted, same pages
    assert table.pin(7, 0, 4, B, UID) is True  # another owner: a pin of its own
    assert table.of(7) is not None
    assert table.of(7).listing() == [PinInfo(0, 4, A, 2), PinInfo(0, 4, B, 1)]  # type: ignore[union-attr]
    assert table.pins == 3
    assert table.unpin(7, 0, 4, A) is False
    assert table.unpin(7, 0, 4, A) is True  # the second unpin releases A's range
    assert table.covers(7, 0, 4)  # B still holds it
    assert table.unpin(7, 0, 4, B) is True
    assert not table.covers(7, 0, 4)
    assert table.pins == table.pinned_pages == 0
    assert table.of(7) is None and not table.holds(A)
    table.check_invariants()


@pytest.mark.parametrize(
    ("ino", "start", "end", "tgid"),
    [(7, 0, 4, B), (7, 0, 3, A), (7, 1, 4, A), (8, 0, 4, A)],
    ids=["other process", "shorter", "inside", "other inode"],
)
def test_unpin_of_what_is_not_held_fails_and_changes_nothing(
    ino: int, start: int, end: int, tgid: int
) -> None:
    table = PinTable()
    table.pin(7, 0, 4, A, UID)
    with pytest.raises(NotPinnedError):
        table.unpin(ino, start, end, tgid)
    assert table.of(7).listing() == [PinInfo(0, 4, A, 1)]  # type: ignore[union-attr]
    assert (table.pins, table.pinned_pages, table.charged_pages(UID)) == (1, 4, 4)
    table.check_invariants()


def test_covers_finds_any_overlap() -> None:
    table = PinTable()
    table.pin(1, 10, 20, A, UID)
    table.pin(1, 15, 30, B, UID)
    table.pin(1, 100, 101, A, UID)
    assert table.covers(1, 0, 11) and table.covers(1, 19, 25) and table.covers(1, 29, 31)
    assert table.covers(1, 100, 101) and table.covers(1, 0, 1000)
    assert not table.covers(1, 0, 10) and not table.covers(1, 30, 100)
    assert not table.covers(1, 101, 200) and not table.covers(2, 0, 1000)


def test_the_per_user_limit_counts_each_range_once_and_refunds() -> None:
    table = PinTable(limit_pages=10)
    table.pin(1, 0, 6, A, UID)
    table.pin(1, 0, 6, A, UID)  # counting costs nothing
    with pytest.raises(PinLimitError, match="past its limit"):
        table.pin(1, 0, 6, B, UID)  # B's own pin of the range is charged again
    assert (table.pins, table.charged_pages(UID)) == (2, 6)
    table.pin(1, 0, 6, B, 0)  # another user has a limit of its own
    table.pin(2, 0, 4, B, UID)  # exactly at the limit
    assert table.charged_pages(UID) == 10
    table.unpin(1, 0, 6, A)
    table.unpin(1, 0, 6, A)
    assert table.charged_pages(UID) == 4
    table.pin(1, 0, 6, A, UID)
    table.check_invariants()


def test_release_owner_drops_every_pin_of_the_process() -> None:
    table = PinTable()
    gone = Gone()
    table.listener = gone
    table.pin(1, 0, 4, A, UID)
    table.pin(1, 0, 4, A, UID)
    table.pin(2, 5, 6, A, UID)
    table.pin(1, 0, 4, B, UID)
    assert table.owners() == 2
    assert table.release_owner(A) == [(1, 0, 4), (2, 5, 6)]
    assert (table.pins, table.released_by_exit, table.owners()) == (1, 3, 1)
    assert gone.owners == [A]
    assert table.release_owner(A) == []
    assert not table.covers(2, 0, 10) and table.covers(1, 0, 4)
    table.check_invariants()


def test_release_some_takes_an_exited_process_apart_a_few_ranges_at_a_time() -> None:
    """Each call drops the whole count on at most *count* ranges, leaves the rest
    pinned, and the last one that empties the owner tells the listener."""
    table = PinTable()
    gone = Gone()
    table.listener = gone
    for page in range(5):
        table.pin(1, page, page + 1, A, UID)
    table.pin(1, 0, 1, A, UID)  # counted twice
    table.pin(2, 0, 1, B, UID)
    released: list[tuple[int, int, int]] = []
    for left in (3, 1):
        step = table.release_some(A, 2)
        assert len(step) == 2 and not set(step) & set(released)
        released += step
        assert len(table.owned(A)) == left and gone.owners == []
        table.check_invariants()
    released += table.release_some(A, 2)
    assert sorted(released) == [(1, p, p + 1) for p in range(5)]
    assert (table.pins, table.released_by_exit, gone.owners) == (1, 6, [A])
    assert not table.covers(1, 0, 5) and table.covers(2, 0, 1)
    assert table.release_some(A, 2) == []
    table.check_invariants()


def test_an_exited_process_is_released_in_parts() -> None:
    """release_some() of a part leaves the rest pinned, and the ranges of an inode freed in
    between are gone from the owner too: nothing is left to release."""
    table = PinTable()
    gone = Gone()
    table.listener = gone
    for page in range(4):
        table.pin(1, page, page + 1, A, UID)
    table.pin(2, 0, 1, A, UID)
    table.pin(1, 0, 1, B, UID)
    everything = [(1, 0, 1), (1, 1, 2), (1, 2, 3), (1, 3, 4), (2, 0, 1)]
    assert sorted(table.owned(A)) == everything
    step = table.release_some(A, 2)
    assert len(step) == 2 and set(step) <= set(everything)
    assert (table.pins, table.released_by_exit) == (4, 2)
    assert sorted(table.owned(A)) == sorted(set(everything) - set(step))
    assert all(not table.covers(ino, s, e) for ino, s, e in step if (ino, s) != (1, 0))
    assert all(table.covers(ino, s, e) for ino, s, e in table.owned(A))
    assert gone.owners == []
    table.forget_inode(1)  # the files are freed: B's pin and A's remaining ones go
    table.forget_inode(2)
    assert table.release_some(A, 10) == []
    assert (table.pins, table.released_by_exit, sorted(gone.owners)) == (0, 2, sorted([A, B]))
    table.check_invariants()


def test_an_owner_whose_last_pin_goes_is_reported_gone() -> None:
    table = PinTable()
    gone = Gone()
    table.listener = gone
    table.pin(1, 0, 4, A, UID)
    table.pin(2, 0, 4, A, UID)
    table.unpin(1, 0, 4, A)
    assert gone.owners == []
    table.forget_inode(2)  # the inode is freed
    assert gone.owners == [A]
    assert table.pins == 0
    table.check_invariants()


def test_pin_pages() -> None:
    assert pin_pages(0, 0, 10_000) == (0, 3)  # to the end of the file now
    assert pin_pages(5000, 0, 10_000) == (1, 3)
    assert pin_pages(10_000, 0, 10_000) is None  # nothing left to the end of the file
    assert pin_pages(0, 0, 0) is None
    assert pin_pages(1, 1, 0) == (0, 1)  # not clipped: the same value names the same pages
    assert pin_pages(4095, 2, 10) == (0, 2)  # rounded outward
    assert pin_pages(2 * P, P, 0) == (2, 3)


def test_pin_listing_format_round_trips() -> None:
    lines = [PinLine(8192, 4096, 12, 1), PinLine(0, 8192, 40, 3), PinLine(0, 8192, 7, 1)]
    value = format_pins(lines)
    assert value == b"0,8192 7 1\n0,8192 40 3\n8192,4096 12 1\n"
    assert parse_pins(value) == sorted(lines, key=lambda p: (p.offset, p.length, p.pid))
    assert parse_pins(b"") == []
    for bad in (b"0,8192 7", b"0,8192 7 0\n", b"0,8192  7 1", b"x"):
        with pytest.raises(RangeError):
            parse_pins(bad)


# -- reclaim with pins -------------------------------------------------------------------------
def new_volume(cap_pages: int = 64, **kwargs: int) -> Volume:
    return Volume(PageStore(cap_pages * P), low_watermark=1.0, **kwargs)  # type: ignore[arg-type]


def volatile_file(vol: Volume, name: bytes, pages: int, fill: bytes = b"x") -> int:
    inode = vol.create(ROOT_INO, name, 0o644, ROOT)
    vol.release(inode.ino)
    vol.write(inode.ino, 0, fill * (pages * P))
    vol.mark_volatile(inode.ino, 0, 0)
    return inode.ino


def intact(vol: Volume, ino: int) -> bool:
    return not list(vol.purged_ranges(ino))


def test_purge_all_skips_a_unit_with_a_pinned_page_whole() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 8)
    g = volatile_file(vol, b"g", 2)
    vol.pin(f, 5 * P, 1, A, UID)  # one page in the middle of the unit
    assert vol.reclaim.purge_all() == 1
    assert intact(vol, f) and not intact(vol, g)  # not split: all of f survives
    assert bytes(vol.read(f, 0, 8 * P)) == b"x" * 8 * P
    vol.check_invariants()
    vol.unpin(f, 5 * P, 1, A)
    assert vol.reclaim.purge_all() == 1
    assert list(vol.purged_ranges(f)) == [(0, 8 * P)]
    vol.check_invariants()


def test_pressure_and_the_cap_take_the_next_unpinned_unit() -> None:
    vol = new_volume(cap_pages=8)
    old = volatile_file(vol, b"old", 3)
    mid = volatile_file(vol, b"mid", 3)
    vol.pin(old, 0, 0, A, UID)
    assert vol.reclaim.for_pressure(1) == 3
    assert intact(vol, old) and not intact(vol, mid)
    volatile_file(vol, b"new", 3)  # 6 of 8 pages used
    other = vol.create(ROOT_INO, b"other", 0o644, ROOT)
    vol.write(other.ino, 0, b"o" * 2 * P)  # fits
    with pytest.raises(FsError) as raised:  # only the pinned unit and the new one are volatile
        vol.write(other.ino, 2 * P, b"o" * 4 * P)
    assert raised.value.errno == errno.ENOSPC
    assert intact(vol, old)
    vol.write(other.ino, 2 * P, b"o" * 3 * P)  # the new unit is purged for it
    assert intact(vol, old)
    vol.check_invariants()


def test_a_unit_unpinned_goes_back_to_its_old_place_in_the_order() -> None:
    vol = new_volume()
    first = volatile_file(vol, b"first", 1)
    second = volatile_file(vol, b"second", 1)
    vol.pin(first, 0, 0, A, UID)
    assert [u.ino for u in vol.reclaim.order] == [second]
    vol.unpin(first, 0, 0, A)
    assert [u.ino for u in vol.reclaim.order] == [first, second]
    vol.check_invariants()


def test_units_made_or_merged_over_pinned_pages_are_parked() -> None:
    vol = new_volume()
    inode = vol.create(ROOT_INO, b"f", 0o644, ROOT)
    f = inode.ino
    vol.write(f, 0, b"f" * 8 * P)
    vol.pin(f, 2 * P, P, A, UID)
    vol.mark_volatile(f, 0, 2 * P)  # not pinned
    vol.mark_volatile(f, 4 * P, 4 * P)  # not pinned
    assert len(vol.reclaim.order) == 2
    vol.mark_volatile(f, P, 4 * P)  # merges both over the pinned page
    assert len(vol.reclaim.order) == 0
    stats = vol.reclaim.statistics()
    assert (stats.volatile_pages, stats.pinned_volatile_pages) == (8, 8)
    vol.check_invariants()
    vol.mark_volatile(f, 2 * P, P)  # re-marking inside the unit keeps it parked
    assert len(vol.reclaim.order) == 0
    vol.check_invariants()


def test_pieces_of_a_split_unit_no_pin_holds_go_back() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 9)
    vol.pin(f, 1 * P, P, A, UID)
    vol.mark_nonvolatile(f, 4 * P, P)  # splits [0, 9) into [0, 4) pinned and [5, 9)
    assert [(u.start, u.end) for u in vol.reclaim.order] == [(5, 9)]
    vol.check_invariants()
    vol.mark_nonvolatile(f, 0, 2 * P)  # cuts the pinned page out: [2, 4) goes back
    assert [(u.start, u.end) for u in vol.reclaim.order] == [(2, 4), (5, 9)]
    vol.check_invariants()


def test_a_truncate_that_cuts_the_pinned_pages_puts_the_rest_back() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 8)
    vol.pin(f, 6 * P, P, A, UID)
    assert len(vol.reclaim.order) == 0
    vol.truncate(vol.inode(f), 4 * P)
    assert [(u.start, u.end) for u in vol.reclaim.order] == [(0, 4)]
    assert vol.pins(f) == [PinInfo(6, 7, A, 1)]  # the pin stays, past the end of the file
    vol.check_invariants()


def test_writes_into_a_pinned_unit_are_counted_as_pinned() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 4)
    vol.reclaim.purge_all()
    vol.pin(f, 0, 0, A, UID)
    vol.write(f, P, b"w" * P)  # a purged page is data again; its unit stays parked
    stats = vol.reclaim.statistics()
    assert (stats.volatile_pages, stats.pinned_volatile_pages, stats.purgeable_units) == (1, 1, 0)
    vol.check_invariants()
    vol.unpin(f, 0, 0, A)
    assert vol.reclaim.statistics().purgeable_units == 1
    vol.check_invariants()


def test_length_zero_pins_to_the_end_of_the_file_now() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 2)
    vol.pin(f, 0, 0, A, UID)
    vol.write(f, 2 * P, b"y" * 2 * P)
    vol.mark_volatile(f, 2 * P, 0)  # the pages the file grew by are not pinned
    assert [(u.start, u.end) for u in vol.reclaim.order] == [(2, 4)]
    with pytest.raises(FsError) as raised:  # the same value now names 4 pages
        vol.unpin(f, 0, 0, A)
    assert raised.value.errno == errno.ENOENT
    vol.unpin(f, 0, 2 * P, A)  # as user.vrange.pins lists it
    assert vol.pins(f) == []
    vol.check_invariants()


def test_pins_of_nothing_and_past_the_end() -> None:
    vol = new_volume()
    inode = vol.create(ROOT_INO, b"empty", 0o644, ROOT)
    vol.pin(inode.ino, 0, 0, A, UID)  # an empty file: no page to pin
    vol.unpin(inode.ino, 0, 0, A)  # ... and none to unpin
    assert vol.pins(inode.ino) == []
    vol.pin(inode.ino, 0, P, A, UID)  # a page the file may grow into
    vol.write(inode.ino, 0, b"z" * P)
    vol.mark_volatile(inode.ino, 0, 0)
    assert vol.reclaim.purge_all() == 0
    vol.check_invariants()


def test_the_per_user_limit_defaults_to_half_the_cap_and_gives_edquot() -> None:
    vol = new_volume(cap_pages=64)
    f = volatile_file(vol, b"f", 8)
    vol.pin(f, 0, 32 * P, A, UID)  # half the cap, past the end of the file
    with pytest.raises(FsError) as raised:
        vol.pin(f, 0, P, A, UID)
    assert raised.value.errno == errno.EDQUOT
    assert "limit" in str(raised.value)
    vol.pin(f, 0, P, A, UID + 1)  # another user
    assert [p.tgid for p in vol.pins(f)] == [A, A]
    vol.check_invariants()


def test_pins_go_when_the_inode_is_freed() -> None:
    vol = new_volume()
    gone = Gone()
    vol.reclaim.pins.listener = gone
    f = volatile_file(vol, b"f", 2)
    inode = vol.open(f)
    vol.pin(f, 0, 0, A, UID)
    vol.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)  # a rename changes nothing
    assert vol.pins(f) == [PinInfo(0, 2, A, 1)]
    vol.unlink(ROOT_INO, b"g")
    assert vol.pins(f) == [PinInfo(0, 2, A, 1)]  # open: the file lives on, and its pins
    vol.release(inode.ino)
    vol.forget(inode.ino, 1)
    assert vol.reclaim.pins.pins == 0 and gone.owners == [A]
    assert vol.reclaim.statistics().pinned_volatile_pages == 0
    vol.check_invariants()


def test_release_owner_puts_back_the_units_it_held() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 2)
    g = volatile_file(vol, b"g", 2)
    vol.pin(f, 0, 0, A, UID)
    vol.pin(f, 0, 0, A, UID)
    vol.pin(g, 0, 0, A, UID)
    vol.pin(g, 0, P, B, UID)
    assert vol.release_owner(A) == 3
    assert [u.ino for u in vol.reclaim.order] == [f]  # g is still pinned by B
    stats = vol.reclaim.statistics()
    assert (stats.pins, stats.pin_owners, stats.pins_released_by_exit) == (1, 1, 3)
    vol.check_invariants()


def test_pin_and_unpin_need_a_regular_file() -> None:
    vol = new_volume()
    d = vol.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    for call in (
        lambda: vol.pin(d.ino, 0, 0, A, UID),
        lambda: vol.unpin(d.ino, 0, 0, A),
        lambda: vol.pins(ROOT_INO),
    ):
        with pytest.raises(FsError) as raised:
            call()
        assert raised.value.errno == errno.EISDIR


def test_parked_units_cost_purges_nothing() -> None:
    """20,000 pinned one-page units leave the purge order: a purge walks only the one
    unit that is not pinned, and the order's heap holds no dead entries for them."""
    n = 40_000
    vol = Volume(PageStore((n + 16) * P), low_watermark=1.0, pin_limit=n * P)
    f = vol.create(ROOT_INO, b"f", 0o644, ROOT).ino
    vol.write(f, 0, b"p" * (n * P))
    for i in range(0, n, 2):
        vol.mark_volatile(f, i * P, P)
    vol.pin(f, 0, n * P, A, UID)
    g = volatile_file(vol, b"g", 1)
    order = vol.reclaim.order
    assert len(order) == 1 and order._entries <= 2 * len(order) + 64
    assert vol.reclaim.purge_all() == 1
    assert not intact(vol, g) and intact(vol, f)
    vol.unpin(f, 0, n * P, A)
    assert len(order) == n // 2
    assert vol.reclaim.purge_all() == n // 2
    vol.check_invariants()


def test_reclaim_stats_count_pins() -> None:
    vol = new_volume()
    f = volatile_file(vol, b"f", 4)
    vol.pin(f, 0, 0, A, UID)
    vol.pin(f, 0, 0, A, UID)
    vol.pin(f, 0, P, B, UID)
    stats = vol.reclaim.statistics()
    assert (stats.pins, stats.pinned_pages, stats.pin_owners) == (3, 5, 2)
    assert (stats.volatile_pages, stats.pinned_volatile_pages, stats.purgeable_units) == (4, 4, 0)
    assert stats.minus({PurgeCause.CAP: 0}, {}).pins == 3
