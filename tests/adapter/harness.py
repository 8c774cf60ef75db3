"""Drive :class:`Operations` in-process, as pyfuse3 would, without a mount.

- :func:`context` is a fake request context (pyfuse3's own ``RequestContext``
  can be constructed, but its fields are read-only zeros).
- :class:`InvalidateHook` is the injected invalidation call.  It records every
  call, can hold a call until the test releases it (:meth:`InvalidateHook.arm`,
  a trio-unaware ``threading.Event`` as the real call blocks in the kernel),
  and can model the kernel's page locks: dropping an inode's cache waits while
  a WRITE to that inode is in flight (:meth:`InvalidateHook.lock_pages`).
- :func:`serving` hosts the invalidator's flush tasks, as the daemon does, and
  releases every held call on the way out so that no worker thread is left
  blocked.
- :func:`run` runs a test body under trio with a deadline, which turns a
  deadlock into a failure.  The deadline is a guard, never a way to wait:
  tests wait for events, for tasks to finish, or for
  ``trio.testing.wait_all_tasks_blocked``.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import pyfuse3
import trio
import trio.testing

from vrangefs.operations import Operations
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import (
    NONVOLATILE_B,
    PURGE_B,
    PURGED_B,
    STATS_B,
    VOLATILE_B,
    parse_stats,
)
from vrangefs.volume import Volume

T = TypeVar("T")

ROOT = pyfuse3.ROOT_INODE
DEADLINE = 10.0  # seconds a whole test body may take before it counts as hung
THREAD_WAIT = 10.0  # seconds a held invalidation waits for its release before failing


@dataclass(frozen=True)
class FakeContext:
    """What pyfuse3.RequestContext carries: who made the request."""

    uid: int
    gid: int
    pid: int
    umask: int


def context(
    uid: int | None = None, gid: int | None = None, pid: int = 4242, umask: int = 0o022
) -> pyfuse3.RequestContext:
    fake = FakeContext(
        os.getuid() if uid is None else uid, os.getgid() if gid is None else gid, pid, umask
    )
    return cast(pyfuse3.RequestContext, fake)


@dataclass(frozen=True)
class FakeSetattrFields:
    """What pyfuse3.SetattrFields carries (its own fields are read-only)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def setattr_fields(**update: bool) -> pyfuse3.SetattrFields:
    """``setattr_fields(update_size=True)``: the fields of a SETATTR request."""
    return cast(pyfuse3.SetattrFields, FakeSetattrFields(**update))


def page(n: int, size: int = PAGE_SIZE) -> bytes:
    """*size* bytes that tell page *n* from any other."""
    return bytes([n % 251 + 1]) * size


class Gate:
    """Holds one invalidation call until released."""

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.entered = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    async def wait_entered(self) -> None:
        """Wait (without blocking trio) until the held call has started."""
        entered = await trio.to_thread.run_sync(
            self.entered.wait, THREAD_WAIT, abandon_on_cancel=True
        )
        assert entered, f"the invalidation of inode {self.ino} never started"


class InvalidateHook:
    """The blocking "drop the kernel's cache of one inode" call, recorded.

    ``started`` and ``finished`` list the inodes of calls as they begin and as
    they return.  A call takes the next gate armed for its inode, if any, and
    waits for its release; with :meth:`lock_pages` it also waits while the
    modelled kernel holds pages of the inode locked for a WRITE in flight.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.started: list[int] = []
        self.finished: list[int] = []
        self._gates: defaultdict[int, deque[Gate]] = defaultdict(deque)
        self._armed: list[Gate] = []
        self._locked: Counter[int] = Counter()
        self._entered: defaultdict[int, threading.Event] = defaultdict(threading.Event)
        self.fail: set[int] = set()  # calls for these inodes raise after recording

    def arm(self, ino: int) -> Gate:
        """Hold the next call for *ino* (after those already armed) until released."""
        gate = Gate(ino)
        with self._cond:
            self._gates[ino].append(gate)
            self._armed.append(gate)
        return gate

    def release_all(self) -> None:
        with self._cond:
            for gate in self._armed:
                gate.release()
            self._locked.clear()
            self._cond.notify_all()

    def lock_pages(self, ino: int) -> None:
        """The kernel sent a WRITE to *ino*: its pages stay locked until the reply."""
        with self._cond:
            self._locked[ino] += 1

    def unlock_pages(self, ino: int) -> None:
        with self._cond:
            if self._locked[ino]:
                self._locked[ino] -= 1
            self._cond.notify_all()

    async def wait_started(self, ino: int) -> None:
        """Wait (without blocking trio) until a call for *ino* has started."""
        event = self._event(ino)
        started = await trio.to_thread.run_sync(event.wait, THREAD_WAIT, abandon_on_cancel=True)
        assert started, f"no invalidation of inode {ino} started"

    def snapshot(self) -> tuple[list[int], list[int]]:
        with self._cond:
            return list(self.started), list(self.finished)

    def _event(self, ino: int) -> threading.Event:
        with self._cond:
            return self._entered[ino]

    def __call__(self, ino: int) -> None:
        with self._cond:
            self.started.append(ino)
            self._entered[ino].set()
            gate = self._gates[ino].popleft() if self._gates[ino] else None
        if gate is not None:
            gate.entered.set()
            if not gate.released.wait(THREAD_WAIT):
                raise AssertionError(f"invalidation of inode {ino} held and never released")
        with self._cond:
            if not self._cond.wait_for(lambda: not self._locked[ino], THREAD_WAIT):
                raise AssertionError(f"pages of inode {ino} stayed locked")
            self.finished.append(ino)
        if ino in self.fail:
            raise OSError(5, "injected invalidation failure")


class Call(Generic[T]):
    """A request handled in the background: its answer or FUSEError once done."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._result: T | None = None
        self.error: pyfuse3.FUSEError | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def result(self) -> T:
        assert self.done, "the request has not finished"
        if self.error is not None:
            raise AssertionError(f"the request failed with errno {self.error.errno}")
        return cast(T, self._result)

    @property
    def errno(self) -> int | None:
        assert self.done, "the request has not finished"
        return None if self.error is None else self.error.errno

    async def wait(self) -> T:
        await self._done.wait()
        return self.result

    async def _run(self, fn: Callable[[], Awaitable[T]]) -> None:
        try:
            self._result = await fn()
        except pyfuse3.FUSEError as e:
            self.error = e
        finally:
            self._done.set()


def start(nursery: trio.Nursery, fn: Callable[[], Awaitable[T]]) -> Call[T]:
    """Start a request as a task of its own, as pyfuse3 does for each request."""
    call: Call[T] = Call()
    nursery.start_soon(call._run, fn)
    return call


async def errno_of(request: Awaitable[object]) -> int | None:
    """The errno a request answered with, or None if it succeeded."""
    try:
        await request
    except pyfuse3.FUSEError as e:
        return e.errno
    return None


@dataclass(frozen=True)
class File:
    ino: int
    fh: int  # open for reading and writing (the handle's low bit set)


class Fs:
    """A volume behind the adapter, with the recording hook; the low watermark at the cap
    by default so that a write purges exactly what it needs."""

    def __init__(
        self, cap_pages: int = 64, *, low_watermark: float = 1.0, purged_reads_zeros: bool = False
    ) -> None:
        self.hook = InvalidateHook()
        self.volume = Volume(
            PageStore(cap_pages * PAGE_SIZE),
            purged_reads_zeros=purged_reads_zeros,
            high_watermark=1.0,
            low_watermark=low_watermark,
        )
        self.ops = Operations(self.volume, invalidate=self.hook)
        self.ctx = context()

    # -- requests, as the kernel sends them -------------------------------------
    async def create(self, name: bytes, data: bytes = b"", flags: int = os.O_RDWR) -> File:
        info, attr = await self.ops.create(ROOT, name, 0o644, flags, self.ctx)
        if data:
            assert await self.ops.write(info.fh, 0, data) == len(data)
        return File(attr.st_ino, info.fh)

    async def open(self, ino: int, flags: int) -> int:
        info = await self.ops.open(ino, flags, self.ctx)
        return info.fh

    async def volatile_file(self, name: bytes, pages: int, first: int = 0) -> File:
        """A file of *pages* distinct pages (page numbers from *first*), wholly volatile."""
        f = await self.create(name, b"".join(page(first + i) for i in range(pages)))
        await self.mark_volatile(f.ino)
        return f

    async def mark_volatile(self, ino: int, offset: int = 0, length: int = 0) -> None:
        await self.ops.setxattr(ino, VOLATILE_B, b"%d,%d" % (offset, length), self.ctx)

    async def mark_nonvolatile(self, ino: int, offset: int = 0, length: int = 0) -> None:
        await self.ops.setxattr(ino, NONVOLATILE_B, b"%d,%d" % (offset, length), self.ctx)

    async def purged(self, ino: int) -> bytes:
        return await self.ops.getxattr(ino, PURGED_B, self.ctx)

    async def purge_all(self) -> None:
        await self.ops.setxattr(ROOT, PURGE_B, b"all", self.ctx)

    async def stats(self) -> dict[str, int | str]:
        return parse_stats(await self.ops.getxattr(ROOT, STATS_B, self.ctx))

    async def read(self, f: File, off: int, size: int) -> bytes:
        return bytes(await self.ops.read(f.fh, off, size))

    # -- state, looked at directly ----------------------------------------------
    def purge_oldest(self) -> int:
        """Purge the least recently marked unit now, as memory pressure would."""
        return self.volume.reclaim.for_pressure(1)

    def purged_now(self, ino: int) -> list[tuple[int, int]]:
        """The purged byte ranges in the volume, without waiting for any flush."""
        return list(self.volume.purged_ranges(ino))

    def flushing(self, ino: int) -> bool:
        return self.ops.invalidator.flushing(ino)

    async def settled(self, ino: int) -> None:
        await self.ops.invalidator.settled(ino)


@asynccontextmanager
async def serving(fs: Fs) -> AsyncIterator[trio.Nursery]:
    """Host the invalidator, the process watcher and the reaper as the daemon does; yield a nursery
    for request tasks."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.ops.invalidator.run)
        nursery.start_soon(fs.ops.processes.run)
        nursery.start_soon(fs.ops.reap)
        await trio.testing.wait_all_tasks_blocked()
        try:
            yield nursery
        finally:
            fs.hook.release_all()  # no worker thread may stay held, pass or fail
        nursery.cancel_scope.cancel()


def run(body: Callable[[], Awaitable[T]]) -> T:
    """Run *body* under trio within DEADLINE; a lone error comes out unwrapped."""

    async def guarded() -> T:
        with trio.fail_after(DEADLINE):
            return await body()

    try:
        return trio.run(guarded)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
