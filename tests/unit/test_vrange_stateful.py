"""VrangeRoot and PurgeOrder against a plain per-page model, under random operations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vrangefs import vrange
from vrangefs.vrange import PurgeOrder, PurgeUnit, VrangeRoot

PAGES = 40
INOS = (1, 2, 3)

inos = st.sampled_from(INOS)
pages = st.integers(0, PAGES - 1)
lengths = st.integers(1, 12)


@dataclass
class ModelUnit:
    seq: int
    purged: bool = False


@dataclass(frozen=True)
class Run:
    """A unit as the model sees it: a run of pages with one unit id."""

    ino: int
    start: int
    end: int
    uid: int


class VrangeMachine(RuleBasedStateMachine):
    # Index chunks of at most 4 units, merged at 1: a root of a few units splits and
    # merges them all the time (the daemon's chunks hold hundreds).
    LOAD = 2
    # Purge-order chunks of at most 4 entries, compactions at a few stale entries, chunks
    # mixed past 2 roots: a short run goes through all their states.
    COMPACTION: ClassVar[dict[str, int]] = {"_COMPACT_MIN": 2, "_ORDER_LOAD": 2, "_OWNERS_MAX": 2}

    def __init__(self) -> None:
        super().__init__()
        self._saved_load = vrange._LOAD
        vrange._LOAD = self.LOAD
        self._saved_compaction = {name: getattr(vrange, name) for name in self.COMPACTION}
        for name, value in self.COMPACTION.items():
            setattr(vrange, name, value)
        self.order = PurgeOrder()
        self.roots = {ino: VrangeRoot(ino, self.order) for ino in INOS}
        # The model: per inode, page -> unit id; per unit id, its seq and purged flag.
        self.pages: dict[int, dict[int, int]] = {ino: {} for ino in INOS}
        self.units: dict[int, ModelUnit] = {}
        self.next_uid = 0
        self.next_seq = 0

    def teardown(self) -> None:
        vrange._LOAD = self._saved_load
        for name, value in self._saved_compaction.items():
            setattr(vrange, name, value)

    # Model helpers

    def new_uid(self, unit: ModelUnit) -> int:
        self.next_uid += 1
        self.units[self.next_uid] = unit
        return self.next_uid

    def runs(self, ino: int) -> list[Run]:
        runs: list[Run] = []
        for page in sorted(self.pages[ino]):
            uid = self.pages[ino][page]
            last = runs[-1] if runs else None
            if last is not None and last.uid == uid and last.end == page:
                runs[-1] = Run(ino, last.start, page + 1, uid)
            else:
                runs.append(Run(ino, page, page + 1, uid))
        return runs

    def drop(self, ino: int, doomed: set[int]) -> list[tuple[int, int, bool]]:
        """Remove pages from the model, splitting units; (page, seq, purged) of each."""
        model = self.pages[ino]
        removed = [(p, self.units[model[p]].seq, self.units[model[p]].purged) for p in doomed]
        touched = {model[p] for p in doomed}
        for page in doomed:
            del model[page]
        for uid in touched:
            for run in [run for run in self.runs(ino) if run.uid == uid][1:]:
                old = self.units[uid]
                new = self.new_uid(ModelUnit(old.seq, old.purged))
                for page in range(run.start, run.end):
                    model[page] = new
        return sorted(removed)

    @staticmethod
    def per_page(units: list[PurgeUnit]) -> list[tuple[int, int, bool]]:
        return sorted(
            (page, unit.seq, unit.purged) for unit in units for page in range(unit.start, unit.end)
        )

    # Rules

    @rule(ino=inos, start=pages, length=lengths)
    def mark(self, ino: int, start: int, length: int) -> None:
        end = start + length
        unit = self.roots[ino].mark_volatile(start, end)
        model = self.pages[ino]
        merged = {model[p] for p in range(start, end) if p in model}
        span = set(range(start, end)) | {p for p, uid in model.items() if uid in merged}
        self.next_seq += 1
        uid = self.new_uid(ModelUnit(self.next_seq))
        for page in span:
            model[page] = uid
        assert (unit.start, unit.end) == (min(span), max(span) + 1)
        assert not unit.purged

    @rule(ino=inos, start=pages, length=lengths)
    def unmark(self, ino: int, start: int, length: int) -> None:
        end = start + length
        cut = self.roots[ino].mark_nonvolatile(start, end)
        doomed = {p for p in range(start, end) if p in self.pages[ino]}
        expected = self.drop(ino, doomed)
        assert [(p, purged) for p, _, purged in self.per_page(cut)] == [
            (p, purged) for p, _, purged in expected
        ]
        assert [unit.start for unit in cut] == sorted(unit.start for unit in cut)
        assert all(unit.ino == ino for unit in cut)

    @rule(ino=inos, page_count=st.integers(0, PAGES + 12))
    def truncate(self, ino: int, page_count: int) -> None:
        cut = self.roots[ino].truncate(page_count)
        expected = self.drop(ino, {p for p in self.pages[ino] if p >= page_count})
        assert [page for page, _, _ in self.per_page(cut)] == [page for page, _, _ in expected]

    @rule(ino=inos)
    def unlink(self, ino: int) -> None:
        dropped = [unit for chunk in self.roots[ino].drop() for unit in chunk]
        expected = self.drop(ino, set(self.pages[ino]))
        assert [page for page, _, _ in self.per_page(dropped)] == [page for page, _, _ in expected]
        vrange.let_go(dropped)  # as the daemon's reaper does, later
        self.order.bury(1)
        self.roots[ino] = VrangeRoot(ino, self.order)  # a new file, as inode numbers go

    @rule()
    def purge_oldest(self) -> None:
        victim = self.order.oldest()
        candidates = [
            (self.units[run.uid].seq, run.start, run)
            for ino in INOS
            for run in self.runs(ino)
            if not self.units[run.uid].purged
        ]
        if not candidates:
            assert victim is None
            return
        _, _, run = min(candidates)
        assert victim is not None
        assert (victim.ino, victim.start, victim.end) == (run.ino, run.start, run.end)
        self.roots[victim.ino].mark_purged(victim)
        self.units[run.uid].purged = True

    @rule(ino=inos, page=pages)
    def write(self, ino: int, page: int) -> None:
        """A write into a purged unit puts it back in the order, as reclaim does."""
        unit = self.roots[ino].unit_at(page)
        uid = self.pages[ino].get(page)
        assert (unit is None) == (uid is None)
        if unit is not None and uid is not None and self.units[uid].purged:
            assert unit.purged and unit not in self.order
            unit.purged = False
            self.roots[ino].queue(unit)
            self.units[uid].purged = False

    # Checks after every step

    @invariant()
    def roots_match_model(self) -> None:
        for ino, root in self.roots.items():
            root.check_invariants()
            real = [(u.start, u.end, u.purged) for u in root.units()]
            expected = [(r.start, r.end, self.units[r.uid].purged) for r in self.runs(ino)]
            assert real == expected
            assert root.volatile_page_count() == len(self.pages[ino])
            assert len(root) == len(expected)
            probes = {0, PAGES + 11}
            for run in self.runs(ino):
                probes |= {run.start - 1, run.start, run.end - 1, run.end}
            for page in probes - {-1}:
                unit = root.unit_at(page)
                assert (unit is not None) == (page in self.pages[ino])
                if unit is not None:
                    uid = self.pages[ino][page]
                    assert all(self.pages[ino].get(p) == uid for p in range(unit.start, unit.end))
                # The interval tree, built on demand, answers as the index does.
                assert [iv.data for iv in root.tree.at(page)] == ([] if unit is None else [unit])
                assert {iv.data for iv in root.tree.overlap(page, page + 5)} == set(
                    root.units_overlapping(page, page + 5)
                )

    @invariant()
    def seqs_match_model(self) -> None:
        """Real seqs order the units exactly as the model's mark counter does."""
        real_of: dict[int, int] = {}
        for ino, root in self.roots.items():
            for unit, run in zip(root.units(), self.runs(ino), strict=True):
                model_seq = self.units[run.uid].seq
                assert real_of.setdefault(model_seq, unit.seq) == unit.seq
        real = [real_of[seq] for seq in sorted(real_of)]
        assert real == sorted(set(real))

    @invariant()
    def order_matches_model(self) -> None:
        self.order.check_invariants()
        expected = sorted(
            (self.units[run.uid].seq, run.start, run.ino, run.end)
            for ino in INOS
            for run in self.runs(ino)
            if not self.units[run.uid].purged
        )
        real = [(unit.start, unit.ino, unit.end) for unit in self.order]
        assert real == [(start, ino, end) for _, start, ino, end in expected]
        assert len(self.order) == len(expected)
        oldest = self.order.oldest()
        assert (oldest is None) == (not expected)


VrangeMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
TestVrangeMachine = VrangeMachine.TestCase
