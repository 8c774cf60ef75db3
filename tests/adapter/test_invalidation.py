"""Invalidation of the kernel's cache after purges, with a recording hook.

The rules (vrangefs.invalidation): a purge invalidates exactly the purged
inodes; a request that purged returns once those are flushed; reading
``user.vrange.purged`` and marking non-volatile wait for a flush under way; a
WRITE never waits for an inode with a WRITE in our hands (its own included),
which keeps two evicting writers from deadlocking; purges during a flush cause
one more pass, and a waiter waits only for the generation it saw; the purge
counters of ``user.vrange.stats`` leave out purges still flushing.

Held invalidations block on a trio-unaware ``threading.Event`` in a worker
thread, as the real call blocks in the kernel.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio.testing

from tests.adapter.harness import Fs, page, run, serving, setattr_fields, start
from vrangefs.pagestore import PAGE_SIZE

P = PAGE_SIZE


def test_purge_all_invalidates_exactly_the_purged_inodes() -> None:
    fs = Fs()

    async def body() -> tuple[int, int, list[int], list[int], list[bytes]]:
        async with serving(fs):
            a = await fs.volatile_file(b"a", 2)
            b = await fs.volatile_file(b"b", 3)
            kept = await fs.create(b"kept", page(7) * 2)  # not volatile
            hole = await fs.create(b"hole")  # volatile, but over a hole only
            await fs.ops.setattr(hole.ino, size_attr(4 * P), size_only(), None, fs.ctx)
            await fs.mark_volatile(hole.ino)
            unmarked = await fs.volatile_file(b"unmarked", 2)
            await fs.mark_nonvolatile(unmarked.ino)
            await fs.purge_all()
            started, finished = fs.hook.snapshot()  # complete as the purge returns
            answers = [await fs.purged(f.ino) for f in (a, b, kept, hole, unmarked)]
            assert await fs.read(kept, 0, 2 * P) == page(7) * 2
        return a.ino, b.ino, started, finished, answers

    a, b, started, finished, answers = run(body)
    assert sorted(started) == sorted(finished) == sorted([a, b])
    assert answers == [b"0,8192\n", b"0,12288\n", b"", b"", b""]
    fs.volume.check_invariants()


def size_attr(size: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = size
    return attr


def size_only() -> pyfuse3.SetattrFields:
    return setattr_fields(update_size=True)


def test_purge_all_returns_only_after_every_invalidation() -> None:
    fs = Fs()

    async def body() -> list[bool]:
        seen = []
        async with serving(fs) as nursery:
            a = await fs.volatile_file(b"a", 1)
            b = await fs.volatile_file(b"b", 1)
            gate_a, gate_b = fs.hook.arm(a.ino), fs.hook.arm(b.ino)
            purge = start(nursery, fs.purge_all)
            await gate_a.wait_entered()
            await gate_b.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            seen.append(purge.done)
            gate_a.release()
            await fs.settled(a.ino)
            await trio.testing.wait_all_tasks_blocked()
            seen.append(purge.done)  # b still held
            gate_b.release()
            await purge.wait()
            seen.append(purge.done)
        return seen

    assert run(body) == [False, False, True]
    fs.volume.check_invariants()


def test_a_write_at_the_cap_invalidates_exactly_what_it_purged_and_waits_for_it() -> None:
    fs = Fs(cap_pages=16)

    async def body() -> tuple[int, list[int], bool, int, bytes, bytes]:
        async with serving(fs) as nursery:
            old = await fs.volatile_file(b"old", 4)  # marked first: purged first
            new = await fs.volatile_file(b"new", 4)
            await fs.create(b"kept", page(9) * 6)
            writer = await fs.create(b"writer")  # 14 of 16 pages used
            gate = fs.hook.arm(old.ino)
            write = start(nursery, lambda: fs.ops.write(writer.fh, 0, page(1) * 4))
            await gate.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            done_while_held = write.done
            gate.release()
            written = await write.wait()
            started, _ = fs.hook.snapshot()
            return (
                old.ino,
                started,
                done_while_held,
                written,
                await fs.purged(old.ino),
                await fs.purged(new.ino),
            )

    old, started, done_while_held, written, purged_old, purged_new = run(body)
    assert started == [old]
    assert not done_while_held
    assert written == 4 * P
    assert (purged_old, purged_new) == (b"0,16384\n", b"")
    fs.volume.check_invariants()


def test_getxattr_purged_waits_for_a_flush_under_way() -> None:
    fs = Fs()

    async def body() -> tuple[bool, bytes, bool, bytes]:
        async with serving(fs) as nursery:
            a = await fs.volatile_file(b"a", 2)
            b = await fs.volatile_file(b"b", 2)
            gate = fs.hook.arm(a.ino)
            fs.purge_oldest()  # a, as memory pressure would
            await gate.wait_entered()
            query = start(nursery, lambda: fs.purged(a.ino))
            await trio.testing.wait_all_tasks_blocked()
            answered_while_held = query.done
            other = await fs.purged(b.ino)  # per inode: b has nothing flushing
            gate.release()
            answer = await query.wait()
            return answered_while_held, answer, fs.flushing(a.ino), other

    assert run(body) == (False, b"0,8192\n", False, b"")
    fs.volume.check_invariants()


def test_setxattr_nonvolatile_waits_for_a_flush_under_way() -> None:
    fs = Fs()

    async def body() -> tuple[bool, list[tuple[int, int]], list[tuple[int, int]], bytes]:
        async with serving(fs) as nursery:
            a = await fs.volatile_file(b"a", 2)
            gate = fs.hook.arm(a.ino)
            fs.purge_oldest()
            await gate.wait_entered()
            unmark = start(nursery, lambda: fs.mark_nonvolatile(a.ino))
            await trio.testing.wait_all_tasks_blocked()
            done_while_held = unmark.done
            units_while_held = list(fs.volume.volatile_ranges(a.ino))  # not yet unmarked
            gate.release()
            await unmark.wait()
            return (
                done_while_held,
                units_while_held,
                list(fs.volume.volatile_ranges(a.ino)),
                await fs.purged(a.ino),
            )

    assert run(body) == (False, [(0, 2 * P)], [], b"0,8192\n")
    fs.volume.check_invariants()


def test_a_write_does_not_wait_for_its_own_inode() -> None:
    """A WRITE that purges its own file's unit returns with that flush still held."""
    fs = Fs(cap_pages=8)

    async def body() -> tuple[bool, bool, bool, bytes]:
        async with serving(fs) as nursery:
            a = await fs.volatile_file(b"a", 4)
            await fs.create(b"kept", page(9) * 4)  # the cap is full
            gate = fs.hook.arm(a.ino)
            write = start(nursery, lambda: fs.ops.write(a.fh, 4 * P, page(4) * 4))
            await gate.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            done_while_held = write.done
            flushing = fs.flushing(a.ino)
            gate.release()
            await write.wait()
            await fs.settled(a.ino)
            return done_while_held, flushing, fs.flushing(a.ino), await fs.purged(a.ino)

    assert run(body) == (True, True, False, b"0,16384\n")
    fs.volume.check_invariants()


def test_a_write_does_not_wait_for_an_inode_with_a_write_in_our_hands() -> None:
    """W0 (to b) waits for x's flush; W1 then purges b's unit and does not wait for b."""
    fs = Fs(cap_pages=12)

    async def body() -> list[object]:
        async with serving(fs) as nursery:
            x = await fs.volatile_file(b"x", 4)  # oldest
            b = await fs.volatile_file(b"b", 4)
            a = await fs.create(b"a", page(9) * 4)  # the cap is full
            gate_x, gate_b = fs.hook.arm(x.ino), fs.hook.arm(b.ino)
            w0 = start(nursery, lambda: fs.ops.write(b.fh, 4 * P, page(5) * 4))  # purges x
            await gate_x.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            w0_waits = not w0.done
            w1 = start(nursery, lambda: fs.ops.write(a.fh, 4 * P, page(6)))  # purges b
            await gate_b.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            state: list[object] = [w0_waits, w1.done, w0.done]
            gate_x.release()
            await w0.wait()
            gate_b.release()
            await fs.settled(b.ino)
            state += [w1.result, await fs.purged(x.ino), await fs.purged(b.ino)]
            return state

    assert run(body) == [True, True, False, P, b"0,16384\n", b"0,16384\n"]
    fs.volume.check_invariants()


def test_two_writers_purging_each_others_files_do_not_deadlock() -> None:
    """The kernel holds the pages of a WRITE in flight locked until the reply, and
    dropping an inode's cache waits for them.  W1 (to a) purges b's unit and waits
    for b, whose invalidation waits for W2's reply; W2 (to b) purges a's unit, whose
    invalidation waits for W1's reply: W2 must not wait for a, or neither returns.
    """
    fs = Fs(cap_pages=8)

    async def body() -> list[object]:
        hook = fs.hook
        async with serving(fs) as nursery:
            b = await fs.volatile_file(b"b", 4)  # marked first: W1 purges it
            a = await fs.volatile_file(b"a", 4, first=10)
            hook.lock_pages(a.ino)  # both WRITEs are in flight in the kernel
            hook.lock_pages(b.ino)
            w1 = start(nursery, lambda: fs.ops.write(a.fh, 4 * P, page(1) * 4))
            await hook.wait_started(b.ino)
            await trio.testing.wait_all_tasks_blocked()
            w1_waits = not w1.done
            w2 = start(nursery, lambda: fs.ops.write(b.fh, 4 * P, page(2)))
            written2 = await w2.wait()
            _, finished_at_w2_reply = hook.snapshot()
            hook.unlock_pages(b.ino)  # W2's reply: its pages unlock
            written1 = await w1.wait()
            hook.unlock_pages(a.ino)
            await fs.settled(a.ino)
            return [
                w1_waits,
                finished_at_w2_reply,
                written1,
                written2,
                sorted(hook.snapshot()[1]) == sorted([a.ino, b.ino]),
                await fs.purged(a.ino),
                await fs.purged(b.ino),
                await fs.read(a, 4 * P, 4 * P) == page(1) * 4,
                await fs.read(b, 4 * P, P) == page(2),
            ]

    assert run(body) == [True, [], 4 * P, P, True, b"0,16384\n", b"0,16384\n", True, True]
    fs.volume.check_invariants()


def test_purges_during_a_flush_cause_one_more_pass() -> None:
    fs = Fs()

    async def body() -> tuple[list[int], int, int | str]:
        async with serving(fs):
            a = await fs.create(b"a", b"".join(page(i) for i in range(4)))
            for i in range(4):  # four units, oldest first
                await fs.mark_volatile(a.ino, i * P, P)
            gate = fs.hook.arm(a.ino)
            fs.purge_oldest()
            await gate.wait_entered()
            for _ in range(3):  # purges while the first pass is held
                fs.purge_oldest()
            gate.release()
            await fs.settled(a.ino)
            return fs.hook.snapshot()[1], a.ino, (await fs.stats())["purge_events"]

    finished, a, events = run(body)
    assert finished == [a, a]  # one more pass for the three, not three
    assert events == 4
    fs.volume.check_invariants()


def test_a_waiter_is_not_starved_by_later_purges() -> None:
    fs = Fs()

    async def body() -> list[bool]:
        seen = []
        async with serving(fs) as nursery:
            a = await fs.create(b"a", b"".join(page(i) for i in range(3)))
            for i in range(3):
                await fs.mark_volatile(a.ino, i * P, P)
            gates = [fs.hook.arm(a.ino) for _ in range(3)]
            fs.purge_oldest()  # generation 1: pass 1 held
            await gates[0].wait_entered()
            first = start(nursery, lambda: fs.purged(a.ino))
            await trio.testing.wait_all_tasks_blocked()  # it waits for generation 1
            fs.purge_oldest()  # generation 2
            second = start(nursery, lambda: fs.purged(a.ino))  # waits for generation 2
            await trio.testing.wait_all_tasks_blocked()
            seen += [first.done, second.done]
            gates[0].release()
            await gates[1].wait_entered()  # pass 2 runs: pass 1 is over
            await trio.testing.wait_all_tasks_blocked()
            seen += [first.done, second.done]
            fs.purge_oldest()  # generation 3 arrives while pass 2 is held
            gates[1].release()
            await gates[2].wait_entered()  # pass 3 held: the second waiter must not need it
            await trio.testing.wait_all_tasks_blocked()
            seen += [second.done, fs.flushing(a.ino)]
            gates[2].release()
            await fs.settled(a.ino)
            seen.append(len(fs.hook.snapshot()[1]) == 3)
        return seen

    assert run(body) == [False, False, True, False, True, True, True]
    fs.volume.check_invariants()


def test_stats_leave_out_purges_whose_flush_has_not_finished() -> None:
    fs = Fs()
    keys = ("purge_events", "purged_bytes_total", "purge_events_explicit")

    async def body() -> list[tuple[int | str, ...]]:
        seen = []
        async with serving(fs) as nursery:
            a = await fs.volatile_file(b"a", 2)
            b = await fs.volatile_file(b"b", 3)
            stats = await fs.stats()
            seen.append(tuple(stats[k] for k in keys))
            gate = fs.hook.arm(a.ino)
            purge = start(nursery, fs.purge_all)
            await gate.wait_entered()
            await fs.settled(b.ino)  # b's flush is over, a's hook has not returned
            stats = await fs.stats()
            seen.append(tuple(stats[k] for k in keys))
            seen.append((stats["resident_bytes"],))  # the pages themselves are gone at once
            gate.release()
            await purge.wait()
            stats = await fs.stats()
            seen.append(tuple(stats[k] for k in keys))
            seen.append((stats["invalidations"],))
        return seen

    assert run(body) == [(0, 0, 0), (1, 3 * P, 1), (0,), (2, 5 * P, 2), (2,)]
    fs.volume.check_invariants()


def test_a_failing_invalidation_is_logged_and_holds_no_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs = Fs()

    async def body() -> tuple[int, bytes, int | str]:
        async with serving(fs):
            a = await fs.volatile_file(b"a", 1)
            fs.hook.fail.add(a.ino)
            await fs.purge_all()  # answers normally: the purge itself happened
            return a.ino, await fs.purged(a.ino), (await fs.stats())["purge_events"]

    a, purged, events = run(body)
    assert (purged, events) == (b"0,4096\n", 1)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"invalidating inode {a} failed" in record.getMessage()
    fs.volume.check_invariants()


def test_purges_before_the_invalidator_runs_are_flushed_once_it_starts() -> None:
    fs = Fs()

    async def body() -> tuple[int, bool, list[int], list[int], bool]:
        a = await fs.volatile_file(b"a", 1)
        fs.purge_oldest()  # before run(): nothing can flush yet
        flushing_before = fs.flushing(a.ino)
        before = fs.hook.snapshot()[0]
        async with serving(fs):
            await fs.settled(a.ino)
            return a.ino, flushing_before, before, fs.hook.snapshot()[1], fs.flushing(a.ino)

    a, flushing_before, before, finished, flushing_after = run(body)
    assert (flushing_before, before, finished, flushing_after) == (True, [], [a], False)
    fs.volume.check_invariants()


def test_a_write_that_purges_and_then_fails_waits_for_its_purges() -> None:
    fs = Fs(cap_pages=8)

    async def body() -> tuple[int | None, bool, bytes]:
        async with serving(fs) as nursery:
            a = await fs.volatile_file(b"a", 2)
            await fs.create(b"kept", page(9) * 6)  # the cap is full, 2 pages volatile
            writer = await fs.create(b"writer")
            gate = fs.hook.arm(a.ino)
            write = start(nursery, lambda: fs.ops.write(writer.fh, 0, page(1) * 4))
            await gate.wait_entered()  # a was purged for it...
            await trio.testing.wait_all_tasks_blocked()
            done_while_held = write.done
            gate.release()
            await write._done.wait()
            return write.errno, done_while_held, await fs.purged(a.ino)

    err, done_while_held, purged = run(body)
    assert err == errno.ENOSPC  # ...and still it did not fit
    assert purged == b"0,8192\n"
    assert not done_while_held, "the failed WRITE answered while a's flush was held"


def test_the_invalidations_statistic_counts_every_drop() -> None:
    fs = Fs()

    async def body() -> tuple[int, int | str]:
        async with serving(fs):
            a = await fs.create(b"a", page(0) + page(1))
            await fs.mark_volatile(a.ino, 0, P)
            await fs.mark_volatile(a.ino, P, P)
            gate = fs.hook.arm(a.ino)
            fs.purge_oldest()
            await gate.wait_entered()
            fs.purge_oldest()  # one more pass
            gate.release()
            await fs.settled(a.ino)
            return len(fs.hook.snapshot()[1]), (await fs.stats())["invalidations"]

    drops, counted = run(body)
    assert drops == 2
    assert counted == drops
