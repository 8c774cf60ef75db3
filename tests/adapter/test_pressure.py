"""pressure.relieve with a fake MemoryProbe whose available() follows what was purged.

The probe reports what the machine would: a fixed amount less the daemon's
resident pages, since purged pages go back to the kernel at once.  relieve
purges units oldest mark first until ``min_free`` is available, awaits each
round's flush before the next reading, and stops when nothing is left.
"""

from __future__ import annotations

import pytest
import trio.testing

from tests.adapter.harness import File, Fs, page, run, serving, start
from vrangefs import pressure
from vrangefs.config import PressureConfig
from vrangefs.memory import MemoryProbe
from vrangefs.pagestore import PAGE_SIZE, PageStore

P = PAGE_SIZE
MARK_ORDER = [2, 0, 4, 1, 5, 3]  # the files' units are marked in this order


class FakeProbe(MemoryProbe):
    """Available memory: *outside* bytes less the daemon's resident pages."""

    def __init__(self, store: PageStore, fs: Fs, outside: int) -> None:
        super().__init__(use_cgroup=False)
        self.store = store
        self.fs = fs
        self.outside = outside
        self.readings: list[tuple[int, list[int]]] = []  # (available, invalidations finished)

    def available(self) -> int:
        value = self.outside - self.store.used_pages * P
        self.readings.append((value, self.fs.hook.snapshot()[1]))
        return value


async def six_units(fs: Fs) -> tuple[list[File], File]:
    """Six files of two volatile pages each, marked in MARK_ORDER, and 4 pages kept."""
    files = [await fs.create(b"f%d" % i, page(2 * i) + page(2 * i + 1)) for i in range(6)]
    for i in MARK_ORDER:
        await fs.mark_volatile(files[i].ino)
    kept = await fs.create(b"kept", page(99) * 4)
    return files, kept


def probe_short_by(fs: Fs, pages: int, min_free: int) -> FakeProbe:
    """A probe that reads *pages* pages below min_free now."""
    outside = fs.volume.store.used_pages * P + min_free - pages * P
    return FakeProbe(fs.volume.store, fs, outside)


def purged_files(fs: Fs, files: list[File]) -> list[int]:
    return [i for i, f in enumerate(files) if fs.purged_now(f.ino)]


def test_relieve_purges_oldest_first_until_above_min_free() -> None:
    fs = Fs()
    config = PressureConfig(min_free=8 * P)

    async def body() -> list[object]:
        async with serving(fs):
            files, kept = await six_units(fs)
            probe = probe_short_by(fs, 1, config.min_free)  # wants 1.25 * min_free: 3 pages
            freed = await pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator)
            finished = sorted(fs.hook.snapshot()[1])
            stats = await fs.stats()
            return [
                freed,
                purged_files(fs, files),
                finished == sorted(files[i].ino for i in (2, 0)),
                [value >= config.min_free for value, _ in probe.readings],
                await fs.read(kept, 0, 4 * P) == page(99) * 4,
                stats["purge_events_pressure"],
                stats["purged_bytes_pressure"],
            ]

    assert run(body) == [4, [0, 2], True, [False, True], True, 2, 4 * P]
    fs.volume.check_invariants()


def test_relieve_awaits_the_flush_of_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pressure, "ROUND_PAGES", 2)  # one unit a round
    fs = Fs()
    config = PressureConfig(min_free=8 * P)

    async def body() -> list[object]:
        seen: list[object] = []
        async with serving(fs) as nursery:
            files, _ = await six_units(fs)
            probe = probe_short_by(fs, 5, config.min_free)  # three rounds of 2 pages
            gates = [fs.hook.arm(files[i].ino) for i in MARK_ORDER[:3]]
            relief = start(
                nursery,
                lambda: pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator),
            )
            for gate in gates:
                await gate.wait_entered()
                await trio.testing.wait_all_tasks_blocked()
                # the round's purge is done, the next reading waits for its flush
                seen.append((len(probe.readings), purged_files(fs, files), relief.done))
                gate.release()
            seen.append(await relief.wait())
            ino_of = {f.ino: i for i, f in enumerate(files)}
            seen.append([[ino_of[ino] for ino in done] for _, done in probe.readings])
        return seen

    assert run(body) == [
        (1, [2], False),
        (2, [0, 2], False),
        (3, [0, 2, 4], False),
        6,
        [[], [2], [2, 0], [2, 0, 4]],  # each reading after the previous rounds' flushes
    ]
    fs.volume.check_invariants()


def test_relieve_lets_requests_run_between_steps_of_a_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round is purged PURGES_PER_STEP units at a time: another task runs between
    them and sees the round half done (one step of 65,536 one-page units would hold
    every request for a second)."""
    monkeypatch.setattr(pressure, "PURGES_PER_STEP", 2)
    fs = Fs()
    config = PressureConfig(min_free=8 * P)

    async def body() -> list[object]:
        seen: set[int] = set()
        async with serving(fs) as nursery:
            files, _ = await six_units(fs)
            probe = probe_short_by(fs, 9, config.min_free)  # one round wants all 12 pages
            relief = start(
                nursery,
                lambda: pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator),
            )
            while not relief.done:
                seen.add(len(purged_files(fs, files)))
                await trio.sleep(0)
            freed = await relief.wait()
        return [freed, any(0 < n < 6 for n in seen), len(probe.readings)]

    # One reading, one round of 12 pages in three steps of two units. Between the steps
    # the other task sees 2 or 4 files purged (trio shuffles which runs first in a batch).
    assert run(body) == [12, True, 1]
    fs.volume.check_invariants()


def test_relieve_stops_when_nothing_is_left() -> None:
    fs = Fs()
    config = PressureConfig(min_free=1 << 40)  # never reached

    async def body() -> list[object]:
        async with serving(fs):
            files, kept = await six_units(fs)
            probe = FakeProbe(fs.volume.store, fs, 0)
            freed = await pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator)
            return [
                freed,
                purged_files(fs, files),
                len(fs.volume.reclaim.order),
                sorted(fs.hook.snapshot()[1]) == sorted(f.ino for f in files),
                fs.volume.store.used_pages,
                await fs.read(kept, 0, 4 * P) == page(99) * 4,
            ]

    assert run(body) == [12, [0, 1, 2, 3, 4, 5], 0, True, 4, True]
    fs.volume.check_invariants()


def test_relieve_with_enough_memory_purges_nothing() -> None:
    fs = Fs()
    config = PressureConfig(min_free=8 * P)

    async def body() -> list[object]:
        async with serving(fs):
            files, _ = await six_units(fs)
            probe = probe_short_by(fs, 0, config.min_free)  # exactly min_free
            freed = await pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator)
            return [freed, purged_files(fs, files), fs.hook.snapshot()[0], len(probe.readings)]

    assert run(body) == [0, [], [], 1]
    fs.volume.check_invariants()


def test_relieve_with_nothing_volatile_reads_nothing() -> None:
    fs = Fs()
    config = PressureConfig(min_free=1 << 40)

    async def body() -> tuple[int, int]:
        async with serving(fs):
            await fs.create(b"kept", page(1) * 4)
            probe = FakeProbe(fs.volume.store, fs, 0)
            freed = await pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator)
            return freed, len(probe.readings)

    assert run(body) == (0, 0)
    fs.volume.check_invariants()


class PoolProbe(FakeProbe):
    """The same, counting the pages the daemon keeps in its pool as used (they are)."""

    def available(self) -> int:
        return super().available() - self.store.pool_pages * P


@pytest.mark.parametrize("short", [2, 5])
def test_relieve_returns_the_pool_before_purging(short: int) -> None:
    """Pooled free pages go back first; data is purged only if that was not enough, and
    what such a purge frees is not pooled again."""
    fs = Fs()
    store = fs.volume.store
    config = PressureConfig(min_free=8 * P)

    async def body() -> list[object]:
        async with serving(fs):
            files, _ = await six_units(fs)
            store.pool_max = 4
            store.release(store.alloc_many(4))  # four freed pages kept in the pool
            assert store.pool_pages == 4
            outside = (store.used_pages + store.pool_pages) * P + config.min_free - short * P
            probe = PoolProbe(store, fs, outside)
            freed = await pressure.relieve(fs.volume.reclaim, probe, config, fs.ops.invalidator)
            return [freed, purged_files(fs, files), store.pool_pages]

    # 2 pages short: the pool's 4 are enough. 5 short: then one unit (2 pages) of data would
    # still leave 1 short, so two go (the oldest marks, files 2 and 0), wanting 1.25 x.
    expected = [0, [], 0] if short == 2 else [4, [0, 2], 0]
    assert run(body) == expected
    fs.volume.check_invariants()
