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
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from vrangefs import control
from vrangefs.errors import FsError
from vrangefs.inodes import Inode
from vrangefs.protocol import NONVOLATILE_B, PURGED_B, STATS_B, format_stats
from vrangefs.volume import AttrChange, Caller, Volume
from vrangefs.vrange import PurgeLock

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Every change to an inode reaches the kernel through this daemon, except
# purges, after which the inode is invalidated explicitly; so attributes and
# entries may be cached for long.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0


# Fault injection, for tests only: with VRANGEFS_FAULT_INJECTION=1 in the
# daemon's environment, setting ``user.vrange.fault`` on the mount root to a
# handler name (e.g. ``read``) makes that handler's next call raise
# RuntimeError, to show that a bug costs one request (EIO), not the daemon.
FAULT_INJECTION = os.environ.get("VRANGEFS_FAULT_INJECTION") == "1"
FAULT_XATTR = b"user.vrange.fault"
_pending_faults: set[str] = set()


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
            if _pending_faults and name in _pending_faults:
                _pending_faults.discard(name)
                raise InjectedFault(f"fault injected into {name}")
            return await fn(*args, **kwargs)
        except FsError as e:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> %s (%s)", name, errno.errorcode.get(e.errno, e.errno), e)
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("unexpected error in %s%r", name, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid)


class Operations(pyfuse3.Operations):
    """FUSE request handlers over one :class:`Volume`."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # partial writes into purged pages must not read first
    enable_acl = False

    def __init__(self, volume: Volume, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.volume = volume
        self._on_init = on_init
        self._nursery: trio.Nursery | None = None
        self._reinvalidate: set[int] = set()
        self._writing: Counter[int] = Counter()  # inodes with a WRITE in our hands
        self.invalidations = 0
        self.invalidation_max_s = 0.0

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
        attr.st_blksize = 4096
        attr.st_blocks = inode.blocks
        attr.st_atime_ns = inode.atime_ns
        attr.st_mtime_ns = inode.mtime_ns
        attr.st_ctime_ns = inode.ctime_ns
        return attr

    def flush_stale(self) -> list[int]:
        """Start invalidating the kernel's cache of every inode a purge just touched.

        Called right after any volume call that may purge, with no await in
        between, so each purged inode's ``vrange_root`` lock is taken in the
        same atomic step as the purge.  Each invalidation runs as its own task
        (one may block on pages the kernel holds locked while another proceeds)
        and releases the lock once the kernel has dropped the inode's cached
        pages.  Returns the inodes purged.
        """
        if not self.volume.stale_inodes:  # the common case, on every write
            return []
        purged = list(self.volume.take_stale())
        for ino in purged:
            root = self.volume.vroot_of(ino)
            if root is not None and root.lock.locked():
                self._reinvalidate.add(ino)  # under way: that task repeats it
                continue
            lock = root.lock if root is not None else None
            if lock is not None:
                lock.acquire_nowait()
            if self._nursery is None:  # not serving (the adapter driven directly)
                if lock is not None:
                    lock.release()
                continue
            self._nursery.start_soon(self._invalidate, ino, lock)
        return purged

    async def finish_purges(self) -> None:
        """After a purge that need not fear locked pages (explicit, memory pressure):
        wait until the kernel holds no purged page any more."""
        for ino in self.flush_stale():
            await self.settled(ino)

    async def settled(self, ino: int) -> None:
        """Wait until no purge of *ino* is still visible in the kernel's cache."""
        root = self.volume.vroot_of(ino)
        if root is not None:
            await root.lock.wait_released()

    async def _invalidate(self, ino: int, lock: PurgeLock | None) -> None:
        started = time.monotonic()
        try:
            while True:
                self._reinvalidate.discard(ino)
                await trio.to_thread.run_sync(_invalidate_inode, ino)
                if ino not in self._reinvalidate:
                    break
        finally:
            if lock is not None:
                lock.release()
        self.invalidations += 1
        self.invalidation_max_s = max(self.invalidation_max_s, time.monotonic() - started)

    async def run_invalidator(self) -> None:
        """Host the invalidation tasks until cancelled (a task of the daemon's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- lookups and attributes ---------------------------------------------------
    @_handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.volume.lookup(parent_inode, name))

    @_handler
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            self.volume.forget(ino, count)

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
        return self.attributes(self.volume.setattr(inode, change))

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
        self.volume.open(inode, flags)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

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
        info = pyfuse3.FileInfo(fh=inode.ino, keep_cache=True)
        return info, self.attributes(inode)

    @_handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 takes any contiguous buffer; a memoryview into the arena
        # saves a copy and is consumed before any other task runs.
        return cast(bytes, self.volume.read(fh, off, size))

    @_handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        """Store data; if that purged other files, return once their cache is dropped.

        The kernel keeps the pages of an in-flight WRITE locked until we reply,
        and dropping an inode's cache waits for those locks.  So a write never
        waits for an inode that has a WRITE in our hands (its own included, or
        two writers purging each other's files would deadlock); those are
        invalidated in the background, the others before the reply.
        """
        self._writing[fh] += 1
        try:
            written = self.volume.write(fh, off, buf)
            purged = self.flush_stale()
            for ino in purged:
                if not self._writing[ino]:
                    await self.settled(ino)
            return written
        finally:
            self._writing[fh] -= 1
            if not self._writing[fh]:
                del self._writing[fh]

    @_handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.volume.release(fh)

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
                await self.settled(inode)
            value = control.getxattr(self.volume, inode, name)
            if name == STATS_B:  # what only the adapter knows: the kernel-cache side
                value += format_stats(
                    {
                        "invalidations": self.invalidations,
                        "invalidation_max_us": int(self.invalidation_max_s * 1e6),
                    }
                )
            return value
        return self.volume.getxattr(inode, name)

    @_handler
    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if not control.is_control(name):
            self.volume.setxattr(inode, name, value)
            return
        if FAULT_INJECTION and name == FAULT_XATTR and inode == pyfuse3.ROOT_INODE:
            _pending_faults.add(value.decode(errors="replace").strip())
            return
        if name == NONVOLATILE_B:
            await self.settled(inode)
        control.setxattr(self.volume, inode, name, value)
        await self.finish_purges()  # an explicit purge returns once no stale page is left

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


def _invalidate_inode(ino: int) -> None:
    """Drop the kernel's cached data of *ino* (runs in a worker thread: it may block)."""
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
            log.warning("invalidate_inode(%d) failed: %s", ino, os.strerror(e.errno or 0))
