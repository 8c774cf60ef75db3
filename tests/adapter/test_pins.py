"""Pins through the adapter: the owner is the calling thread's process, the names keep the
range names' rules, readers pin through system.vrange.* with the daemon's own read check,
and a pin returns only once nothing purged before it is left in the kernel's cache."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from tests.adapter.harness import ROOT, Fs, context, errno_of, page, run, serving
from vrangefs.operations import Operations
from vrangefs.owners import ProcessWatcher
from vrangefs.pagestore import PAGE_SIZE
from vrangefs.protocol import (
    PIN_B,
    PINS_B,
    SYSTEM_PIN_B,
    SYSTEM_UNPIN_B,
    UNPIN_B,
    parse_pins,
)
from vrangefs.volume import Caller

P = PAGE_SIZE
ME = os.getpid()
OTHER_UID = 4321


@pytest.fixture
def thread_id() -> Iterator[int]:
    """The id of a live thread of this process other than the main one."""
    found: list[int] = []
    started, stop = threading.Event(), threading.Event()

    def live() -> None:
        found.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=live)
    thread.start()
    started.wait()
    assert found[0] != ME
    try:
        yield found[0]
    finally:
        stop.set()
        thread.join()


def fake_proc(tmp_path: Path, tid: int, tgid: int, groups: str = "", caps: str = "0") -> str:
    """A /proc with one thread's status, and ``self`` pointing at this process."""
    proc = tmp_path / "proc"
    (proc / str(tid)).mkdir(parents=True)
    (proc / "self").symlink_to(str(ME))
    (proc / str(tid) / "status").write_text(
        f"Name:\tx\nTgid:\t{tgid}\nPid:\t{tid}\nGroups:\t{groups}\nCapEff:\t{caps}\n"
    )
    return str(proc)


async def pins(fs: Fs, ino: int) -> list[tuple[int, int, int, int]]:
    value = await fs.ops.getxattr(ino, PINS_B, fs.ctx)
    return [(p.offset, p.length, p.pid, p.count) for p in parse_pins(value)]


def test_a_pin_belongs_to_the_process_of_the_calling_thread(thread_id: int) -> None:
    fs = Fs()

    async def body() -> list[tuple[int, int, int, int]]:
        async with serving(fs):
            f = await fs.volatile_file(b"f", 3)
            await fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=thread_id))
            await fs.ops.setxattr(f.ino, PIN_B, b"1,1", context(pid=ME))
            await fs.purge_all()
            assert await fs.purged(f.ino) == b""  # the whole unit is held
            listed = await pins(fs, f.ino)
            # Any thread of the process may unpin what another thread pinned.
            await fs.ops.setxattr(f.ino, UNPIN_B, b"0,12288", context(pid=thread_id))
            return listed

    assert run(body) == [(0, P, ME, 1), (0, 3 * P, ME, 1)]
    assert fs.volume.reclaim.pins.holds(ME)
    fs.volume.check_invariants()


def test_counted_pins_and_unpin_of_what_is_not_held() -> None:
    fs = Fs()
    ctx = context(pid=ME)

    async def body() -> None:
        async with serving(fs):
            await counted()

    async def counted() -> None:
        f = await fs.volatile_file(b"f", 2)
        for _ in range(2):
            await fs.ops.setxattr(f.ino, PIN_B, b"0,4K", ctx)
        assert await pins(fs, f.ino) == [(0, P, ME, 2)]
        for value in (b"0,8K", b"4K,4K", b"0,0"):
            assert await errno_of(fs.ops.setxattr(f.ino, UNPIN_B, value, ctx)) == errno.ENOENT
        assert await pins(fs, f.ino) == [(0, P, ME, 2)]
        await fs.ops.setxattr(f.ino, UNPIN_B, b"0,4096", ctx)
        await fs.purge_all()
        assert await fs.purged(f.ino) == b""
        await fs.ops.setxattr(f.ino, UNPIN_B, b"0,1", ctx)
        assert await pins(fs, f.ino) == []
        await fs.purge_all()
        assert await fs.purged(f.ino) == b"0,8192\n"
        assert await errno_of(fs.ops.setxattr(f.ino, UNPIN_B, b"0,1", ctx)) == errno.ENOENT

    run(body)
    assert not fs.volume.reclaim.pins.holds(ME)
    fs.volume.check_invariants()


@pytest.mark.parametrize("name", [PIN_B, UNPIN_B, SYSTEM_PIN_B, SYSTEM_UNPIN_B, PINS_B])
def test_pin_names_on_a_directory_answer_eisdir(name: bytes) -> None:
    fs = Fs()

    async def body() -> tuple[int | None, int | None]:
        d = await fs.ops.mkdir(ROOT, b"d", 0o755, fs.ctx)
        ctx = context(pid=ME)
        if name == PINS_B:
            return (
                await errno_of(fs.ops.getxattr(ROOT, name, ctx)),
                await errno_of(fs.ops.getxattr(d.st_ino, name, ctx)),
            )
        return (
            await errno_of(fs.ops.setxattr(ROOT, name, b"0,0", ctx)),
            await errno_of(fs.ops.setxattr(d.st_ino, name, b"0,0", ctx)),
        )

    assert run(body) == (errno.EISDIR, errno.EISDIR)


@pytest.mark.parametrize("name", [SYSTEM_PIN_B, SYSTEM_UNPIN_B])
def test_system_names_on_special_files_answer_eperm(name: bytes) -> None:
    """What the kernel answers for any user.* setxattr there (it leaves system.* to us)."""
    fs = Fs()

    async def body() -> list[int | None]:
        fifo = await fs.ops.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o644, 0, fs.ctx)
        link = await fs.ops.symlink(ROOT, b"link", b"fifo", fs.ctx)
        return [
            await errno_of(fs.ops.setxattr(ino, name, b"0,0", context(pid=ME)))
            for ino in (fifo.st_ino, link.st_ino)
        ]

    assert run(body) == [errno.EPERM, errno.EPERM]


def test_pins_listing_and_other_names_cannot_be_set_or_read() -> None:
    fs = Fs()

    async def body() -> list[int | None]:
        f = await fs.volatile_file(b"f", 1)
        return [
            await errno_of(fs.ops.setxattr(f.ino, PINS_B, b"0,0", fs.ctx)),
            await errno_of(fs.ops.getxattr(f.ino, PIN_B, fs.ctx)),
            await errno_of(fs.ops.getxattr(f.ino, SYSTEM_PIN_B, fs.ctx)),
            await errno_of(fs.ops.setxattr(f.ino, b"system.vrange.pins", b"0,0", fs.ctx)),
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,x", context(pid=ME))),
        ]

    assert run(body) == [errno.EINVAL, errno.ENODATA, errno.ENODATA, errno.EINVAL, errno.EINVAL]
    assert fs.volume.reclaim.pins.pins == 0


def test_a_caller_the_daemon_cannot_identify_is_refused(tmp_path: Path) -> None:
    fs = Fs()
    ghost = 2**22 + 12345  # above any pid_max: no such thread

    async def body() -> list[int | None]:
        f = await fs.volatile_file(b"f", 1)
        return [
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=0))),
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=ghost))),
            await errno_of(fs.ops.setxattr(f.ino, UNPIN_B, b"0,0", context(pid=0))),
        ]

    assert run(body) == [errno.ESRCH] * 3
    assert fs.volume.reclaim.pins.pins == 0
    # A /proc of another pid namespace: nobody can be identified.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to("1")
    ops = Operations(fs.volume, invalidate=fs.hook, proc=str(proc))
    assert ops.processes.proc_problem is not None

    async def refused() -> int | None:
        return await errno_of(ops.setxattr(2, PIN_B, b"0,0", context(pid=ME)))

    assert trio.run(refused) == errno.ESRCH


def file_of(fs: Fs, mode: int) -> int:
    """A one-page file owned by OTHER_UID:OTHER_UID with *mode*."""
    inode = fs.volume.create(ROOT, b"f", mode, Caller(OTHER_UID, OTHER_UID))
    fs.volume.release(inode.ino)
    fs.volume.write(inode.ino, 0, page(1))
    return inode.ino


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "groups", "caps", "expected"),
    [
        (0o600, OTHER_UID, 1, "", "0", None),  # the owner may read
        (0o200, OTHER_UID, 1, "", "0", errno.EACCES),  # the owner may not: the owner bits count
        (0o640, 1, OTHER_UID, "", "0", None),  # the group may read
        (0o640, 1, 2, f"7 {OTHER_UID}", "0", None),  # ... a supplementary group too
        (0o604, 1, 2, "7", "0", None),  # others may read
        (0o600, 1, 2, "7", "0", errno.EACCES),
        (0o600, 1, 2, "", "2", errno.EACCES),  # capabilities of another user namespace
    ],
)
def test_system_pin_needs_read_permission(
    tmp_path: Path,
    mode: int,
    uid: int,
    gid: int,
    groups: str,
    caps: str,
    expected: int | None,
) -> None:
    fs = Fs()
    ino = file_of(fs, mode)
    tid = 777
    ops = Operations(fs.volume, invalidate=fs.hook, proc=fake_proc(tmp_path, tid, ME, groups, caps))
    ctx = context(uid=uid, gid=gid, pid=tid)

    async def body() -> tuple[int | None, int | None]:
        pinned = await errno_of(ops.setxattr(ino, SYSTEM_PIN_B, b"0,0", ctx))
        unpinned = await errno_of(ops.setxattr(ino, SYSTEM_UNPIN_B, b"0,0", ctx))
        return pinned, unpinned

    pinned, unpinned = trio.run(body)
    assert pinned == expected
    assert unpinned == (errno.ENOENT if expected else None)  # only one's own pins
    assert fs.volume.reclaim.pins.pins == 0
    assert fs.volume.reclaim.pins.released_by_exit == 0


def test_the_daemons_own_privilege_check() -> None:
    """This test runs as root: the real /proc says so, and root may pin any file."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    fs = Fs()
    ino = file_of(fs, 0o000)

    async def body() -> None:
        await fs.ops.setxattr(ino, SYSTEM_PIN_B, b"0,0", context(uid=0, gid=0, pid=ME))

    run(body)
    assert fs.volume.pins(ino)[0].tgid == ME


def test_the_per_user_limit_through_the_adapter() -> None:
    fs = Fs(cap_pages=8)  # a limit of 4 pages per user

    async def body() -> list[int | None]:
        f = await fs.volatile_file(b"f", 4)
        mine, theirs = context(uid=1, pid=ME), context(uid=2, pid=ME)
        return [
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,16K", mine)),
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,4K", mine)),
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,16K", mine)),  # counted: free
            await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"4K,4K", theirs)),
        ]

    assert run(body) == [None, errno.EDQUOT, None, None]
    stats = fs.volume.reclaim.statistics()
    assert (stats.pins, stats.pinned_pages) == (3, 5)


def test_a_pin_returns_once_the_kernel_holds_nothing_purged_before_it() -> None:
    """Pin, then read user.vrange.purged, is race-free; so is reading the data."""
    fs = Fs()

    async def body() -> None:
        async with serving(fs) as nursery:
            f = await fs.volatile_file(b"f", 2)
            gate = fs.hook.arm(f.ino)
            fs.purge_oldest()  # the kernel's copy is still being dropped
            await gate.wait_entered()
            done = trio.Event()

            async def pin() -> None:
                await fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=ME))
                done.set()

            nursery.start_soon(pin)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set() and fs.volume.pins(f.ino)  # pinned, waiting for the flush
            gate.release()
            await done.wait()
            assert not fs.flushing(f.ino)
            assert await fs.purged(f.ino) == b"0,8192\n"

    run(body)


def test_stats_count_pins() -> None:
    fs = Fs()

    async def body() -> dict[str, int | str]:
        f = await fs.volatile_file(b"f", 2)
        await fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=ME))
        await fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=ME))
        return await fs.stats()

    stats = run(body)
    assert stats["pins"] == 2
    assert stats["pinned_bytes"] == stats["pinned_volatile_bytes"] == stats["volatile_bytes"]
    assert stats["pin_owners"] == 1 and stats["pins_released_by_exit"] == 0
    assert stats["pin_limit_bytes"] == 32 * P
    assert stats["purgeable_units"] == 0


def test_pyfuse3_error_for_pins_is_a_fuse_error() -> None:
    """A pin refused deep in the core reaches pyfuse3 as FUSEError, never anything else."""
    fs = Fs()

    async def body() -> None:
        f = await fs.volatile_file(b"f", 1)
        with pytest.raises(pyfuse3.FUSEError):
            await fs.ops.setxattr(f.ino, UNPIN_B, b"0,0", context(pid=ME))

    run(body)


# -- process exit ------------------------------------------------------------------------------
@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child process that lives until killed (and is reaped afterwards)."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


async def released(fs: Fs, tgid: int) -> None:
    """Wait until the pins of *tgid* are gone: the kernel wakes the watcher, the test only
    looks (within the one second the contract allows)."""
    with trio.fail_after(1):
        while fs.volume.reclaim.pins.holds(tgid):
            await trio.sleep(0.001)


def test_the_pins_of_a_killed_process_go_at_once(sleeper: subprocess.Popen[bytes]) -> None:
    fs = Fs()
    theirs = context(pid=sleeper.pid)

    async def body() -> None:
        async with serving(fs):
            f = await fs.volatile_file(b"f", 2)
            g = await fs.volatile_file(b"g", 1, first=2)
            await fs.ops.setxattr(f.ino, PIN_B, b"0,0", theirs)
            await fs.ops.setxattr(f.ino, PIN_B, b"0,0", theirs)
            await fs.ops.setxattr(g.ino, PIN_B, b"0,0", theirs)
            await fs.ops.setxattr(g.ino, PIN_B, b"0,0", context(pid=ME))
            assert len(fs.ops.processes) == 2
            sleeper.kill()
            await released(fs, sleeper.pid)
            assert len(fs.ops.processes) == 1
            assert await pins(fs, f.ino) == [] and await pins(fs, g.ino) == [(0, P, ME, 1)]
            await fs.purge_all()
            assert await fs.purged(f.ino) == b"0,8192\n"  # purgeable again
            assert await fs.purged(g.ino) == b""  # still pinned by this process
            stats = await fs.stats()
            assert (stats["pins"], stats["pins_released_by_exit"]) == (1, 3)

    run(body)
    fs.volume.check_invariants()


def test_the_pins_of_a_process_with_thousands_go_in_slices(
    sleeper: subprocess.Popen[bytes],
) -> None:
    """Releasing an exited process's pins is a job of small steps: requests made
    meanwhile are answered while some of its pins are gone and some are not."""
    count = 5000
    fs = Fs(cap_pages=4 * count)  # a user may pin half the cap
    theirs = context(pid=sleeper.pid)

    async def body() -> list[int]:
        seen: list[int] = []
        async with serving(fs):
            f = await fs.volatile_file(b"f", count)
            for i in range(count):
                await fs.ops.setxattr(f.ino, PIN_B, b"%d,%d" % (i * P, P), theirs)
            sleeper.kill()
            with trio.fail_after(5):
                while not seen or seen[-1]:
                    seen.append(int((await fs.stats())["pins"]))
                    await trio.sleep(0)
            await fs.purge_all()
            assert await fs.purged(f.ino) == b"0,%d\n" % (count * P)  # purgeable again
        return seen

    seen = run(body)
    assert any(0 < pins < count for pins in seen), seen
    assert fs.volume.reclaim.pins.released_by_exit == count
    fs.volume.check_invariants()


def test_a_process_is_watched_only_while_it_holds_pins(sleeper: subprocess.Popen[bytes]) -> None:
    fs = Fs(cap_pages=8)
    theirs = context(pid=sleeper.pid)

    async def body() -> list[int]:
        watched = []
        async with serving(fs):
            f = await fs.volatile_file(b"f", 2)
            empty = await fs.create(b"empty")
            await fs.ops.setxattr(f.ino, PIN_B, b"0,0", theirs)
            watched.append(len(fs.ops.processes))
            await fs.ops.setxattr(f.ino, UNPIN_B, b"0,0", theirs)
            watched.append(len(fs.ops.processes))
            assert await errno_of(fs.ops.setxattr(f.ino, PIN_B, b"0,1M", theirs)) == errno.EDQUOT
            watched.append(len(fs.ops.processes))
            await fs.ops.setxattr(empty.ino, PIN_B, b"0,0", theirs)  # pins nothing
            watched.append(len(fs.ops.processes))
            await fs.ops.setxattr(f.ino, PIN_B, b"0,0", theirs)
            await fs.ops.unlink(ROOT, b"f", fs.ctx)
            await fs.ops.release(f.fh)
            await fs.ops.forget([(pyfuse3.InodeT(f.ino), 1)])  # the file is freed: its pins go
            watched.append(len(fs.ops.processes))
        return watched

    assert run(body) == [1, 0, 0, 0, 0]
    assert fs.volume.reclaim.pins.released_by_exit == 0


def test_a_process_that_died_in_its_request_loses_the_pin_at_once() -> None:
    """The caller is killed while its pin is in flight: it is a zombie when the daemon opens
    its pidfd, which is readable at once."""
    fs = Fs()
    child = subprocess.Popen(["sleep", "600"])
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie

    async def body() -> None:
        async with serving(fs):
            f = await fs.volatile_file(b"f", 1)
            await fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=child.pid))
            await released(fs, child.pid)

    try:
        run(body)
    finally:
        child.wait()
    assert fs.volume.reclaim.pins.released_by_exit == 1
    fs.volume.check_invariants()


def test_exits_while_not_served_are_seen_once_serving(sleeper: subprocess.Popen[bytes]) -> None:
    fs = Fs()

    async def body() -> None:
        f = await fs.volatile_file(b"f", 1)
        await fs.ops.setxattr(f.ino, PIN_B, b"0,0", context(pid=sleeper.pid))
        sleeper.kill()
        async with serving(fs):
            await released(fs, sleeper.pid)

    run(body)
    assert len(fs.ops.processes) == 0


# -- identifying the caller cheaply ------------------------------------------------------------
def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_main_thread_is_identified_by_a_pidfd_other_threads_through_proc(
    thread_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc is read only for a thread that is not its process's main one, and for the
    credentials of a read-checked pin; the pidfd that identified a caller is the one watched."""
    fds = open_fds()
    watcher = ProcessWatcher(lambda tgid: None)
    opened: list[str] = []
    real_open = os.open

    def spy(path: str, *args: int) -> int:
        opened.append(path)
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", spy)  # what vrangefs.owners calls
    assert watcher.identify(ME).tgid == ME
    watcher.watch(ME)  # with the pidfd identify() opened
    assert len(open_fds() - fds) == 2  # the epoll set and one pidfd
    assert watcher.identify(ME).tgid == ME  # watched: not even a pidfd
    assert opened == []
    assert watcher.identify(thread_id).tgid == ME
    assert opened == [f"/proc/{thread_id}/status"]
    process = watcher.identify(ME, credentials=True)
    assert (process.tgid, opened[1:]) == (ME, [f"/proc/{ME}/status"])
    watcher.owner_gone(ME)
    assert watcher.identify(ME).tgid == ME  # not watched: a pidfd, kept for watch() ...
    assert watcher.identify(thread_id).tgid == ME  # ... and closed by the next request
    assert len(open_fds() - fds) == 1  # the epoll set


@pytest.mark.parametrize("credentials", [False, True])
def test_a_watched_process_that_exited_is_released_before_anyone_is_identified(
    sleeper: subprocess.Popen[bytes], credentials: bool
) -> None:
    """Its pid could be reused at once: identify() handles the exits the epoll set reports
    before it trusts a watched pid, without waiting for the event loop."""
    exited: list[int] = []
    watcher = ProcessWatcher(exited.append)
    assert watcher.identify(sleeper.pid).tgid == sleeper.pid
    watcher.watch(sleeper.pid)
    sleeper.kill()
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)  # dead: its pidfd is readable
    assert watcher.identify(ME, credentials=credentials).tgid == ME
    assert (exited, len(watcher)) == ([sleeper.pid], 0)
