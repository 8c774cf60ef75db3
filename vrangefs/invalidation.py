"""The one owner of the rule "after a purge, no reader sees the old bytes".

The kernel caches file pages (``keep_cache``: shared mmap needs it), so when
reclaim discards pages the kernel's copy must be dropped too.  Reclaim reports
each purge to :meth:`Invalidator.purged` in the same atomic step as the purge;
from then until the kernel has dropped the inode's cached pages the inode is
*flushing*.  This is the lock half of the contract's per-inode ``vrange_root``
(the interval tree half is :class:`vrangefs.vrange.VrangeRoot`), kept here
because waiting is an event-loop matter:

- Every way a process can learn of a purge waits for it: marking non-volatile
  and reading ``user.vrange.purged`` wait until the inode is no longer flushing
  (:meth:`settled`); a request that purged returns once its purges are flushed
  (:meth:`settle`); and the purge counters of ``user.vrange.stats`` leave out
  purges still flushing (:meth:`unpublished`).
- Generations, not a plain lock: each purge of an inode bumps its generation,
  and a waiter waits for the generation it saw, so purges that keep coming
  cannot starve it.  One invalidation task per inode repeats until the kernel
  holds nothing older than the newest purge.
- Deadlock rules.  Dropping an inode's cache waits for pages the kernel holds
  locked for requests in flight: a READ, and the pages of a WRITE until we
  reply.  So (1) the daemon never caps its request tasks (a waiting request
  must never keep a READ from being served), and (2) a WRITE never waits for an
  inode that has a WRITE in our hands, its own included (:meth:`writing`);
  those are flushed in the background.
- Invalidation runs in worker threads of its own limiter, since the call
  blocks in the kernel.

Evictions of cache-directory files are told to the kernel here too: each name
the file had is deleted from the kernel's dentry cache.  The injected
``delete_entry`` does it (the adapter unlinks the name through the mount, so
that inotify watchers get IN_DELETE, or else notifies the kernel); the path it
needs is looked up first, in the event loop (``name_path``).  Nobody waits for
that: until the kernel has dropped a name, the daemon answers requests for the
evicted inode with ESTALE, and the kernel looks the name up again.  Deleting an
entry waits for the directory's lock, which a request in our hands may hold
while it waits for an invalidation (setxattr purge-all on the root): so
deletions run in a thread of their own, one batch at a time, never in the
invalidation threads.

The kernel calls themselves are injected, so this module knows nothing of
pyfuse3 and adapter tests can record what is invalidated.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import trio

from vrangefs.protocol import PurgeCause

log = logging.getLogger(__name__)

INVALIDATION_THREADS = 64
DELETION_BATCH = 256  # names deleted from the kernel's cache per worker-thread call

DeleteEntry = Callable[[int, bytes, int, "bytes | None"], None]
"""Tell the kernel that name *name* of directory *parent*, inode *ino*, is gone (blocking).

The last argument is the name's path, if known (from ``name_path``)."""

NamePath = Callable[[int, bytes], "bytes | None"]
"""The path of name *name* of directory *parent*, for the unlink (None: not reachable)."""


class _Flush:
    """The invalidation state of one inode while it has purges not yet flushed."""

    __slots__ = ("clean", "done", "purged", "running", "unpublished")

    def __init__(self) -> None:
        self.purged = 0  # generation: purges of this inode so far
        self.clean = 0  # purges whose pages the kernel no longer caches
        self.running = False
        self.done = trio.Event()  # set, and replaced, after every pass
        self.unpublished: list[tuple[int, PurgeCause, int]] = []  # (generation, cause, pages)


class _Recording:
    """:meth:`Invalidator.recording`'s context manager: a class, not a generator, since
    every mark and write passes through one (a microsecond less each)."""

    __slots__ = ("_invalidator", "_outer")

    def __init__(self, invalidator: Invalidator) -> None:
        self._invalidator = invalidator

    def __enter__(self) -> set[int]:
        self._outer = self._invalidator.record()
        purged = self._invalidator._recording
        assert purged is not None
        return purged

    def __exit__(self, *exc_info: object) -> None:
        self._invalidator.recorded(self._outer)


class Invalidator:
    """Drops the kernel's cached copy of purged pages and orders readers after it."""

    def __init__(
        self,
        invalidate: Callable[[int], None],
        delete_entry: DeleteEntry | None = None,
        name_path: NamePath | None = None,
    ) -> None:
        self._invalidate = invalidate  # blocking: drop the kernel's cache of one inode
        self._delete_entry = delete_entry
        self._name_path = name_path
        self._deletions: deque[tuple[int, bytes, int]] = deque()
        self._deleting = False
        self._deletion_limiter = trio.CapacityLimiter(1)
        self.entries_deleted = 0
        self.entries_queued = 0  # names handed to _delete_entry so far: a generation
        self._entries_done = trio.Event()  # set, and replaced, after every batch
        self._flushes: dict[int, _Flush] = {}
        self._writing: Counter[int] = Counter()  # inodes with a WRITE in our hands
        self._recording: set[int] | None = None
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(INVALIDATION_THREADS)
        self._unpublished_pages: Counter[PurgeCause] = Counter()
        self._unpublished_units: Counter[PurgeCause] = Counter()
        self.invalidations = 0
        self.invalidation_max_s = 0.0

    # -- told by reclaim ----------------------------------------------------
    def purged(self, ino: int, cause: PurgeCause, pages: int) -> None:
        """Reclaim discarded *pages* pages of *ino*: start dropping the kernel's copy."""
        flush = self._flushes.get(ino)
        if flush is None:
            flush = self._flushes[ino] = _Flush()
        flush.purged += 1
        flush.unpublished.append((flush.purged, cause, pages))
        self._unpublished_pages[cause] += pages
        self._unpublished_units[cause] += 1
        if self._recording is not None:
            self._recording.add(ino)
        self._start(ino, flush)

    def evicted(
        self, ino: int, cause: PurgeCause, pages: int, names: list[tuple[int, bytes]]
    ) -> None:
        """Reclaim evicted a cache-directory file: drop its names from the kernel's cache."""
        if self._delete_entry is None:
            return
        self._deletions.extend((parent, name, ino) for parent, name in names)
        self.entries_queued += len(names)
        self._start_deleting()

    async def deleted(self, generation: int) -> None:
        """Wait until the kernel was told of the first *generation* evicted names.

        Only WRITE handlers may wait for this: telling the kernel takes the name's
        directory lock, which a request such as a create in that directory, or a
        setxattr on it, holds while it is in our hands.
        """
        while self.entries_deleted < generation:
            await self._entries_done.wait()

    def deletions_pending(self) -> int:
        """Names of evicted files the kernel may still hold."""
        return len(self._deletions)

    # -- used by request handlers ---------------------------------------------
    def recording(self) -> _Recording:
        """Collect the inodes purged inside the block, which must not await (or it would
        collect other requests' purges too)."""
        return _Recording(self)

    def record(self) -> set[int] | None:
        """:meth:`recording` in two calls instead of four, for a mark's hot path: start
        collecting the inodes purged from now on; pass what it returns to :meth:`recorded`
        (in a ``finally``), which ends the collection and returns it."""
        outer = self._recording
        self._recording = set()
        return outer

    def recorded(self, outer: set[int] | None) -> set[int]:
        """The inodes purged since the :meth:`record` that returned *outer*."""
        purged = self._recording
        assert purged is not None
        if outer is not None:
            outer |= purged
        self._recording = outer
        return purged

    @contextmanager
    def writing(self, ino: int) -> Iterator[None]:
        """Mark a WRITE to *ino* as in our hands for the duration of the block."""
        self._writing[ino] += 1
        try:
            yield
        finally:
            self._writing[ino] -= 1
            if not self._writing[ino]:
                del self._writing[ino]

    def flushing(self, ino: int) -> bool:
        """Whether the kernel may still cache pages of *ino* that were purged."""
        flush = self._flushes.get(ino)
        return flush is not None and flush.clean < flush.purged

    async def settled(self, ino: int) -> None:
        """Wait until the kernel caches nothing of *ino* purged before this call."""
        flush = self._flushes.get(ino)
        if flush is None:
            return
        target = flush.purged
        while flush.clean < target:
            await flush.done.wait()

    async def settle(self, inos: Iterable[int], *, from_write: bool = False) -> None:
        """Wait until the purges of *inos* so far are flushed.

        From a WRITE handler, inodes with a WRITE in our hands are left to flush
        in the background (waiting for them could deadlock two writers).
        """
        for ino in inos:
            if not (from_write and self._writing[ino]):
                await self.settled(ino)

    def unpublished(self) -> tuple[dict[PurgeCause, int], dict[PurgeCause, int]]:
        """(pages, units) purged per cause whose pages the kernel may still cache."""
        return dict(self._unpublished_pages), dict(self._unpublished_units)

    # -- the flushing tasks ------------------------------------------------------
    async def run(self) -> None:
        """Host the invalidation tasks until cancelled (a task of the daemon's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for ino, flush in list(self._flushes.items()):
                    self._start(ino, flush)
                self._start_deleting()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _start(self, ino: int, flush: _Flush) -> None:
        if not flush.running and self._nursery is not None:
            flush.running = True
            self._nursery.start_soon(self._flush, ino, flush)

    async def _flush(self, ino: int, flush: _Flush) -> None:
        try:
            while flush.clean < flush.purged:
                target = flush.purged
                started = time.monotonic()
                try:
                    await trio.to_thread.run_sync(self._invalidate, ino, limiter=self._limiter)
                except Exception:  # a bug: the kernel may keep stale pages, the daemon serves on
                    log.exception("invalidating inode %d failed", ino)
                self.invalidations += 1
                self.invalidation_max_s = max(self.invalidation_max_s, time.monotonic() - started)
                flush.clean = target
                self._publish(flush, target)
                done, flush.done = flush.done, trio.Event()
                done.set()
        finally:
            flush.running = False
            if flush.clean == flush.purged and self._flushes.get(ino) is flush:
                del self._flushes[ino]

    def _start_deleting(self) -> None:
        if self._deletions and not self._deleting and self._nursery is not None:
            self._deleting = True
            self._nursery.start_soon(self._delete)

    async def _delete(self) -> None:
        try:
            while self._deletions:
                count = min(len(self._deletions), DELETION_BATCH)
                name_path = self._name_path
                batch = [
                    (parent, name, ino, name_path(parent, name) if name_path else None)
                    for parent, name, ino in (self._deletions.popleft() for _ in range(count))
                ]
                # Abandoned if cancelled: the thread may wait on a request of this very
                # mount, which nobody serves once the daemon is shutting down.
                await trio.to_thread.run_sync(
                    self._delete_batch,
                    batch,
                    limiter=self._deletion_limiter,
                    abandon_on_cancel=True,
                )
                self.entries_deleted += len(batch)
                done, self._entries_done = self._entries_done, trio.Event()
                done.set()
        finally:
            self._deleting = False

    def _delete_batch(self, batch: list[tuple[int, bytes, int, bytes | None]]) -> None:
        assert self._delete_entry is not None
        for parent, name, ino, path in batch:
            log.debug("evicted: deleting entry %r of directory %d (inode %d)", name, parent, ino)
            try:
                self._delete_entry(parent, name, ino, path)
            except Exception:  # a bug: the kernel keeps a stale name, which answers ESTALE
                log.exception("deleting entry %r of directory %d failed", name, parent)

    def _publish(self, flush: _Flush, generation: int) -> None:
        keep = []
        for entry in flush.unpublished:
            gen, cause, pages = entry
            if gen <= generation:
                self._unpublished_pages[cause] -= pages
                self._unpublished_units[cause] -= 1
            else:
                keep.append(entry)
        flush.unpublished = keep
