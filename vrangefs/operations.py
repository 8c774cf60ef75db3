"""The pyfuse3 adapter: translates FUSE requests into :class:`Volume` calls.

It does nothing else.  Domain errors (:class:`FsError`) become
``FUSEError(errno)`` here and nowhere else; any other exception is a bug, so it
is logged with its traceback and answered with EIO, and the daemon keeps
serving (pyfuse3 would otherwise stop the whole main loop).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from vrangefs import control
from vrangefs.errors import FsError
from vrangefs.events import EventHub
from vrangefs.inodes import Inode
from vrangefs.invalidation import Invalidator
from vrangefs.owners import ProcessWatcher
from vrangefs.protocol import (
    NONVOLATILE_B,
    PAGE_SIZE,
    PURGED_B,
    STATS_B,
    VOLATILE_B,
    format_stats,
)
from vrangefs.volume import AttrChange, Caller, Volume

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Every change to an inode reaches the kernel through this daemon, except
# purges, after which the inode is invalidated explicitly; so attributes and
# entries may be cached for long.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0

# A lookup that misses is answered with inode 0 and this timeout, not ENOENT: the kernel
# then keeps a negative dentry, and looking the name up again (a search path, `test -e`,
# open(O_CREAT) without O_EXCL after a miss) does not reach us.  Safe because no name
# appears without the kernel seeing it: names are only added by requests that go through
# this mount's dentry cache (create, mknod, mkdir, symlink, link, rename), which turn
# the negative dentry positive; the daemon adds none by itself (purges discard data,
# never names).  And FUSE never trusts a negative dentry for O_CREAT|O_EXCL, mkdir or a
# rename target: it looks the name up again.  It cannot shorten the LOOKUP of a fresh
# name before a create either (the kernel sends one for every name it has no dentry for).
NEGATIVE_TIMEOUT = ENTRY_TIMEOUT

# A big request (an unmark or purge-all over many units) runs in slices of this much time,
# and other requests are served between them: none holds the event loop for long.
SLICE_SECONDS = 0.001

# How long a WRITE that evicted cache-directory files waits for the kernel to drop their
# names (the unlinks through the mount take well under a millisecond each).
EVICTED_NAMES_WAIT = 1.0


# Fault injection, for tests only: with VRANGEFS_FAULT_INJECTION=1 in the
# daemon's environment, setting ``user.vrange.fault`` on the mount root to a
# handler name (e.g. ``read``) makes that handler's next call raise
# RuntimeError, to show that a bug costs one request (EIO), not the daemon.
FAULT_INJECTION = os.environ.get("VRANGEFS_FAULT_INJECTION") == "1"
FAULT_XATTR = b"user.vrange.fault"
_pending_faults: set[str] = set()

_NOTHING: frozenset[int] = frozenset()  # no inode purged (yet)


class InjectedFault(RuntimeError):
    """Raised by a handler on request of a test."""


def _handler(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map FsError to FUSEError; log and answer EIO for anything unexpected."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", name, args[1:])
        try:
            if _pending_faults:
                _inject_fault(name)
            return await fn(*args, **kwargs)
        except Exception as e:
            raise _fuse_error(name, args[1:], e) from None

    return wrapper


def _inject_fault(name: str) -> None:
    """Fail handler *name* once if a test asked for it (VRANGEFS_FAULT_INJECTION)."""
    if name in _pending_faults:
        _pending_faults.discard(name)
        raise InjectedFault(f"fault injected into {name}")


def _fuse_error(name: str, args: tuple[object, ...], e: Exception) -> pyfuse3.FUSEError:
    """What handler *name*, called with *args*, answers for exception *e* (see _handler);
    call it in the ``except`` block, so that a bug is logged with its traceback."""
    if isinstance(e, FsError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s (%s)", name, errno.errorcode.get(e.errno, e.errno), e)
        return pyfuse3.FUSEError(e.errno)
    if isinstance(e, pyfuse3.FUSEError):
        return e
    log.exception("unexpected error in %s%r", name, args)
    return pyfuse3.FUSEError(errno.EIO)


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid)


# A file handle is the inode number and one bit: opened for reading and writing.
# Only such a handle can carry a shared writable mapping, whose dirty pages the
# kernel writes back through it.
_RW = 1


def _file_handle(ino: int, flags: int) -> pyfuse3.FileHandleT:
    rw = _RW if flags & os.O_ACCMODE == os.O_RDWR else 0
    return pyfuse3.FileHandleT(ino << 1 | rw)


def _ino(fh: int) -> int:
    return fh >> 1


class Operations(pyfuse3.Operations):
    """FUSE request handlers over one :class:`Volume`."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # partial writes into purged pages must not read first
    enable_acl = False

    def __init__(
        self,
        volume: Volume,
        on_init: Callable[[], None] | None = None,
        invalidate: Callable[[int], None] | None = None,
        proc: str = "/proc",
        delete_entry: Callable[[int, bytes, int], None] | None = None,
        mountpoint: str | None = None,
    ) -> None:
        """*mountpoint*: where the kernel can reach this mount, for unlinking evicted names
        through it; *invalidate* and *delete_entry* replace the kernel notifications (tests)."""
        super().__init__()
        self.volume = volume
        self._on_init = on_init
        self._notify_delete = delete_entry or _delete_entry
        self._mountpoint = os.fsencode(mountpoint) if mountpoint is not None else None
        # Native ids of our threads that are unlinking evicted names through the mount:
        # their LOOKUP and UNLINK requests are about ghosts (see Volume.ghost_unlink).
        self._unlinkers: set[int] = set()
        self.invalidator = Invalidator(
            invalidate or _invalidate_inode,
            self._remove_evicted,
            self._name_path if self._mountpoint is not None else None,
        )
        volume.reclaim.listener = self.invalidator
        self.events = EventHub(volume.path_of)  # `vrangefs events`; served by mount.py
        volume.reclaim.observer = self.events
        self._incoming: select.poll | None = None  # see watch_requests
        self._reap_wanted = trio.Event()
        # Inodes an open(O_TRUNC) is truncating, in slices: WRITEs and truncates of them
        # wait (the kernel holds no lock against them during an OPEN).
        self._truncations: dict[int, trio.Event] = {}
        self._reaped = trio.Event()  # set (and replaced) each time the reaper is done
        volume.on_reap = self._wake_reaper
        volume.store.on_returning = self._wake_reaper  # freed memory goes back in slices
        self.processes = ProcessWatcher(self._process_exited, proc)
        volume.reclaim.pins.listener = self.processes

    def _wake_reaper(self) -> None:
        self._reap_wanted.set()

    async def reap(self) -> None:
        """Return freed memory, let go of freed files' page tables and units and release
        exited processes' pins, in slices, whenever the volume or the store has some (a
        task of the daemon's nursery): the exit of a process with 100,000 pins or an rm of
        a huge sparse file holds nobody up."""
        while True:
            await self._reap_wanted.wait()
            self._reap_wanted = trio.Event()
            await self._run(self.volume.reaping(), set())
            self._reaped.set()
            self._reaped = trio.Event()

    def _process_exited(self, tgid: int) -> None:
        """A process that held pins has exited: its pins go (in slices, by the reaper),
        its units become purgeable again."""
        self.volume.process_exited(tgid)

    async def _released(self, tgid: int) -> None:
        """Return once no pin of an exited process with pid *tgid* is left: a new
        process that got its pid then starts with none."""
        while self.volume.releasing(tgid):
            await self._reaped.wait()

    # -- evicted names -----------------------------------------------------------------
    def _name_path(self, parent: int, name: bytes) -> bytes | None:
        """The mount-relative path of a name's directory (in the event loop)."""
        return self.volume.path_of(parent)

    def _remove_evicted(self, parent: int, name: bytes, ino: int, path: bytes | None) -> None:
        """Make the kernel drop the name of an evicted file (in the invalidator's thread).

        Best through an unlink of the name, which the kernel makes into IN_DELETE for
        inotify watchers of the directory; the UNLINK it sends us is recognised as
        ours by the thread id.  If that fails (no right to unlink there, the
        directory moved, a negative dentry) the ghost is dropped and the kernel is
        notified.  *path* is the directory's path in the mount.
        """
        if path is not None and self._mountpoint is not None:
            tid = threading.get_native_id()
            self._unlinkers.add(tid)
            try:
                directory = self._open_directory(path, parent)
                try:
                    os.unlink(name, dir_fd=directory)
                finally:
                    os.close(directory)
                return
            except OSError as e:
                log.debug("unlinking evicted %r in %r through the mount: %s", name, path, e)
            finally:
                self._unlinkers.discard(tid)
        try:
            trio.from_thread.run_sync(self.volume.bury, parent, name)
        except trio.RunFinishedError:
            return  # the daemon is stopping
        self._notify_delete(parent, name, ino)

    def _open_directory(self, path: bytes, ino: int) -> int:
        """An O_PATH descriptor of directory *ino* of this mount, found by *path*.

        The daemon may run as root and users can rename and symlink at will in the
        mount, so the walk follows no symlink (O_NOFOLLOW at every step) and the
        result must be this mount's directory *ino*, or OSError: an unlink through
        it can reach nothing else.
        """
        assert self._mountpoint is not None
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._mountpoint, flags)
        try:
            device = os.fstat(fd).st_dev
            for part in path.split(b"/"):
                if part:
                    child = os.open(part, flags, dir_fd=fd)
                    os.close(fd)
                    fd = child
            st = os.fstat(fd)
            if st.st_dev != device or st.st_ino != ino:
                raise OSError(errno.ESTALE, f"{path!r} is no longer directory {ino}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def init(self) -> None:
        """The kernel's INIT request arrived: from now on requests are served."""
        if self._on_init is not None:
            self._on_init()

    # -- helpers ----------------------------------------------------------------
    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = inode.mode
        attr.st_nlink = inode.nlink
        attr.st_uid = inode.uid
        attr.st_gid = inode.gid
        attr.st_rdev = inode.rdev
        attr.st_size = inode.size
        attr.st_blksize = PAGE_SIZE
        attr.st_blocks = inode.blocks
        attr.st_atime_ns = inode.atime_ns
        attr.st_mtime_ns = inode.mtime_ns
        attr.st_ctime_ns = inode.ctime_ns
        return attr

    # -- lookups and attributes ---------------------------------------------------
    @_handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._unlinkers and ctx.pid in self._unlinkers:
            ghost = self.volume.ghost_lookup(parent_inode, name)
            if ghost is not None:  # as it was, for the unlink that follows (not cached)
                attr = self.attributes(ghost)
                attr.st_nlink = ghost.ghosts
                attr.entry_timeout = attr.attr_timeout = 0
                return attr
        inode = self.volume.find(parent_inode, name)
        if inode is not None:
            return self.attributes(inode)
        if name in (b".", b".."):
            raise FsError(errno.ENOENT, f"no {name!r} in {parent_inode}")
        return _NEGATIVE_ENTRY

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        """FORGET has no reply: pyfuse3 awaits it in its main loop, where any exception,
        FUSEError included, would end the daemon. So nothing may escape from here."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("forget(%r)", inode_list)
        for ino, count in inode_list:
            try:
                self.volume.forget(ino, count)
            except Exception:
                log.exception("unexpected error in forget(%d, %d): the inode may leak", ino, count)

    @_handler
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.volume.inode(inode))

    @_handler
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        change = AttrChange(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        if fields.update_size:
            await self._untruncated(inode)
        node, job = self.volume.setattr_job(inode, change)
        await self._run(job, set())  # a truncate of a file of many chunks or units
        return self.attributes(node)

    @_handler
    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        return self.volume.readlink(inode)

    # -- namespace --------------------------------------------------------------------
    @_handler
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.volume.mknod(parent_inode, name, mode, rdev, _caller(ctx)))

    @_handler
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.volume.mkdir(parent_inode, name, mode, _caller(ctx)))

    @_handler
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.volume.symlink(parent_inode, name, target, _caller(ctx)))

    @_handler
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.volume.link(inode, new_parent_inode, new_name))

    @_handler
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        if self._unlinkers and ctx.pid in self._unlinkers:
            if not self.volume.ghost_unlink(parent_inode, name):
                raise FsError(errno.ENOENT, f"{name!r} is not an evicted name")
            return
        self.volume.unlink(parent_inode, name)

    @_handler
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self.volume.rmdir(parent_inode, name)

    @_handler
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.volume.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files ------------------------------------------------------------------------
    @_handler
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & os.O_TRUNC:
            await self._untruncated(inode)
        _, job = self.volume.open_job(inode, flags)
        await self._truncate_gated(inode, job)
        return pyfuse3.FileInfo(fh=_file_handle(inode, flags), keep_cache=True)

    async def _untruncated(self, ino: int) -> None:
        """Wait until no open(O_TRUNC) is truncating *ino*."""
        while (gate := self._truncations.get(ino)) is not None:
            await gate.wait()

    async def _truncate_gated(self, ino: int, job: control.Job) -> None:
        """Run an open(O_TRUNC)'s truncate in slices while WRITEs and truncates of the
        inode wait (a huge sparse file: 0.5 s in one step)."""
        first = next(job, _DONE)  # most opens truncate nothing, or little: no gate
        if first is _DONE:
            return
        gate = self._truncations[ino] = trio.Event()
        try:
            await self._run(job, set())
        finally:
            del self._truncations[ino]
            gate.set()

    @_handler
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self.volume.create(parent_inode, name, mode, _caller(ctx))
        info = pyfuse3.FileInfo(fh=_file_handle(inode.ino, flags), keep_cache=True)
        return info, self.attributes(inode)

    @_handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 takes any contiguous buffer; a memoryview into the arena
        # saves a copy and is consumed before any other task runs.
        return cast(bytes, self.volume.read(_ino(fh), off, size))

    @_handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        """Store data; if that purged or evicted other files, return once the kernel knows.

        Writeback of a page cached before it was purged must not bring its old
        bytes back.  Dropping the kernel's cache writes dirty mapped pages back
        first, one page per WRITE, through a read-write handle; pyfuse3 does not
        tell us a WRITE is writeback.  So while an inode is flushing, a WRITE of
        at most one page, page-aligned, through a read-write handle, into a
        purged page is refused with EIO: the kernel then drops the page and
        reports the loss to msync/fsync, and the unit stays purged whole.  A
        write(2) of that shape racing the flush gets EIO too (rare; retrying
        works once the flush is done).
        """
        ino = _ino(fh)
        if self._truncations:
            await self._untruncated(ino)
        invalidator = self.invalidator
        if (
            fh & _RW
            and not off % PAGE_SIZE
            and len(buf) <= PAGE_SIZE
            and invalidator.flushing(ino)
            and self.volume.touches_purged(ino, off, len(buf))
        ):
            raise FsError(errno.EIO, f"inode {ino}: writeback into page {off // PAGE_SIZE}, purged")
        with invalidator.writing(ino):
            purged: set[int] = set()
            evicted = invalidator.entries_queued
            try:
                with invalidator.recording() as purged:
                    return self.volume.write(ino, off, buf)
            finally:  # a write that purged and still failed (ENOSPC) waits all the same
                await invalidator.settle(purged, from_write=True)
                if invalidator.entries_queued > evicted:
                    # Files it evicted are gone for the kernel too when it returns (within
                    # reason: past the deadline, their names still answer ESTALE).
                    with trio.move_on_after(EVICTED_NAMES_WAIT):
                        await invalidator.deleted(invalidator.entries_queued)

    @_handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.volume.release(_ino(fh))

    @_handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None  # memory is the storage: nothing to sync

    # -- directories ----------------------------------------------------------------------
    @_handler
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        self.volume.opendir(inode)
        return inode

    @_handler
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for cookie, name, child in self.volume.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.attributes(child), cookie):
                break
            self.volume.count_lookup(child)

    @_handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_handler
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None

    # -- extended attributes ----------------------------------------------------------------
    @_handler
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if control.is_control(name):
            if name == PURGED_B:
                await self.invalidator.settled(inode)
            value = control.getxattr(self.volume, inode, name)
            if name == STATS_B:  # what only the adapter knows: the kernel-cache side
                value += format_stats(
                    {
                        "invalidations": self.invalidator.invalidations,
                        "invalidation_max_us": int(self.invalidator.invalidation_max_s * 1e6),
                    }
                )
            return value
        stored = self.volume.find_xattr(inode, name)
        if stored is None:  # not FsError: this is the cheap path security.capability takes
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return stored

    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """A handler as _handler makes them, but written out: a mark, the commonest request,
        then costs one coroutine, not two."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", "setxattr", (inode, name, value, ctx))
        try:
            if _pending_faults:
                _inject_fault("setxattr")
            if name != VOLATILE_B:  # a mark, the commonest request, needs none of these checks
                if not control.is_control(name):
                    self.volume.setxattr(inode, name, value)
                    return
                if FAULT_INJECTION and name == FAULT_XATTR and inode == pyfuse3.ROOT_INODE:
                    _pending_faults.add(value.decode(errors="replace").strip())
                    return
                if name in control.PIN_SETTERS:
                    await self._pin_request(inode, name, value, ctx)
                    return
                if name == NONVOLATILE_B:
                    await self.invalidator.settled(inode)
            invalidator = self.invalidator
            purged: set[int] | frozenset[int] = _NOTHING
            try:
                # Most jobs (a mark, an unmark of a few units) are done at once or end in
                # their first slice: run it in the same synchronous step, with no checkpoint,
                # coroutine or set more.
                outer = invalidator.record()
                try:
                    job = control.setxattr_job(self.volume, inode, name, value)
                    if job is not None and self._run_slice(job):
                        job = None
                finally:
                    purged = invalidator.recorded(outer)
                if job is not None:  # the rest in slices, other requests first
                    await trio.sleep(0)
                    await self._run(job, purged)
            finally:  # a purge returns once no stale page is left, failed or not
                if purged:
                    await invalidator.settle(purged)
        except Exception as e:
            raise _fuse_error("setxattr", (inode, name, value, ctx), e) from None

    def watch_requests(self, fuse_fd: int) -> None:
        """Let big jobs see requests waiting on the FUSE device (descriptor *fuse_fd*)."""
        self._incoming = select.poll()
        self._incoming.register(fuse_fd, select.POLLIN)

    def _others_waiting(self) -> bool:
        """Whether a request waits to be read from the kernel, or another task to run."""
        if self._incoming is not None and self._incoming.poll(0):
            return True
        return trio.lowlevel.current_statistics().tasks_runnable > 0

    async def _run(self, job: control.Job, purged: set[int]) -> None:
        """Run a big request's job in slices of at most SLICE_SECONDS, letting other
        requests in between; *purged* collects the inodes its steps purged.

        A slice ends early, after any step, once another request is waiting: a job
        alone goes at full speed, and a request waits for one step, not one slice.
        """
        done = False
        while not done:
            with self.invalidator.recording() as recorded:
                done = self._run_slice(job)
            purged |= recorded
            if not done:
                await trio.sleep(0)

    def _run_slice(self, job: control.Job) -> bool:
        """Run *job* for at most SLICE_SECONDS, less once another request waits (see
        :meth:`_run`); True once it is done."""
        deadline = time.monotonic() + SLICE_SECONDS
        for _ in job:
            if time.monotonic() >= deadline or self._others_waiting():
                break
        else:
            return True
        return False

    async def _pin_request(
        self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """Pin or unpin for the calling process (its thread group, not the thread).

        A pin returns once the kernel caches nothing of the file that was purged
        before it: pages read under the pin are then exactly what the file holds,
        and ``user.vrange.purged`` read next tells the truth (it waits too).
        """
        # Read permission by a system.vrange name: the caller's groups and capabilities
        # come from /proc, read only if its uid and gid alone do not grant it.
        credentials = name in control.READ_CHECKED and not self._may_read(ino, ctx)
        process = self.processes.identify(ctx.pid, credentials=credentials)
        await self._released(process.tgid)
        caller = Caller(ctx.uid, ctx.gid, process.groups, process.privileged)
        pinning = name in control.PINNING
        if pinning:  # watched before its pin is recorded: its exit cannot be missed
            self.processes.watch(process.tgid)
        try:
            control.setxattr(self.volume, ino, name, value, control.Pinner(process.tgid, caller))
        finally:
            if pinning and not self.volume.reclaim.pins.holds(process.tgid):
                self.processes.owner_gone(process.tgid)  # it pinned nothing after all
        if pinning:
            await self.invalidator.settled(ino)

    def _may_read(self, ino: int, ctx: pyfuse3.RequestContext) -> bool:
        """Whether the mode bits let the caller read the inode, whatever its other groups."""
        inode = self.volume.inodes.get(ino)
        return inode is not None and self.volume.readable_by_ids(inode, ctx.uid, ctx.gid)

    @_handler
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return cast(Sequence[pyfuse3.XAttrNameT], self.volume.listxattr(inode))

    @_handler
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        if control.is_control(name):
            raise FsError(errno.ENODATA, "user.vrange.* attributes are virtual")
        self.volume.removexattr(inode, name)

    # -- filesystem -------------------------------------------------------------------------
    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.volume.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.blocks
        out.f_bfree = s.blocks_free
        out.f_bavail = s.blocks_free
        out.f_files = s.files
        out.f_ffree = s.files_free
        out.f_favail = s.files_free
        out.f_namemax = s.name_max
        return out


def _negative_entry() -> pyfuse3.EntryAttributes:
    """A lookup's answer for a name that is not there (see NEGATIVE_TIMEOUT)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = pyfuse3.InodeT(0)
    attr.entry_timeout = NEGATIVE_TIMEOUT
    attr.attr_timeout = 0
    return attr


# One answer serves every miss: pyfuse3 copies it into the reply and nobody changes it.
_NEGATIVE_ENTRY = _negative_entry()
_DONE = object()  # next()'s default: a job that had no step


def _delete_entry(parent: int, name: bytes, ino: int) -> None:
    """Tell the kernel an evicted file's name is gone (worker thread: it may block).

    Passing the inode makes the kernel drop the name only if it still means that
    inode, and notify inotify watchers of the directory (IN_DELETE).
    """
    try:
        pyfuse3.invalidate_entry(parent, name, deleted=ino)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no such name (any more)
            log.warning(
                "invalidate_entry(%d, %r) failed: %s", parent, name, os.strerror(e.errno or 0)
            )
        else:
            log.debug("invalidate_entry(%d, %r): the kernel holds no such name", parent, name)


def _invalidate_inode(ino: int) -> None:
    """Drop the kernel's cached data of *ino* (runs in a worker thread: it may block)."""
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
            log.warning("invalidate_inode(%d) failed: %s", ino, os.strerror(e.errno or 0))
