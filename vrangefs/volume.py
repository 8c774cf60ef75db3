"""The filesystem model: inodes, directories, file data and volatility, without FUSE.

Every method is synchronous.  The daemon runs requests as trio tasks, and under
trio code between two awaits runs without interruption, so each method here
is atomic with respect to every other request: no method needs a lock, and
none may ever await.  Volatility and purging belong to :class:`Reclaim`, which
reports every purge to its listener (the daemon's invalidator) as it happens.

Errors are raised as :class:`FsError` carrying an errno.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vrangefs import budget
from vrangefs.budget import MetadataBudget, MetadataFullError
from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO, Directory, Inode, InodeTable, now_ns
from vrangefs.pagestore import (
    PAGE_SIZE,
    FileData,
    NoSpaceError,
    PageStore,
    PurgedPageError,
    pages_spanned,
)
from vrangefs.pins import InodePins, NotPinnedError, PinInfo, PinLimitError
from vrangefs.protocol import PurgeCause, nonvolatile_pages, pin_pages, volatile_pages
from vrangefs.reclaim import Reclaim, worth_evicting
from vrangefs.vrange import PurgeUnit, VrangeRoot, let_go

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
_SHORTEST_XATTR_NAME = len(b"user.x\0")
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a request: what new inodes are owned by, and who may read what.

    ``groups`` and ``privileged`` are known only where a request needs them (the
    daemon reads them from /proc for a pin by a ``system.vrange.*`` name, which
    the kernel does not check): the supplementary groups, and whether the process
    may read any file (CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH).
    """

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    privileged: bool = False


@dataclass(slots=True)
class AttrChange:
    """The fields of a SETATTR request; None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class FsStats:
    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int


class Volume:
    """One mounted filesystem: the composition of inode table and page store."""

    def __init__(
        self,
        store: PageStore,
        *,
        root_mode: int = 0o1777,
        root_uid: int | None = None,
        root_gid: int | None = None,
        purged_reads_zeros: bool = False,
        max_inodes: int | None = None,
        high_watermark: float = 1.0,
        low_watermark: float = 0.95,
        pin_limit: int | None = None,
        cache_dir: bool = False,
        metadata_cap: int | None = None,
    ) -> None:
        """*pin_limit*: the bytes one user may keep pinned (default: half the cap).

        *cache_dir*: the whole mount is a cache directory (inherited by every directory).
        *metadata_cap*: the bytes of metadata the daemon may hold (default: the larger of
        64 MiB and a tenth of the cap; see :mod:`vrangefs.budget`).
        """
        self.store = store
        self.inodes = InodeTable()
        # Names of evicted files the kernel has not unlinked yet (see ghost_unlink).
        self.ghosts: dict[tuple[int, bytes], int] = {}
        self.lingering = 0  # evicted inodes still in the table (the kernel knows them)
        # Units of freed inodes, in index chunks, for reaping() to let go of a few at a
        # time (see VrangeRoot.drop).
        self._dropped_units: deque[list[PurgeUnit]] = deque()
        # Processes that exited holding pins, for reaping() to release them in slices.
        self._exited: deque[int] = deque()
        # Told when there is work for reaping() (the daemon then runs the job).
        self.on_reap: Callable[[], None] | None = None
        self.purged_reads_zeros = purged_reads_zeros
        self.max_inodes = max_inodes if max_inodes is not None else max(store.capacity_pages, 1024)
        uid = os.getuid() if root_uid is None else root_uid
        gid = os.getgid() if root_gid is None else root_gid
        root = self.inodes.new(stat.S_IFDIR | (root_mode & 0o7777), uid, gid)
        assert root.ino == ROOT_INO
        root.dir = Directory()
        root.nlink = 2
        root.lookups = 1  # the kernel holds the root for the life of the mount
        root.cache_dir = cache_dir
        if pin_limit is None:
            pin_limit = store.cap_bytes // 2
        self.pin_limit = pin_limit // PAGE_SIZE * PAGE_SIZE
        if metadata_cap is None:
            metadata_cap = default_metadata_cap(store.cap_bytes)
        self.budget = MetadataBudget(metadata_cap)
        self.budget.force(_inode_bytes(root))
        self.reclaim = Reclaim(
            store,
            self._file_of,
            self._evict_file,
            high_watermark=high_watermark,
            low_watermark=low_watermark,
            pin_limit_pages=pin_limit // PAGE_SIZE,
        )
        self.budget.count(self.reclaim, "units", budget.UNIT_BYTES)
        self.budget.count(self.reclaim.pins, "records", budget.PIN_BYTES)
        self.budget.count(store, "chunks", budget.CHUNK_BYTES)
        self.reclaim.order.on_garbage = self._wake_reaper

    def _wake_reaper(self) -> None:
        if self.on_reap is not None:
            self.on_reap()

    # -- reaping -------------------------------------------------------------------
    def reaping(self) -> Iterator[None]:
        """A job that hands freed memory back and releases the pins of exited
        processes, slice by slice.

        First it hands freed memory back to the kernel (see
        :meth:`PageStore.return_some`), a few thousand pages per step, and lets go of
        the page tables of freed files (:meth:`PageStore.free_pending`), a few dozen
        chunks per step; then of the units of freed inodes and of their entries in the
        purge order, a few chunks of each per step.
        An exited process's remaining pins hold their pages meanwhile (a new process
        with its pid waits, see :meth:`releasing`).
        """
        store = self.store
        while store.return_some() or store.free_pending():
            yield
        dropped, order = self._dropped_units, self.reclaim.order
        while dropped or order.graveyard:
            for _ in range(min(UNIT_CHUNKS_PER_STEP, len(dropped))):
                let_go(dropped.popleft())
            order.bury(ORDER_CHUNKS_PER_STEP)
            yield
        while self._exited:
            tgid = self._exited[0]
            released = 0
            for count in self.reclaim.releasing_owner(tgid):
                released += count
                yield
            self._exited.popleft()
            log.debug("process %d exited: %d pins released", tgid, released)

    # -- lookups ------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        """The live inode *ino*; ESTALE for one that is gone.

        An evicted file is gone even while the kernel still knows it: ESTALE makes
        the kernel walk the path again (LOOKUP_REVAL), which finds the name gone.
        """
        inode = self.inodes.get(ino)
        if inode is None or inode.evicted:
            raise FsError(errno.ESTALE, f"no inode {ino}")
        return inode

    def _dir(self, ino: int) -> tuple[Inode, Directory]:
        inode = self.inode(ino)
        if inode.dir is None:
            raise FsError(errno.ENOTDIR)
        return inode, inode.dir

    def _child(self, parent: int, name: bytes) -> Inode:
        _, d = self._dir(parent)
        ino = d.entries.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.inode(ino)

    def lookup(self, parent: int, name: bytes) -> Inode:
        """Find *name* in *parent* and count one more kernel reference to it."""
        inode = self.find(parent, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def find(self, parent: int, name: bytes) -> Inode | None:
        """:meth:`lookup`, but None (and nothing counted) for a name that is not there.

        The kernel looks up every new name before creating it, so misses are as common
        as creates: answered without raising (an exception costs more than the lookup).
        """
        if len(name) > NAME_MAX:  # the kernel lets up to 1024 bytes through to FUSE
            raise FsError(errno.ENAMETOOLONG)
        if name == b".":
            inode = self.inode(parent)
        else:
            ino = self._dir(parent)[1].entries.get(name)
            if ino is None:
                return None
            inode = self.inode(ino)
        inode.lookups += 1
        return inode

    def count_lookup(self, inode: Inode) -> None:
        """The kernel took a reference through readdirplus."""
        inode.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            log.warning("forget of unknown inode %d", ino)
            return
        if count > inode.lookups:
            log.error("forget(%d, %d) exceeds lookup count %d", ino, count, inode.lookups)
            count = inode.lookups
        inode.lookups -= count
        self._release_if_dead(inode)

    def _release_if_dead(self, inode: Inode) -> None:
        """Free an inode nothing refers to any more: no name, no open file, no kernel lookup.

        Data is not freed at the last unlink or close while the kernel still
        knows the inode (pyfuse3's gotcha): an open() that looked the name up
        before an unlink reaches us afterwards and must find the data, as on
        tmpfs.  The kernel forgets an unlinked inode promptly.
        """
        if inode.alive or inode.ino == ROOT_INO:
            return
        if inode.data is not None:
            self._forget_volatility(inode)
            inode.data.free()  # a big table is left to the store (PageStore.defer)
        self.budget.force(-_inode_bytes(inode))
        if inode.evicted:
            self.lingering -= 1
        self.inodes.remove(inode.ino)

    def _forget_volatility(self, inode: Inode) -> None:
        """The file is going: its units and pins go now, whatever their number."""
        assert inode.data is not None
        dropped = self.reclaim.forget(inode.ino, inode.vroot, inode.data)
        inode.vroot = None
        if dropped:
            self._dropped_units.extend(dropped)
            self._wake_reaper()

    # -- creating -----------------------------------------------------------
    def _new_child(
        self, parent: int, name: bytes, mode: int, caller: Caller, rdev: int = 0, extra: int = 0
    ) -> Inode:
        """A new inode named *name* in *parent*; *extra*: its metadata beyond inode and name."""
        pinode, d = self._dir(parent)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name in d.entries:
            raise FsError(errno.EEXIST)
        if pinode.nlink == 0:
            raise FsError(errno.ENOENT, "parent directory was removed")
        # Evicted files the kernel still knows hold no data and do not count; closed
        # cache-directory files make room by going, least recently used first.
        while len(self.inodes) - self.lingering >= self.max_inodes:
            if not self.reclaim.evict_file(PurgeCause.CAP):
                raise FsError(errno.ENOSPC, "inode limit reached")
        cost = budget.INODE_BYTES + extra
        self._charge(cost + budget.name_bytes(name), f"creating {name!r}", count=False)
        gid = caller.gid
        if pinode.mode & stat.S_ISGID:  # BSD group semantics under a setgid directory
            gid = pinode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = self.inodes.new(mode, caller.uid, gid, rdev)
        self.budget.force(cost)
        inode.nlink = 1
        inode.lookups = 1
        self._add_name(d, parent, name, inode)
        pinode.touch(mtime=True, ctime=True)
        return inode

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Inode:
        fmt = stat.S_IFMT(mode)
        if fmt == 0:
            mode |= stat.S_IFREG
        elif fmt not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise FsError(errno.EINVAL, f"mknod of unsupported type {oct(fmt)}")
        extra = budget.FILE_BYTES if stat.S_ISREG(mode) else 0
        inode = self._new_child(parent, name, mode, caller, rdev, extra)
        if stat.S_ISREG(mode):
            inode.data = FileData(self.store)
            if self.inode(parent).cache_dir:  # else its one name is in no cache directory
                self._cache_check(inode)
        return inode

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Inode:
        inode = self._new_child(
            parent, name, stat.S_IFDIR | (mode & 0o7777), caller, extra=budget.DIRECTORY_BYTES
        )
        inode.dir = Directory()
        inode.nlink = 2
        pinode = self.inode(parent)
        pinode.nlink += 1
        inode.cache_dir = pinode.cache_dir  # inherited
        return inode

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Inode:
        if len(target) >= 4096:
            raise FsError(errno.ENAMETOOLONG)
        inode = self._new_child(
            parent, name, stat.S_IFLNK | 0o777, caller, extra=budget.SYMLINK_BYTES + len(target)
        )
        inode.target = target
        return inode

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if inode.target is None:
            raise FsError(errno.EINVAL)
        return inode.target

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        inode = self.inode(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        pinode, d = self._dir(new_parent)
        if len(new_name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if new_name in d.entries:
            raise FsError(errno.EEXIST)
        self._charge(budget.name_bytes(new_name), f"linking {new_name!r}", count=False, spare=ino)
        self._add_name(d, new_parent, new_name, inode)
        inode.nlink += 1
        inode.lookups += 1
        inode.touch(ctime=True)
        pinode.touch(mtime=True, ctime=True)
        self._cache_check(inode)
        return inode

    # -- removing -----------------------------------------------------------
    def unlink(self, parent: int, name: bytes) -> None:
        pinode, d = self._dir(parent)
        inode = self._child(parent, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        self._remove_name(d, parent, name, inode)
        inode.nlink -= 1
        inode.touch(ctime=True)
        pinode.touch(mtime=True, ctime=True)
        self._cache_check(inode)
        self._release_if_dead(inode)

    def rmdir(self, parent: int, name: bytes) -> None:
        pinode, d = self._dir(parent)
        inode = self._child(parent, name)
        if inode.dir is None:
            raise FsError(errno.ENOTDIR)
        if len(inode.dir):
            raise FsError(errno.ENOTEMPTY)
        self._remove_name(d, parent, name, inode)
        inode.nlink = 0
        inode.touch(ctime=True)
        pinode.nlink -= 1
        pinode.touch(mtime=True, ctime=True)
        self._release_if_dead(inode)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        op, od = self._dir(old_parent)
        np, nd = self._dir(new_parent)
        src = self._child(old_parent, old_name)
        if len(new_name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        dst_ino = nd.entries.get(new_name)
        dst = self.inode(dst_ino) if dst_ino is not None else None
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL, f"unknown rename flags {flags:#x}")
        if flags & RENAME_NOREPLACE and dst is not None:
            raise FsError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            od.add(old_name, dst.ino)
            nd.add(new_name, src.ino)
            src.drop_link(old_parent, old_name)
            dst.drop_link(new_parent, new_name)
            src.add_link(new_parent, new_name)
            dst.add_link(old_parent, old_name)
            if op is not np and src.is_dir != dst.is_dir:
                delta = 1 if src.is_dir else -1
                op.nlink -= delta
                np.nlink += delta
            for inode in (src, dst, op, np):
                inode.touch(ctime=True)
            op.touch(mtime=True)
            np.touch(mtime=True)
            self._cache_check(src)
            self._cache_check(dst)
            return
        if dst is src:
            return  # POSIX: two links to one file: do nothing
        if dst is not None:
            if src.is_dir:
                if dst.dir is None:
                    raise FsError(errno.ENOTDIR)
                if len(dst.dir):
                    raise FsError(errno.ENOTEMPTY)
            elif dst.is_dir:
                raise FsError(errno.EISDIR)
        # A longer name may take the count past the cap: a rename never fails for it.
        self._remove_name(od, old_parent, old_name, src)
        if dst is not None:
            self._remove_name(nd, new_parent, new_name, dst)
            if dst.is_dir:
                dst.nlink = 0
                np.nlink -= 1
            else:
                dst.nlink -= 1
            dst.touch(ctime=True)
        self._add_name(nd, new_parent, new_name, src)
        if src.is_dir and op is not np:
            op.nlink -= 1
            np.nlink += 1
        src.touch(ctime=True)
        op.touch(mtime=True, ctime=True)
        np.touch(mtime=True, ctime=True)
        self._cache_check(src)
        if dst is not None:
            self._cache_check(dst)
            self._release_if_dead(dst)

    # -- attributes -----------------------------------------------------------
    def setattr(self, ino: int, change: AttrChange) -> Inode:
        inode, job = self.setattr_job(ino, change)
        for _ in job:
            pass
        return inode

    def setattr_job(self, ino: int, change: AttrChange) -> tuple[Inode, Iterator[None]]:
        """:meth:`setattr`, with a truncate's freeing returned as a job (see
        :meth:`truncating`); everything else is done when this returns."""
        inode = self.inode(ino)
        t = now_ns()
        job: Iterator[None] = iter(())
        if change.size is not None:
            if inode.data is None:
                raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL)
            if change.size < 0:
                raise FsError(errno.EINVAL)
            job = self.truncating(inode, change.size)
            inode.mtime_ns = t
        if change.mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (change.mode & 0o7777)
        if change.uid is not None:
            inode.uid = change.uid
        if change.gid is not None:
            inode.gid = change.gid
        if change.atime_ns is not None:
            inode.atime_ns = change.atime_ns
        if change.mtime_ns is not None:
            inode.mtime_ns = change.mtime_ns
        inode.ctime_ns = t
        return inode, job

    def truncate(self, inode: Inode, size: int) -> None:
        for _ in self.truncating(inode, size):
            pass

    def truncating(self, inode: Inode, size: int) -> Iterator[None]:
        """Truncate as a job: the units past the new end go UNITS_PER_SLICE per step,
        then the data (:meth:`FileData.truncating`: the size changes then, the chunks
        past it go a few per step). A file freed or evicted meanwhile ends the job.
        """
        data = inode.data
        assert data is not None
        keep = pages_spanned(size)
        if inode.vroot is not None and size < data.size and inode.vroot.last_page() > keep:
            yield from self._unmarking(inode, data, keep, inode.vroot.last_page())
        if inode.data is not data:
            return
        if inode.vroot is not None:  # count the cut pages while they are still resident
            self.reclaim.truncate(inode.vroot, data, keep)
        yield from data.truncating(size)
        if inode.data is data:
            self.reclaim.cache_changed(inode.ino, data)

    # -- data -----------------------------------------------------------------
    def open(self, ino: int, flags: int = 0) -> Inode:
        """Count one more open file; O_TRUNC truncates here (libfuse asks for atomic_o_trunc)."""
        inode, job = self.open_job(ino, flags)
        for _ in job:
            pass
        return inode

    def open_job(self, ino: int, flags: int = 0) -> tuple[Inode, Iterator[None]]:
        """:meth:`open`, with an O_TRUNC's truncate returned as a job (see
        :meth:`truncating`); the file counts as open from the start, so it is not
        evicted meanwhile.

        The kernel holds no lock against writes during an OPEN (unlike a SETATTR):
        the caller must hold back WRITEs and truncates of the inode until the job
        is done, or a write between steps could land in a chunk about to be freed.
        """
        inode = self.inode(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        job: Iterator[None] = iter(())
        # The kernel has already checked write permission for O_TRUNC, whatever the access mode.
        if flags & os.O_TRUNC and inode.data is not None:
            if inode.data.size:
                job = self.truncating(inode, 0)
            inode.touch(mtime=True, ctime=True)
        inode.opens += 1
        self.reclaim.cache_opened(ino)
        return inode, job

    def create(self, parent: int, name: bytes, mode: int, caller: Caller) -> Inode:
        inode = self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, caller)
        inode.opens += 1
        self.reclaim.cache_opened(inode.ino)
        return inode

    def release(self, ino: int) -> None:
        inode = self.inode(ino)
        inode.opens -= 1
        if inode.data is not None:
            self.reclaim.cache_closed(ino, inode.data)
        self._release_if_dead(inode)

    def read(self, ino: int, off: int, size: int) -> memoryview | bytes | bytearray:
        inode, data = self._regular(ino)
        try:
            buf = data.read(off, size, self.purged_reads_zeros)
        except PurgedPageError as e:
            raise FsError(errno.EIO, f"inode {ino}: page {e.page} was purged") from None
        inode.touch_atime_relatime()
        return buf

    def write(self, ino: int, off: int, buf: bytes) -> int:
        inode, data = self._regular(ino)
        chunks = data.new_chunks(off, len(buf))
        if chunks:
            self._charge(
                chunks * budget.CHUNK_BYTES, f"inode {ino}: page tables", count=False, spare=ino
            )
        try:
            written = self.reclaim.write(inode.vroot, data, off, buf)
        except NoSpaceError as e:
            raise FsError(errno.ENOSPC, f"inode {ino}: {e}") from None
        inode.touch(mtime=True, ctime=True)
        return written

    def touches_purged(self, ino: int, off: int, length: int) -> bool:
        """Whether bytes [off, off + length) of the file include a purged page."""
        _, data = self._regular(ino)
        if length <= 0:
            return False
        return data.any_purged(off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE))

    # -- volatile ranges --------------------------------------------------------------
    def _regular(self, ino: int) -> tuple[Inode, FileData]:
        inode = self.inode(ino)
        if inode.data is None:
            raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL, "not a regular file")
        return inode, inode.data

    def _file_of(self, ino: int) -> tuple[FileData, VrangeRoot | None]:
        """Reclaim's view of a file: its data and its volatile ranges, if any."""
        inode = self.inode(ino)
        assert inode.data is not None, inode
        return inode.data, inode.vroot

    def _vroot(self, inode: Inode) -> VrangeRoot:
        if inode.vroot is None:
            inode.vroot = self.reclaim.new_root(inode.ino)
        return inode.vroot

    def mark_volatile(self, ino: int, offset: int, length: int) -> None:
        """Make the pages wholly inside the byte range volatile (one new purge unit)."""
        job = self.marking_volatile(ino, offset, length)
        if job is not None:
            for _ in job:
                pass

    def marking_volatile(self, ino: int, offset: int, length: int) -> Iterator[None] | None:
        """mark_volatile, done at once (None) unless the mark merges more units than a
        slice changes: then the rest is returned as a job of slices, each bounded however
        many units it merges.

        Most marks merge a unit or two: they pay for no generator and no job.
        """
        inode, data = self._regular(ino)
        if not self.budget.fits(budget.UNIT_BYTES):  # room to make, or ENOSPC
            self._charge(budget.UNIT_BYTES, f"inode {ino}: a volatile unit", count=False, spare=ino)
        size = data.size
        if inode.kept and _whole_file(offset, length, size):
            inode.kept = False
            self.reclaim.cache_keep(ino, data, kept=False)
        pages = volatile_pages(offset, length, size)
        if pages is None:
            return None
        start, end = pages
        root = inode.vroot
        if root is None:
            root = inode.vroot = self.reclaim.new_root(ino)
        elif root.slice_end(start, end, UNITS_PER_SLICE) < end:
            return self._merging(inode, data, start, end)
        self.reclaim.mark_volatile(root, data, start, end)
        return None

    def _merging(self, inode: Inode, data: FileData, start: int, end: int) -> Iterator[None]:
        """A mark over many units, as a job: it first unmarks them slice by slice (their
        pages are merely not volatile for a while, which nothing can harm), then makes the
        one new unit."""
        root = inode.vroot
        assert root is not None
        if (first := root.unit_at(start)) is not None:
            start = first.start
        if (last := root.unit_at(end - 1)) is not None:
            end = last.end
        yield from self._unmarking(inode, data, start, end)
        if self.inodes.get(inode.ino) is not inode or inode.data is not data:
            return  # the file went meanwhile
        self.reclaim.mark_volatile(self._vroot(inode), data, start, end)

    def mark_nonvolatile(self, ino: int, offset: int, length: int) -> list[tuple[int, int]]:
        """Make every page touching the byte range non-volatile.

        Returns the purged ranges (bytes, clipped to the file) inside those pages:
        from here on nothing purges them, so the answer cannot go stale.
        """
        for _ in self.marking_nonvolatile(ino, offset, length):
            pass
        _, data = self._regular(ino)
        pages = nonvolatile_pages(offset, length, data.size)
        return [] if pages is None else list(self._purged_ranges(data, *pages))

    def marking_nonvolatile(self, ino: int, offset: int, length: int) -> Iterator[None]:
        """mark_nonvolatile as a job of slices of at most UNITS_PER_SLICE units each.

        Once it has run to its end every page of the range is non-volatile; between
        slices other requests may run (a purge may still take a unit not reached yet,
        which the caller then finds purged, as if the purge had come first).
        """
        inode, data = self._regular(ino)
        if _whole_file(offset, length, data.size) and not inode.kept:
            inode.kept = True  # a cache directory keeps it until it is marked volatile
            self.reclaim.cache_keep(ino, data, kept=True)
        pages = nonvolatile_pages(offset, length, data.size)
        if pages is not None:
            yield from self._unmarking(inode, data, *pages)

    def _unmarking(self, inode: Inode, data: FileData, start: int, end: int) -> Iterator[None]:
        while start < end:
            root = inode.vroot
            if root is None or inode.data is not data:  # no units left, or the file is gone
                return
            stop = root.slice_end(start, end, UNITS_PER_SLICE)
            self.reclaim.mark_nonvolatile(root, data, start, stop)
            start = stop
            if start < end:
                yield

    def purged_ranges(self, ino: int) -> Iterator[tuple[int, int]]:
        """Byte ranges of the file's purged pages, clipped to its size, ascending, lazily."""
        _, data = self._regular(ino)
        return self._purged_ranges(data, 0, pages_spanned(data.size))

    @staticmethod
    def _purged_ranges(data: FileData, first: int, end: int) -> Iterator[tuple[int, int]]:
        for lo, count in data.purged_runs(first, end):
            if (r := _byte_range(data, lo, lo + count)) is not None:
                yield r

    # -- pins ---------------------------------------------------------------------------
    def pin(self, ino: int, offset: int, length: int, tgid: int, uid: int) -> None:
        """Process *tgid* takes one more pin on every page touching the byte range.

        LENGTH 0 reaches the end of the file now (see protocol.pin_pages); a
        range of no page pins nothing.  EDQUOT if it would take *uid* past the
        per-user limit.
        """
        _, data = self._regular(ino)
        pages = pin_pages(offset, length, data.size)
        if pages is None:
            return
        held = self.reclaim.pins.of(ino)
        if held is None or (*pages, tgid) not in held.pins:
            self._charge(budget.PIN_BYTES, f"inode {ino}: a pin", count=False, spare=ino)
        try:
            self.reclaim.pin(ino, *pages, tgid, uid)
        except PinLimitError as e:
            raise FsError(errno.EDQUOT, f"inode {ino}: {e}") from None

    def unpin(self, ino: int, offset: int, length: int, tgid: int) -> None:
        """Drop one pin of process *tgid* on the pages the byte range names, as pin() does.

        ENOENT, changing nothing, if the process holds no pin on exactly those pages.
        """
        _, data = self._regular(ino)
        pages = pin_pages(offset, length, data.size)
        if pages is None:
            return
        try:
            self.reclaim.unpin(ino, *pages, tgid)
        except NotPinnedError as e:
            raise FsError(errno.ENOENT, str(e)) from None

    def pins(self, ino: int) -> list[PinInfo]:
        """The file's live pins, sorted by (start, end, tgid)."""
        return [PinInfo(*row) for row in self.pin_rows(ino)]

    def pin_rows(self, ino: int) -> list[tuple[int, int, int, int]]:
        """:meth:`pins` as (start, end, tgid, count) tuples, for listing many."""
        pins = self._pins_of(ino)
        return pins.rows() if pins is not None else []

    def pin_records(self, ino: int) -> int:
        """How many distinct (range, process) pins the file has: O(1)."""
        pins = self._pins_of(ino)
        return len(pins) if pins is not None else 0

    def _pins_of(self, ino: int) -> InodePins | None:
        self._regular(ino)
        return self.reclaim.pins.of(ino)

    def release_owner(self, tgid: int) -> int:
        """Process *tgid* exited: drop all its pins; returns how many (counted) went."""
        return self.reclaim.release_owner(tgid)

    def process_exited(self, tgid: int) -> None:
        """Process *tgid* exited holding pins: release them in slices (see reaping)."""
        self._exited.append(tgid)
        if self.on_reap is not None:
            self.on_reap()

    def releasing(self, tgid: int) -> bool:
        """Whether pins of an exited process *tgid* are still being released: a new
        process with the same pid must not pin or unpin until they are."""
        return tgid in self._exited

    @staticmethod
    def may_read(inode: Inode, caller: Caller) -> bool:
        """Whether the caller may read the inode, by its mode bits (vrangefs has no ACLs)."""
        if caller.privileged:
            return True
        if caller.uid == inode.uid:
            return bool(inode.mode & stat.S_IRUSR)
        if caller.gid == inode.gid or inode.gid in caller.groups:
            return bool(inode.mode & stat.S_IRGRP)
        return bool(inode.mode & stat.S_IROTH)

    @staticmethod
    def readable_by_ids(inode: Inode, uid: int, gid: int) -> bool:
        """Whether *uid* and *gid* may read the inode whatever their supplementary groups.

        False means "not known without the groups and capabilities" (see may_read):
        a caller in the file's group through a supplementary group falls in the group
        class, so the other bits grant read only if the group bits do too.
        """
        mode = inode.mode
        if uid == inode.uid:
            return bool(mode & stat.S_IRUSR)
        if gid == inode.gid:
            return bool(mode & stat.S_IRGRP)
        return bool(mode & stat.S_IRGRP and mode & stat.S_IROTH)

    def volatile_ranges(self, ino: int) -> Iterator[tuple[int, int]]:
        """The file's purge units as byte ranges, clipped to its size, ascending, lazily."""
        inode, data = self._regular(ino)
        if inode.vroot is None:
            return iter(())
        return (r for u in inode.vroot.units() if (r := _byte_range(data, u.start, u.end)))

    # -- cache directories ---------------------------------------------------------
    def is_cache_dir(self, ino: int) -> bool:
        inode, _ = self._dir(ino)
        return inode.cache_dir

    def set_cache_dir(self, ino: int, on: bool) -> None:
        """Make a directory a cache directory, or an ordinary one again.

        Its regular files follow at once (evictable when closed, or kept for good);
        directories created in it later inherit the setting, existing ones keep
        theirs (the CLI walks a tree, so that the kernel checks each directory).
        """
        for _ in self.setting_cache_dir(ino, on):
            pass

    def setting_cache_dir(self, ino: int, on: bool) -> Iterator[None]:
        """set_cache_dir as a job: the flag changes at once, the files already there
        follow FILES_PER_SLICE at a time (100,000 of them took 0.6 s in one step).

        Each step decides a file by the flags as they are then, so renames, links
        and other changes of the flag between steps leave every file right.
        """
        inode, d = self._dir(ino)
        if inode.cache_dir == on:
            return iter(())
        inode.cache_dir = on
        inode.touch(ctime=True)
        return self._cache_checking(list(d.entries.values()))

    def _cache_checking(self, inos: list[int]) -> Iterator[None]:
        for first in range(0, len(inos), FILES_PER_SLICE):
            for child_ino in inos[first : first + FILES_PER_SLICE]:
                child = self.inodes.get(child_ino)
                if child is not None and child.data is not None:
                    self._cache_check(child)
            yield

    def _cache_check(self, inode: Inode) -> None:
        """Make the file evictable if every name of it is in a cache directory, else not."""
        data = inode.data
        if data is None or inode.evicted:
            return
        member = inode.nlink > 0 and all(
            (parent := self.inodes.get(p)) is not None and parent.cache_dir
            for p, _ in inode.links()
        )
        if member:
            self.reclaim.cache_join(inode.ino, data, inode.opens, inode.kept)
        else:
            self.reclaim.cache_leave(inode.ino, data)

    def _evict_file(self, ino: int) -> list[tuple[int, bytes]]:
        """Reclaim evicts a cache-directory file: remove every name of it and free it.

        Returns the names it had.  The inode lingers, evicted, while the kernel
        still holds it (see :meth:`inode`).
        """
        inode = self.inodes.get(ino)
        assert inode is not None and inode.data is not None and not inode.opens, inode
        names = inode.links()
        for parent, name in names:
            pinode, d = self._dir(parent)
            self._remove_name(d, parent, name, inode)
            pinode.touch(mtime=True, ctime=True)
            self.ghosts[parent, name] = ino
        inode.ghosts = len(names)
        inode.nlink = 0
        inode.evicted = True
        self._forget_volatility(inode)
        inode.data.free()
        inode.data = None
        self.budget.force(-budget.FILE_BYTES)
        self.lingering += 1
        self._release_if_dead(inode)
        return names

    # The kernel learns of an eviction best through an unlink of each name that it makes
    # itself (the daemon's own worker thread unlinks the path): only then do inotify
    # watchers of the directory get IN_DELETE.  Until it does, the evicted names are
    # *ghosts*: gone from their directories for everyone, known only to that unlinker.
    def ghost_lookup(self, parent: int, name: bytes) -> Inode | None:
        """The evicted inode a ghost name stood for (counted as a kernel lookup), if any."""
        ino = self.ghosts.get((parent, name))
        if ino is None:
            return None
        inode = self.inodes.get(ino)
        assert inode is not None and inode.evicted, (parent, name, ino)
        inode.lookups += 1
        return inode

    def ghost_unlink(self, parent: int, name: bytes) -> bool:
        """The kernel unlinked a ghost name (False if *name* is not one)."""
        return self.bury(parent, name)

    def bury(self, parent: int, name: bytes) -> bool:
        """Forget a ghost name: the kernel was told otherwise, or the name is reused."""
        ino = self.ghosts.pop((parent, name), None)
        if ino is None:
            return False
        inode = self.inodes.get(ino)
        assert inode is not None and inode.ghosts > 0, (parent, name, ino)
        inode.ghosts -= 1
        self._release_if_dead(inode)
        return True

    # -- paths ------------------------------------------------------------------------
    def path_of(self, ino: int) -> bytes | None:
        """A path of the inode from the mount root (its first name); None if it has none."""
        parts: list[bytes] = []
        inode = self.inodes.get(ino)
        while inode is not None and inode.ino != ROOT_INO:
            if inode.name is None or len(parts) > 4096:
                return None
            parts.append(inode.name)
            inode = self.inodes.get(inode.parent)
        if inode is None:
            return None
        return b"/" + b"/".join(reversed(parts))

    # -- directories ------------------------------------------------------------
    def opendir(self, ino: int) -> Inode:
        inode, _ = self._dir(ino)
        return inode

    def readdir(self, ino: int, after: int) -> Iterator[tuple[int, bytes, Inode]]:
        """Entries after cookie *after*: (cookie, name, inode), lazily (see Directory.after)."""
        inode, d = self._dir(ino)
        inode.touch_atime_relatime()
        return ((cookie, name, self.inode(d.entries[name])) for cookie, name in d.after(after))

    # -- extended attributes ------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """:meth:`getxattr`, but None for an attribute that is not there.

        The kernel asks for security.capability before every write(2): that miss is
        answered without raising, and the namespace is checked only on a miss.
        """
        xattrs = self.inode(ino).xattrs
        value = None if xattrs is None else xattrs.get(name)
        if value is None and not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP, f"xattr namespace of {name!r} not supported")
        return value

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        inode = self.inode(ino)
        if not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP, f"xattr namespace of {name!r} not supported")
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        old = inode.xattrs.get(name) if inode.xattrs is not None else None
        cost = budget.xattr_bytes(name, value)
        if old is not None:
            cost -= budget.xattr_bytes(name, old)
        if cost > 0:
            self._charge(cost, f"inode {ino}: xattr {name!r}", spare=ino)
        else:
            self.budget.force(cost)
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[name] = bytes(value)
        inode.touch(ctime=True)

    def listxattr(self, ino: int) -> list[bytes]:
        """The file's xattr names; E2BIG at once when there are more than any listing of
        XATTR_LIST_MAX bytes can hold (the budget allows hundreds of thousands, and
        listing them all only for the kernel to refuse them is one long step)."""
        inode = self.inode(ino)
        if not inode.xattrs:
            return []
        if len(inode.xattrs) > XATTR_LIST_MAX // _SHORTEST_XATTR_NAME:
            raise FsError(
                errno.E2BIG,
                f"inode {ino}: {len(inode.xattrs)} xattr names do not fit a listing of "
                f"{XATTR_LIST_MAX} bytes",
            )
        return list(inode.xattrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        inode = self.inode(ino)
        if not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP, f"xattr namespace of {name!r} not supported")
        if not inode.xattrs or name not in inode.xattrs:
            raise FsError(errno.ENODATA)
        self.budget.force(-budget.xattr_bytes(name, inode.xattrs.pop(name)))
        inode.touch(ctime=True)

    # -- directory entries --------------------------------------------------------------
    # Every name is an entry of its directory, a link of its inode and metadata counted in
    # the budget: these two keep the three together.
    def _add_name(self, d: Directory, parent: int, name: bytes, inode: Inode) -> None:
        """Enter *name* for *inode* in directory *parent* (a ghost of that name is buried).

        Checking the budget for it is the caller's business: a rename must not fail.
        """
        self.bury(parent, name)
        d.add(name, inode.ino)
        inode.add_link(parent, name)
        self.budget.force(budget.name_bytes(name))

    def _remove_name(self, d: Directory, parent: int, name: bytes, inode: Inode) -> None:
        d.remove(name)
        inode.drop_link(parent, name)
        self.budget.force(-budget.name_bytes(name))

    # -- the metadata budget ------------------------------------------------------------
    def _charge(
        self, nbytes: int, what: str, *, count: bool = True, spare: int | None = None
    ) -> None:
        """ENOSPC, changing nothing, if *nbytes* more metadata would pass the cap even after
        evicting closed cache-directory files (never *spare*, the inode being changed);
        else count them (*count*) or leave them to be counted where they are kept."""
        while True:
            try:
                if count:
                    self.budget.charge(nbytes, what)
                else:
                    self.budget.check(nbytes, what)
                return
            except MetadataFullError as e:
                # The tables of freed files go first (a few dozen chunks at a time, as
                # many as it takes), then closed cache-directory files, least recently
                # used first.
                if self.store.free_pending():
                    continue
                if not self.reclaim.evict_file(PurgeCause.CAP, spare):
                    raise FsError(errno.ENOSPC, str(e)) from None

    # -- whole filesystem ------------------------------------------------------------
    def statfs(self) -> FsStats:
        store = self.store
        return FsStats(
            block_size=PAGE_SIZE,
            blocks=store.capacity_pages,
            blocks_free=store.free_pages,
            files=self.max_inodes,
            files_free=max(self.max_inodes - len(self.inodes) + self.lingering, 0),
            name_max=NAME_MAX,
        )

    def check_invariants(self) -> None:
        """Assert the whole model is consistent (tests call this after each step)."""
        self.store.check_invariants()
        resident = 0
        for inode in self.inodes:
            if inode.data is not None:
                inode.data.check_invariants()
                resident += inode.data.resident_pages
            if inode.vroot is not None:
                assert inode.data is not None
            if inode.dir is not None:
                subdirs = 0
                for child_ino in inode.dir.entries.values():
                    child = self.inodes.get(child_ino)
                    assert child is not None, f"dangling entry to {child_ino}"
                    subdirs += child.is_dir
                if inode.nlink:
                    assert inode.nlink == 2 + subdirs, (inode.ino, inode.nlink, subdirs)
            assert inode.alive or inode.ino == ROOT_INO
        assert resident == self.store.used_pages, (resident, self.store.used_pages)
        self.reclaim.check_invariants(
            (inode.data, inode.vroot)
            for inode in self.inodes
            if inode.data is not None and inode.vroot is not None
        )
        for ino, _ in self.reclaim.pins:
            pinned = self.inodes.get(ino)
            assert pinned is not None and pinned.data is not None, f"pins of inode {ino}"
        self._check_cache_files()
        charged = chunks = 0
        for inode in self.inodes:
            charged += _inode_bytes(inode)
            if inode.dir is not None:
                charged += sum(budget.name_bytes(name) for name in inode.dir.entries)
            if inode.data is not None:
                chunks += len(inode.data._chunks)
        assert charged == self.budget.charged, (charged, self.budget.charged)
        assert chunks + self.store.pending_chunks == self.store.chunks, (chunks, self.store.chunks)

    def _check_cache_files(self) -> None:
        reclaim = self.reclaim
        pages = 0
        for inode in self.inodes:
            if inode.evicted:
                assert inode.data is None and inode.nlink == 0 and inode.name is None, inode.ino
                ghosts = sum(1 for ino in self.ghosts.values() if ino == inode.ino)
                assert ghosts == inode.ghosts, (inode.ino, ghosts, inode.ghosts)
            if inode.data is None:
                continue
            links = inode.links()
            assert len(links) == inode.nlink, (inode.ino, links, inode.nlink)
            for parent, name in links:
                d = self.inode(parent).dir
                assert d is not None and d.entries.get(name) == inode.ino, (inode.ino, name)
            member = bool(links) and all(self.inode(p).cache_dir for p, _ in links)
            cache_file = reclaim.cache_files.get(inode.ino)
            assert member == (cache_file is not None), (inode.ino, member)
            if cache_file is None:
                assert inode.data.tally is None
                continue
            pages += inode.data.resident_pages
            assert inode.data.tally is reclaim.cache_pages
            assert cache_file.opens == inode.opens and cache_file.kept == inode.kept, cache_file
            held = inode.opens or inode.kept or reclaim.pins.of(inode.ino) is not None
            queued = not held and worth_evicting(inode.data)
            assert (cache_file in reclaim.order) == queued, (cache_file, queued)
        assert pages == reclaim.cache_pages.pages, (pages, reclaim.cache_pages.pages)


UNITS_PER_SLICE = 50
"""Units one slice of a big mark or unmark changes (about 1 ms of work)."""
FILES_PER_SLICE = 100  # files of a directory that becomes a cache directory, or stops being one
UNIT_CHUNKS_PER_STEP = 4  # index chunks of freed units let go per step (each up to 1,024)
ORDER_CHUNKS_PER_STEP = 4  # chunks of stale purge-order entries let go per step (up to 1,024)


def default_metadata_cap(cap_bytes: int) -> int:
    """The larger of 64 MiB and a tenth of the memory cap."""
    return max(64 << 20, cap_bytes // 10)


def _inode_bytes(inode: Inode) -> int:
    """What an inode is charged, its names apart (they go with their directory entries)."""
    total = budget.INODE_BYTES
    if stat.S_ISREG(inode.mode) and not inode.evicted:  # an evicted file's data is freed
        total += budget.FILE_BYTES
    if inode.dir is not None:
        total += budget.DIRECTORY_BYTES
    if inode.target is not None:
        total += budget.SYMLINK_BYTES + len(inode.target)
    if inode.xattrs:
        total += sum(budget.xattr_bytes(n, v) for n, v in inode.xattrs.items())
    return total


def _whole_file(offset: int, length: int, size: int) -> bool:
    """Whether a mark of (offset, length) names the whole file (0,0 does, whatever the size)."""
    return offset == 0 and (length == 0 or length >= size)


def _byte_range(data: FileData, first: int, end: int) -> tuple[int, int] | None:
    """Pages [first, end) as (offset, length) clipped to the file size; None if past it."""
    start = first * PAGE_SIZE
    stop = min(end * PAGE_SIZE, data.size)
    return (start, stop - start) if start < stop else None
