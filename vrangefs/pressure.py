"""Purge volatile units when the machine runs short of memory, as ashmem's shrinker did.

The memory cap alone does not help a machine whose other programs need the
memory.  The watcher polls :class:`MemoryProbe` (MemAvailable, or the daemon's
cgroup headroom if lower) and, when less than ``min_free`` is available,
purges units in the usual order (least recently marked first) until
``min_free`` plus a quarter is available again or nothing volatile is left.
Freed pages go back to the kernel at once (the page store madvises them), so
the effect is visible on the next reading.

Where the kernel offers a PSI trigger (/proc/pressure/memory or a cgroup v2
``memory.pressure``), a stall wakes the watcher before its next poll.  Some
kernels refuse triggers (EINVAL, as with PSI disabled at boot); then polling
alone does the job.
"""

from __future__ import annotations

import errno
import logging
import os
import select

import trio

from vrangefs.config import PressureConfig
from vrangefs.invalidation import Invalidator
from vrangefs.memory import MemoryProbe
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.reclaim import Reclaim

log = logging.getLogger(__name__)

PSI_TRIGGER = b"some 100000 1000000"  # 100 ms of stall within any 1 s window
ROUND_PAGES = 65536  # purge at most 256 MiB between two readings
PURGES_PER_STEP = 32  # units or cache files purged between two chances for requests to run


class PsiTrigger:
    """A PSI trigger file descriptor, polled for POLLPRI in a worker thread."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._poll = select.poll()
        self._poll.register(fd, select.POLLPRI)

    @classmethod
    def open(cls, paths: list[str]) -> PsiTrigger | None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.write(fd, PSI_TRIGGER)
            except OSError as e:
                os.close(fd)
                log.info(
                    "PSI trigger on %s refused (%s): polling only",
                    path,
                    errno.errorcode.get(e.errno or 0),
                )
                continue
            return cls(fd, path)
        return None

    def wait(self, timeout: float) -> bool:
        """Block up to *timeout* seconds; True if the trigger fired."""
        return bool(self._poll.poll(int(timeout * 1000)))

    def close(self) -> None:
        os.close(self.fd)


async def watch(
    reclaim: Reclaim,
    probe: MemoryProbe,
    config: PressureConfig,
    invalidator: Invalidator,
) -> None:
    """Run until cancelled: purge volatile units whenever available memory is short."""
    paths = []
    if probe.cgroup is not None and probe.cgroup.pressure is not None:
        paths.append(str(probe.cgroup.pressure))
    paths.append("/proc/pressure/memory")
    trigger = PsiTrigger.open(paths)
    log.info(
        "pressure purging on: min free %d bytes of %s, every %.1fs%s",
        config.min_free,
        probe.describe(),
        config.interval,
        f", PSI trigger on {trigger.path}" if trigger else "",
    )
    try:
        while True:
            if trigger is not None:
                await trio.to_thread.run_sync(trigger.wait, config.interval, abandon_on_cancel=True)
            else:
                await trio.sleep(config.interval)
            await relieve(reclaim, probe, config, invalidator)
    finally:
        if trigger is not None:
            trigger.close()


async def _purging(reclaim: Reclaim, pages: int, invalidator: Invalidator) -> tuple[int, set[int]]:
    """Purge *pages* pages for pressure, PURGES_PER_STEP units or files per step with
    requests served in between (a round of 65,536 one-page units is a second of work);
    returns the pages freed and the inodes purged."""
    freed = 0
    inodes: set[int] = set()
    while freed < pages and len(reclaim.order):
        with invalidator.recording() as purged:
            freed += reclaim.for_pressure(pages - freed, PURGES_PER_STEP)
        inodes |= purged
        await trio.sleep(0)
    return freed, inodes


async def _return_freed(store: PageStore) -> int:
    """Hand every freed page the daemon still holds back to the kernel, the ones waiting
    to be returned (and those in the tables of freed files) a step at a time, then the
    pool; returns how many."""
    returned = 0
    while True:
        got = store.return_some()
        if not got and not store.free_pending():
            break
        returned += got
        await trio.sleep(0)
    return returned + store.trim_pool()


async def relieve(
    reclaim: Reclaim,
    probe: MemoryProbe,
    config: PressureConfig,
    invalidator: Invalidator,
) -> int:
    """Purge until available memory is back above the threshold; returns pages freed.

    Each round returns once the kernel's cache holds none of its purged pages.
    """
    total = 0
    while len(reclaim.order):
        available = probe.available()
        if available >= config.min_free:
            break
        if pooled := await _return_freed(reclaim.store):
            # Freed pages the daemon kept for reuse go back before any data does.
            log.info("memory pressure: returned %d bytes of freed pages", pooled * PAGE_SIZE)
            continue
        wanted = config.min_free + config.min_free // 4 - available
        pages = min(-(-wanted // PAGE_SIZE), ROUND_PAGES)
        freed, purged = await _purging(reclaim, pages, invalidator)
        await _return_freed(reclaim.store)  # what a purge for pressure frees goes back now
        await invalidator.settle(purged)
        total += freed
        log.info(
            "memory pressure: %d bytes available, purged %d bytes", available, freed * PAGE_SIZE
        )
        await trio.sleep(0)  # let requests run between rounds
        if freed == 0:
            break
    return total
