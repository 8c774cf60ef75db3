"""Purge units, the per-inode VrangeRoot and the mount-wide PurgeOrder."""

from __future__ import annotations

import bisect
import gc
import random
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from vrangefs import vrange
from vrangefs.vrange import PurgeOrder, PurgeUnit, VrangeRoot


@pytest.fixture
def order() -> PurgeOrder:
    return PurgeOrder()


@pytest.fixture
def root(order: PurgeOrder) -> Iterator[VrangeRoot]:
    root = VrangeRoot(7, order)
    yield root
    root.check_invariants()
    order.check_invariants()


def pop_oldest(order: PurgeOrder) -> PurgeUnit | None:
    """Take the least recently marked unit out of the order, as reclaim does."""
    unit = order.oldest()
    if unit is not None and unit.root is not None:
        unit.root.unqueue(unit)
    elif unit is not None:
        order.discard(unit)
    return unit


def spans(units: list[PurgeUnit]) -> list[tuple[int, int]]:
    return [(unit.start, unit.end) for unit in units]


def describe(units: list[PurgeUnit]) -> list[tuple[int, int, int, bool]]:
    return [(unit.start, unit.end, unit.seq, unit.purged) for unit in units]


def test_mark_creates_newest_unit(root: VrangeRoot, order: PurgeOrder) -> None:
    first = root.mark_volatile(0, 4)
    second = root.mark_volatile(10, 12)
    assert (first.ino, first.start, first.end, first.purged) == (7, 0, 4, False)
    assert second.seq > first.seq
    assert root.units() == [first, second]
    assert list(order) == [first, second]
    assert root.volatile_page_count() == 6
    assert len(root) == 2
    assert len(first) == 4


def test_overlapping_marks_merge_into_the_union(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 4)
    b = root.mark_volatile(6, 8)
    c = root.mark_volatile(10, 12)
    merged = root.mark_volatile(3, 7)
    assert merged not in (a, b, c)
    assert spans(root.units()) == [(0, 8), (10, 12)]
    assert merged.seq > c.seq
    assert list(order) == [c, merged]
    assert a not in order
    assert b not in order
    assert root.volatile_page_count() == 10


def test_mark_spanning_several_units_and_gaps(root: VrangeRoot) -> None:
    for start in range(0, 20, 4):
        root.mark_volatile(start, start + 2)
    merged = root.mark_volatile(1, 17)
    assert spans(root.units()) == [(0, 18)]
    assert root.units() == [merged]


def test_adjacent_marks_stay_separate(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 4)
    b = root.mark_volatile(4, 8)
    c = root.mark_volatile(8, 9)
    assert root.units() == [a, b, c]
    assert list(order) == [a, b, c]
    assert root.units_overlapping(3, 5) == [a, b]
    assert root.units_overlapping(4, 8) == [b]
    assert root.unit_at(4) is b
    assert root.unit_at(3) is a
    assert root.unit_at(9) is None


def test_remark_inside_one_unit_keeps_it_and_makes_it_newest(
    root: VrangeRoot, order: PurgeOrder
) -> None:
    a = root.mark_volatile(0, 10)
    b = root.mark_volatile(20, 30)
    again = root.mark_volatile(2, 3)
    assert again is a
    assert spans(root.units()) == [(0, 10), (20, 30)]
    assert a.seq > b.seq
    assert list(order) == [b, a]


def test_merge_with_a_purged_unit_is_not_purged(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 4)
    root.mark_purged(a)
    assert a.purged
    assert len(order) == 0
    merged = root.mark_volatile(2, 6)
    assert not merged.purged
    assert list(order) == [merged]
    again = root.mark_volatile(0, 1)
    assert again is merged


def test_remark_of_a_purged_unit_requeues_it(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 4)
    root.mark_purged(a)
    assert root.mark_volatile(0, 4) is a
    assert not a.purged
    assert list(order) == [a]


def test_unmark_whole_units(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 4)
    b = root.mark_volatile(4, 8)
    c = root.mark_volatile(10, 12)
    cut = root.mark_nonvolatile(0, 9)
    assert cut == [a, b]
    assert root.units() == [c]
    assert list(order) == [c]
    assert root.mark_nonvolatile(20, 30) == []
    assert root.volatile_page_count() == 2


def test_split_keeps_seq_flag_and_place(root: VrangeRoot, order: PurgeOrder) -> None:
    old = root.mark_volatile(0, 10)
    new = root.mark_volatile(20, 30)
    cut = root.mark_nonvolatile(4, 6)
    assert describe(cut) == [(4, 6, old.seq, False)]
    assert cut[0] is not old
    left, right, newest = root.units()
    assert left is old
    assert (left.start, left.end, right.start, right.end) == (0, 4, 6, 10)
    assert right.seq == old.seq
    assert newest is new
    assert list(order) == [left, right, new]
    assert order.oldest() is left
    assert pop_oldest(order) is left
    assert pop_oldest(order) is right
    assert pop_oldest(order) is new
    assert pop_oldest(order) is None
    root.mark_volatile(0, 1)  # the popped units are back in order via a new mark
    root.mark_volatile(6, 7)
    root.mark_volatile(20, 21)


def test_trim_from_the_left_keeps_place(root: VrangeRoot, order: PurgeOrder) -> None:
    old = root.mark_volatile(0, 10)
    new = root.mark_volatile(10, 20)
    cut = root.mark_nonvolatile(0, 3)
    assert describe(cut) == [(0, 3, old.seq, False)]
    assert root.units() == [old, new]
    assert (old.start, old.end) == (3, 10)
    assert list(order) == [old, new]


def test_unmark_across_units_trims_both(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 10)
    b = root.mark_volatile(10, 20)
    cut = root.mark_nonvolatile(5, 15)
    assert describe(cut) == [(5, 10, a.seq, False), (10, 15, b.seq, False)]
    assert root.units() == [a, b]
    assert spans(root.units()) == [(0, 5), (15, 20)]
    assert list(order) == [a, b]
    assert root.volatile_page_count() == 10


def test_purged_units_stay_listed_until_unmarked(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 10)
    b = root.mark_volatile(20, 30)
    victim = order.oldest()
    assert victim is a
    root.mark_purged(a)
    assert root.units() == [a, b]
    assert root.unit_at(5) is not None
    assert root.volatile_page_count() == 20
    assert list(order) == [b]
    cut = root.mark_nonvolatile(4, 6)
    assert describe(cut) == [(4, 6, a.seq, True)]
    pieces = root.units()[:2]
    assert describe(pieces) == [(0, 4, a.seq, True), (6, 10, a.seq, True)]
    assert list(order) == [b]
    cut = root.mark_nonvolatile(0, 10)
    assert describe(cut) == [(0, 4, a.seq, True), (6, 10, a.seq, True)]
    assert root.units() == [b]


def test_truncate(root: VrangeRoot, order: PurgeOrder) -> None:
    a = root.mark_volatile(0, 4)
    b = root.mark_volatile(6, 12)
    c = root.mark_volatile(14, 16)
    root.mark_purged(c)
    assert root.truncate(20) == []
    cut = root.truncate(8)
    assert describe(cut) == [(8, 12, b.seq, False), (14, 16, c.seq, True)]
    assert root.units() == [a, b]
    assert spans(root.units()) == [(0, 4), (6, 8)]
    assert list(order) == [a, b]
    assert root.truncate(6) == [b]
    assert root.truncate(0) == [a]
    assert len(root) == 0
    assert len(order) == 0
    assert root.truncate(0) == []


def test_drop(order: PurgeOrder) -> None:
    root, other = VrangeRoot(7, order), VrangeRoot(8, order)
    a = root.mark_volatile(0, 4)
    b = root.mark_volatile(6, 8)
    kept = other.mark_volatile(0, 1)
    root.mark_purged(b)
    assert [unit for chunk in root.drop() for unit in chunk] == [a, b]
    assert len(root) == 0
    assert root.volatile_page_count() == 0
    assert len(order) == 1
    assert list(order) == [kept]
    assert order.oldest() is kept
    other.check_invariants()
    order.check_invariants()


def test_drop_takes_many_units_out_of_the_order_at_once(order: PurgeOrder) -> None:
    """Dropping a root of 10,000 queued units among 100,000 does not visit them (as quick
    as dropping one of 10, within a generous factor): their entries go stale together and
    the order skips them after."""
    small, big, others = VrangeRoot(1, order), VrangeRoot(2, order), VrangeRoot(3, order)
    for page in range(10):
        small.mark_volatile(page * 2, page * 2 + 1)
    for page in range(10_000):
        big.mark_volatile(page * 2, page * 2 + 1)
    kept = [others.mark_volatile(page * 2, page * 2 + 1) for page in range(90_000)]
    started = time.perf_counter()
    small.drop()
    small_took = time.perf_counter() - started
    started = time.perf_counter()
    chunks = big.drop()
    big_took = time.perf_counter() - started
    assert sum(map(len, chunks)) == 10_000
    assert big_took < max(50 * small_took, 0.002), (big_took, small_took)
    assert len(order) == 90_000 and order._entries == 100_010  # stale, not yet dropped
    assert pop_oldest(order) is kept[0]
    order.check_invariants()


def test_stale_entries_at_the_front_are_skipped_cheaply(order: PurgeOrder) -> None:
    """50,000 stale entries of a dropped root in front of the only live one: the next
    oldest() skips and deletes them in well under a heap's 1 us per entry."""
    big, other = VrangeRoot(2, order), VrangeRoot(3, order)
    for page in range(50_000):
        big.mark_volatile(page * 2, page * 2 + 1)
    newest = other.mark_volatile(0, 1)
    big.drop()
    started = time.perf_counter()
    assert order.oldest() is newest
    took = time.perf_counter() - started
    assert order._entries == 1 and len(order) == 1
    assert took < 0.05, took  # about 5 ms here; a heap popped them in about 50 ms
    assert pop_oldest(order) is newest
    assert order.oldest() is None
    order.check_invariants()


def test_chunks_of_a_dropped_root_leave_whole_and_wait_to_be_buried(order: PurgeOrder) -> None:
    """A chunk names the roots of its entries: one whose roots are all dropped is taken out
    whole, not entry by entry, and waits in the graveyard (freeing a million entries takes
    milliseconds) until the caller buries it a few chunks at a time."""
    big, other = VrangeRoot(2, order), VrangeRoot(3, order)
    woken: list[int] = []
    order.on_garbage = lambda: woken.append(order.graveyard)
    for page in range(20_000):
        big.mark_volatile(page * 2, page * 2 + 1)
    newest = other.mark_volatile(0, 1)
    chunks = len(order._chunks)
    assert chunks >= 20_000 // (2 * vrange._ORDER_LOAD)
    big.drop()
    assert order.oldest() is newest
    assert order._entries == 1 and len(order._chunks) == 1
    assert order.graveyard >= chunks - 1 and woken == [0]
    assert order.bury(3) == 3
    while order.bury(3):
        pass
    assert order.graveyard == 0
    order.check_invariants()


def test_a_chunk_shared_with_a_live_root_is_not_taken_out_whole(order: PurgeOrder) -> None:
    """Marks of two files interleaved: every chunk names both roots, so when one is dropped
    its entries are skipped one by one and the other's stay, in order."""
    dropped, live = VrangeRoot(2, order), VrangeRoot(3, order)
    kept = []
    for page in range(3000):
        dropped.mark_volatile(page, page + 1)
        kept.append(live.mark_volatile(page, page + 1))
    dropped.drop()
    assert [pop_oldest(order) for _ in range(3000)] == kept
    assert order.oldest() is None
    order.check_invariants()


def test_a_chunk_of_many_roots_is_mixed(order: PurgeOrder) -> None:
    """Past _OWNERS_MAX roots a chunk stops naming them: dropping them all still leaves its
    entries stale, found one by one; a live unit behind them is the oldest."""
    roots = [VrangeRoot(ino, order) for ino in range(vrange._OWNERS_MAX + 2)]
    for root in roots:
        root.mark_volatile(0, 1)
    assert order._owners == [None]
    last = VrangeRoot(99, order).mark_volatile(0, 1)
    for root in roots:
        root.drop()
    assert order.oldest() is last
    assert order._entries == 1 and order.graveyard == 0  # skipped one by one, deleted
    order.check_invariants()


def test_let_go_units_are_freed_without_the_cyclic_collector(order: PurgeOrder) -> None:
    """A queued unit and its order entry point at each other; once a dropped root's units
    are let go of and their entries buried, reference counting alone frees them (the
    daemon freezes what survives a full collection: a cycle of frozen objects stays)."""
    root, other = VrangeRoot(2, order), VrangeRoot(3, order)
    for page in range(1000):
        root.mark_volatile(page * 2, page * 2 + 1)
    newest = other.mark_volatile(0, 1)

    def units_alive() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is PurgeUnit)

    gc.collect()
    gc.disable()
    try:
        before = units_alive()
        for chunk in root.drop():
            vrange.let_go(chunk)
        del chunk
        assert order.oldest() is newest
        while order.bury(4):
            pass
        assert units_alive() == before - 1000
    finally:
        gc.enable()


def test_order_is_oldest_first_across_roots(order: PurgeOrder) -> None:
    one, two = VrangeRoot(1, order), VrangeRoot(2, order)
    a = one.mark_volatile(0, 1)
    b = two.mark_volatile(0, 1)
    c = one.mark_volatile(5, 6)
    assert list(order) == [a, b, c]
    victims = []
    roots = {1: one, 2: two}
    while (unit := order.oldest()) is not None:
        roots[unit.ino].mark_purged(unit)
        victims.append(unit)
    assert victims == [a, b, c]
    assert all(unit.purged for unit in victims)
    one.check_invariants()
    two.check_invariants()


def test_mark_purged_rejects_foreign_units(root: VrangeRoot, order: PurgeOrder) -> None:
    other = VrangeRoot(8, order)
    unit = other.mark_volatile(0, 1)
    with pytest.raises(ValueError, match="is not in"):
        root.mark_purged(unit)
    cut = other.mark_nonvolatile(0, 1)
    with pytest.raises(ValueError, match="is not in"):
        other.mark_purged(cut[0])


@pytest.mark.parametrize(("start", "end"), [(-1, 2), (3, 3), (4, 2)])
def test_bad_page_ranges(root: VrangeRoot, start: int, end: int) -> None:
    with pytest.raises(ValueError, match="invalid page range"):
        root.mark_volatile(start, end)
    with pytest.raises(ValueError, match="invalid page range"):
        root.mark_nonvolatile(start, end)
    with pytest.raises(ValueError, match="invalid page range"):
        root.units_overlapping(start, end)


def test_bad_truncate(root: VrangeRoot) -> None:
    with pytest.raises(ValueError, match="negative"):
        root.truncate(-1)


def test_order_add_discard(order: PurgeOrder) -> None:
    unit = PurgeUnit(1, 0, 1, order.next_seq())
    order.add(unit)
    with pytest.raises(ValueError, match="already"):
        order.add(unit)
    order.discard(unit)
    order.discard(unit)
    assert len(order) == 0
    assert order.oldest() is None
    unit.purged = True
    with pytest.raises(ValueError, match="purged"):
        order.add(unit)


def test_order_compacts_discarded_entries(order: PurgeOrder) -> None:
    units = [PurgeUnit(1, page, page + 1, order.next_seq()) for page in range(1000)]
    for unit in units:
        order.add(unit)
    for unit in units[1::2]:
        order.discard(unit)
    for _ in range(10):  # churn: each unit is discarded and re-added
        for unit in units[::2]:
            order.discard(unit)
            order.add(unit)
    assert order._entries <= 2 * len(order) + 100
    assert list(order) == units[::2]
    order.check_invariants()


def test_order_compacts_a_chunk_per_call(order: PurgeOrder) -> None:
    """Once stale entries outnumber live ones, each later call filters one chunk: no
    call rebuilds the whole order, and it stays right meanwhile."""
    units = [PurgeUnit(1, page, page + 1, order.next_seq()) for page in range(40_000)]
    for unit in units:
        order.add(unit)
    chunks = len(order._chunks)
    for unit in [*units[1:40_000:2], units[0], units[2]]:  # stale ones everywhere
        order.discard(unit)
    assert order._compacting >= 0 and order._entries > 39_000
    assert order.oldest() is units[4]
    order.check_invariants()
    later = [PurgeUnit(1, page, page + 1, order.next_seq()) for page in range(40_000, 40_100)]
    for unit in later:
        order.add(unit)
    calls = 0
    while order._compacting >= 0:
        order.oldest()
        calls += 1
    assert calls <= chunks + 1
    assert order._entries == len(order) == 19_998 + 100
    assert list(order) == units[4:40_000:2] + later
    order.check_invariants()


def test_order_cost_does_not_grow_with_size() -> None:
    """Choosing a victim takes a few heap steps, at 1,000 as at 100,000 units."""
    for size in (1000, 100_000):
        order = PurgeOrder()
        for page in range(size):
            order.add(PurgeUnit(1, page, page + 1, order.next_seq()))
        assert pop_oldest(order) is not None
        assert len(order) == size - 1
        assert order._entries <= size  # the popped entry is dropped lazily


def test_seq_increases(order: PurgeOrder) -> None:
    seqs = [order.next_seq() for _ in range(5)]
    assert seqs == sorted(set(seqs))


def test_repr() -> None:
    order = PurgeOrder()
    root = VrangeRoot(3, order)
    unit = root.mark_volatile(1, 2)
    root.mark_purged(unit)
    assert repr(unit) == f"<PurgeUnit ino=3 pages=[1,2) seq={unit.seq} purged>"
    assert repr(root) == "<VrangeRoot ino=3 units=1 pages=1>"


def test_check_invariants_catches_corruption(root: VrangeRoot, order: PurgeOrder) -> None:
    unit = root.mark_volatile(0, 4)
    unit.purged = True  # behind the root's back: purged but still in the order
    with pytest.raises(AssertionError, match="purge order"):
        root.check_invariants()
    with pytest.raises(AssertionError, match="purge order"):
        order.check_invariants()
    unit.purged = False
    unit.end = 5
    with pytest.raises(AssertionError):
        root.check_invariants()
    unit.end = 4


@pytest.mark.parametrize("load", [2, 512])
def test_index_against_a_sorted_list(load: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked index answers as a plain sorted list does, through splits and merges."""
    monkeypatch.setattr(vrange, "_LOAD", load)
    rng = random.Random(load)
    index = vrange._UnitIndex()
    model: dict[int, PurgeUnit] = {}
    starts: list[int] = []  # the model's sorted starts
    for step in range(6000):
        start = rng.randrange(0, 4000) * 2
        if start in model and rng.random() < 0.9:
            index.remove(model.pop(start))
            starts.remove(start)
        elif start not in model:
            model[start] = PurgeUnit(1, start, start + rng.choice((1, 2)), 0)
            index.insert(model[start])
            bisect.insort(starts, start)
        if step % 500 == 0 or step < 50:
            index.check_invariants()
        page = rng.randrange(-1, 8010)
        end = page + rng.randrange(1, 40)
        i = bisect.bisect_right(starts, page)
        assert index.at_or_before(page) is (model[starts[i - 1]] if i else None)
        near = [model[s] for s in starts[max(i - 1, 0) : bisect.bisect_left(starts, end)]]
        assert index.overlapping(max(page, 0), end) == [u for u in near if u.end > max(page, 0)]
        assert list(index.starting_in(page, end)) == [u for u in near if page < u.start]
    assert list(index) == [model[s] for s in sorted(model)]
    assert len(index) == len(model)
    assert index.last() is (max(model.values(), key=lambda u: u.start) if model else None)
    for unit in list(model.values()):
        index.remove(unit)
    index.check_invariants()
    assert len(index) == 0 and index.last() is None
    with pytest.raises(ValueError, match="not in the index"):
        index.remove(PurgeUnit(1, 0, 1, 0))


def test_the_interval_tree_is_built_when_asked_and_dropped_on_change(
    root: VrangeRoot,
) -> None:
    a = root.mark_volatile(0, 4)
    b = root.mark_volatile(10, 12)
    tree = root.tree
    assert root.tree is tree  # kept while nothing changes
    assert sorted((iv.begin, iv.end, iv.data.start) for iv in tree) == [(0, 4, 0), (10, 12, 10)]
    assert {iv.data for iv in tree.overlap(3, 11)} == {a, b}
    root.mark_nonvolatile(2, 3)  # a split
    assert root.tree is not tree
    assert sorted((iv.begin, iv.end) for iv in root.tree) == [(0, 2), (3, 4), (10, 12)]
    root.check_invariants()
    tree = root.tree
    b.end = 13  # behind the root's back: the tree no longer matches
    with pytest.raises(AssertionError):
        root.check_invariants()
    b.end = 12


def test_a_unit_costs_at_most_300_bytes(order: PurgeOrder) -> None:
    """Issue 12's bound, measured: a queued one-page unit of a root of many."""
    roots = [VrangeRoot(ino, order) for ino in range(4)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for page in range(0, 40000, 2):
            roots[page % 4].mark_volatile(page + 1000, page + 1001)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(order) == 20000
    assert used / 20000 <= 300, used / 20000
