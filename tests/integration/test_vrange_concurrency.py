"""Many processes changing the volatile ranges of one mount at once.

Eight processes each make 10,000 random marks on their own pages of ONE shared file, while
another process keeps reading the listing; the final ``user.vrange.volatile`` must equal a
serial model of the same operations.  Then the Python client's ``pinned()`` is used from
several processes on different files while another process purges everything in a loop:
whatever a pin reports intact must read back intact.
"""

from __future__ import annotations

import os
import random
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from tests.integration.conftest import Mount
from tests.integration.vrange_helpers import (
    NONVOLATILE,
    PAGE,
    VOLATILE,
    Ranges,
    fork_child,
    join_child,
    mark,
    module_mount,
    new_dir,
    parse_ranges,
    pattern,
    purge_all,
    purged,
    stats,
    volatile,
)

PROCS = 8
OPS = 10_000
ZONE_PAGES = 64
FILE_SIZE = PROCS * ZONE_PAGES * PAGE
SEED = 20130612  # the RFC's month
Op = tuple[str, int, int]  # (xattr name, offset, length) in bytes


def operations(proc: int) -> list[Op]:
    """Process *proc*'s marks: random ranges inside its own pages [proc*64, proc*64 + 64)."""
    rng = random.Random(SEED * 100 + proc)
    zone_lo = proc * ZONE_PAGES * PAGE
    zone_hi = zone_lo + ZONE_PAGES * PAGE
    ops = []
    for _ in range(OPS):
        name = VOLATILE if rng.random() < 0.55 else NONVOLATILE
        start = zone_lo + rng.randrange(ZONE_PAGES * PAGE)
        if rng.random() < 0.5:
            start -= start % PAGE
        length = rng.randint(1, min(zone_hi - start, 12 * PAGE))
        if rng.random() < 0.3:
            length = -(-length // PAGE) * PAGE
            length = min(length, zone_hi - start)
        ops.append((name, start, length))
    return ops


@dataclass
class Model:
    """The contract's purge units of one file, as page intervals [start, end)."""

    size: int
    units: list[tuple[int, int]] = field(default_factory=list)

    def apply(self, name: str, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if offset >= end:
            return
        if name == VOLATILE:  # wholly inside pages; the EOF page counts as whole
            first = -(-offset // PAGE)
            last = -(-end // PAGE) if end == self.size else end // PAGE
            if first >= last:
                return
            hit = [u for u in self.units if u[0] < last and first < u[1]]
            merged = (min([first] + [u[0] for u in hit]), max([last] + [u[1] for u in hit]))
            self.units = [u for u in self.units if u not in hit] + [merged]
        else:  # every page touched
            first, last = offset // PAGE, -(-end // PAGE)
            kept = []
            for lo, hi in self.units:
                if hi <= first or lo >= last:
                    kept.append((lo, hi))
                    continue
                if lo < first:
                    kept.append((lo, first))
                if hi > last:
                    kept.append((last, hi))
            self.units = kept

    def ranges(self) -> Ranges:
        return sorted((lo * PAGE, min(hi * PAGE, self.size) - lo * PAGE) for lo, hi in self.units)


def check_listing(ranges: Ranges, size: int) -> None:
    """Units are disjoint, page-aligned and inside the file."""
    previous_end = 0
    for offset, length in ranges:
        assert offset % PAGE == 0 and length > 0, ranges
        assert offset >= previous_end, f"overlapping units: {ranges}"
        previous_end = offset + length
    assert previous_end <= size, ranges


def marker(path: Path, proc: int) -> object:
    """A child: apply its operations one setxattr each; count what failed."""
    failures: list[str] = []
    fd = os.open(path, os.O_RDWR)
    try:
        for name, offset, length in operations(proc):
            try:
                os.setxattr(fd, name, b"%d,%d" % (offset, length))
            except OSError as e:
                failures.append(f"{name} {offset},{length}: {e}")
    finally:
        os.close(fd)
    return {"failures": len(failures), "first": failures[:5]}


def until_closed(stop_fd: int, step: object, pause: float = 0.0) -> int:
    """Call *step* until *stop_fd* reports EOF (the parent closed the write end); count.

    Between calls it waits up to *pause* seconds for that EOF (pacing, not synchronisation).
    """
    assert callable(step)
    rounds = 0
    while not select.select([stop_fd], [], [], pause)[0]:
        step()
        rounds += 1
    return rounds


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from module_mount(tmp_path_factory)


def test_eight_processes_marking_one_file_match_a_serial_model(mnt: Mount) -> None:
    f = new_dir(mnt) / "shared"
    baseline = stats(mnt.path)["volatile_bytes"]
    content = pattern(PROCS * ZONE_PAGES)
    f.write_bytes(content)
    stop_r, stop_w = os.pipe()

    def listing_reader() -> object:
        os.close(stop_w)

        def step() -> None:
            check_listing(parse_ranges(os.getxattr(f, VOLATILE)), FILE_SIZE)

        return until_closed(stop_r, step, pause=0.01)

    reader = fork_child(listing_reader)
    start = time.monotonic()
    children = [fork_child(partial(marker, f, i)) for i in range(PROCS)]
    results = [join_child(*child) for child in children]
    elapsed = time.monotonic() - start
    os.close(stop_w)
    reader_status, reader_rounds = join_child(*reader)
    os.close(stop_r)

    for i, (status, result) in enumerate(results):
        assert os.waitstatus_to_exitcode(status) == 0, (i, status)
        assert result == {"failures": 0, "first": []}, (i, result)
    assert os.waitstatus_to_exitcode(reader_status) == 0
    assert isinstance(reader_rounds, int) and reader_rounds > 0

    models = [Model(FILE_SIZE) for _ in range(PROCS)]
    for i, model in enumerate(models):
        for op in operations(i):
            model.apply(*op)
    expected = sorted(r for model in models for r in model.ranges())
    got = volatile(f)
    check_listing(got, FILE_SIZE)
    assert got == expected
    assert len(expected) > PROCS  # the model did not degenerate
    assert purged(f) == []
    assert f.read_bytes() == content
    assert stats(mnt.path)["volatile_bytes"] == baseline + sum(n for _, n in expected)
    print(f"{PROCS} x {OPS} setxattr in {elapsed:.1f}s; {reader_rounds} listings read meanwhile")


def test_adjacent_units_of_different_processes_stay_separate(mnt: Mount) -> None:
    f = new_dir(mnt) / "f"
    f.write_bytes(pattern(PROCS * 4))

    def mark_own(i: int) -> object:
        for _ in range(200):  # each mark lands inside its own unit: no new units
            mark(f, f"{i * 4 * PAGE},{4 * PAGE}")
        return True

    children = [fork_child(partial(mark_own, i)) for i in range(PROCS)]
    for child in children:
        status, result = join_child(*child)
        assert os.waitstatus_to_exitcode(status) == 0 and result is True
    assert volatile(f) == [(i * 4 * PAGE, 4 * PAGE) for i in range(PROCS)]


def test_client_pinned_in_several_processes_while_another_purges(mnt: Mount) -> None:
    from vrangefs import client  # noqa: PLC0415 (the package under test, for this test only)

    where = new_dir(mnt)
    files = [where / f"cache{i}" for i in range(4)]
    contents = [pattern(16, seed=i) for i in range(len(files))]
    for f, content in zip(files, contents, strict=True):
        f.write_bytes(content)
        client.mark_volatile(f)
    purge_all(mnt.path)  # every first pin finds its file purged
    stop_r, stop_w = os.pipe()

    def purger() -> object:
        os.close(stop_w)
        return until_closed(stop_r, lambda: purge_all(mnt.path))

    def user(i: int) -> object:
        os.close(stop_w)
        path, content = files[i], contents[i]
        intact = lost = 0
        with path.open("r+b") as fh:
            for _ in range(150):
                with client.pinned(fh.fileno()) as pin:
                    if pin.intact:
                        intact += 1
                    else:
                        assert pin.purged == [(0, len(content))], pin.purged
                        lost += 1
                        fh.seek(0)
                        fh.write(content)
                        fh.flush()
                    # Pinned: nothing may purge it now, so it reads back whole.
                    assert os.pread(fh.fileno(), len(content) + 1, 0) == content
                    assert client.purged(fh.fileno()) == []
        return {"intact": intact, "lost": lost}

    purging = fork_child(purger)
    users = [fork_child(partial(user, i)) for i in range(len(files))]
    outcomes = [join_child(*u) for u in users]
    os.close(stop_w)
    purger_status, purges = join_child(*purging)
    os.close(stop_r)
    for status, result in outcomes:
        assert os.waitstatus_to_exitcode(status) == 0
        assert isinstance(result, dict)
        assert result["intact"] + result["lost"] == 150
        assert result["lost"] >= 1  # the first pin found the purge
    assert os.waitstatus_to_exitcode(purger_status) == 0
    assert isinstance(purges, int) and purges > 0
    for f, content in zip(files, contents, strict=True):
        assert volatile(f) == [(0, len(content))]  # volatile again after the last pin
        lost = client.mark_nonvolatile(f)
        if lost:
            assert lost == [(0, len(content))]  # whole units
        else:
            assert f.read_bytes() == content
