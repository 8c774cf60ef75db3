"""The ceiling: the cheapest pyfuse3 filesystem that still behaves like one.

Usage: ``python bench/ceiling.py MOUNTPOINT [--direct-io] [--max-tasks N] [--read-ahead-kb N]``

One flat directory (the root) of regular files.  Writes are discarded but
extend the file size; reads return zeros up to that size.  Every handler is
synchronous in effect (no ``await``) and does a dict look-up at most, so what
the benchmark measures here is the cost of the kernel, libfuse and pyfuse3
themselves: no pyfuse3 filesystem can be faster on the same machine.

What it does the same way as vrangefs, so that the comparison is fair:

- page-cache mode by default (``keep_cache=True``, no ``direct_io``);
  ``--direct-io`` opens every file with ``direct_io`` instead;
- ``getxattr`` is implemented and answers ENODATA, so the kernel pays the
  ``security.capability`` round trip on every write(2), as it will on any
  filesystem that supports xattrs; ``setxattr`` accepts and forgets any value
  (the floor of a ``user.vrange.volatile`` mark);
- pyfuse3's default entry and attribute timeouts (300 s); a lookup that misses is
  answered as a negative entry (inode 0) with vrangefs's timeout, as vrangefs does;
- the readahead window is raised after INIT to vrangefs's (``--read-ahead-kb``, when
  run as root), so that cold reads arrive as READs of the same size.

Deliberate shortcuts, valid for the benchmark's one-client use: no lookup
counts (an inode is dropped on the first ``forget`` once it is unlinked), no
directories besides the root, no permission checks (``default_permissions``
lets the kernel do them), ``flush`` and ``fsync`` answer ENOSYS so the kernel
stops sending them.

The process mounts, serves until SIGTERM or SIGINT (or an external unmount),
then unmounts and exits 0.  Readiness is the mount itself: wait for
``os.path.ismount(MOUNTPOINT)``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
import trio

from vrangefs.mount import READ_AHEAD_KB, raise_readahead
from vrangefs.operations import NEGATIVE_TIMEOUT

log = logging.getLogger("ceiling")

_ZERO_CACHE_MAX = 32  # distinct read sizes kept as ready-made zero buffers


class Node:
    """A regular file: its attributes (st_size tracks writes) and whether it is linked."""

    __slots__ = ("attr", "linked")

    def __init__(self, attr: pyfuse3.EntryAttributes) -> None:
        self.attr = attr
        self.linked = True


def _attributes(ino: int, mode: int, nlink: int, uid: int, gid: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    now = time.time_ns()
    attr.st_ino = pyfuse3.InodeT(ino)
    attr.st_mode = pyfuse3.ModeT(mode)
    attr.st_nlink = nlink
    attr.st_uid = uid
    attr.st_gid = gid
    attr.st_blksize = 4096
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
    return attr


class CeilingOperations(pyfuse3.Operations):
    """pyfuse3 handlers; each one is a dict operation or less."""

    def __init__(self, direct_io: bool, mountpoint: str = "", read_ahead_kb: int = 0) -> None:
        super().__init__()
        self.direct_io = direct_io
        self.mountpoint = mountpoint
        self.read_ahead_kb = read_ahead_kb
        self.negative = pyfuse3.EntryAttributes()  # inode 0: the kernel caches the miss
        self.negative.entry_timeout = NEGATIVE_TIMEOUT
        self.negative.attr_timeout = 0
        self.root = _attributes(
            pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid()
        )
        self.names: dict[bytes, Node] = {}
        self.inodes: dict[int, Node] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.zeros: dict[int, bytes] = {}

    # -- names ------------------------------------------------------------
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.names.get(name)
        if node is not None:
            return node.attr
        if name in (b".", b".."):
            return self.root
        return self.negative

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        ino = self.next_ino
        self.next_ino += 1
        node = Node(_attributes(ino, mode, 1, ctx.uid, ctx.gid))
        old = self.names.get(name)
        if old is not None:
            old.linked = False
        self.names[name] = node
        self.inodes[ino] = node
        return self._file_info(ino), node.attr

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self.names.pop(name, None) if parent_inode == pyfuse3.ROOT_INODE else None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node.linked = False
        node.attr.st_nlink = 0

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        inodes = self.inodes
        for ino, _count in inode_list:
            node = inodes.get(ino)
            if node is not None and not node.linked:
                del inodes[ino]

    # -- attributes -------------------------------------------------------
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self.root
        return self._node(inode).attr

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        target = self.root if inode == pyfuse3.ROOT_INODE else self._node(inode).attr
        if fields.update_size:
            target.st_size = attr.st_size
            target.st_blocks = (attr.st_size + 511) // 512
        if fields.update_mode:
            target.st_mode = pyfuse3.ModeT((target.st_mode & ~0o7777) | (attr.st_mode & 0o7777))
        if fields.update_uid:
            target.st_uid = attr.st_uid
        if fields.update_gid:
            target.st_gid = attr.st_gid
        if fields.update_atime:
            target.st_atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            target.st_mtime_ns = attr.st_mtime_ns
        target.st_ctime_ns = time.time_ns()
        return target

    def init(self) -> None:
        """INIT: raise the readahead window once the reply (which caps it) is sent."""
        if self.read_ahead_kb:
            trio.lowlevel.current_trio_token().run_sync_soon(self._raise_readahead)

    def _raise_readahead(self) -> None:
        try:
            log.warning("%s", raise_readahead(self.mountpoint, self.read_ahead_kb))
        except Exception:
            log.exception("raising the readahead window failed")

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """Accepts and forgets any value: the floor of a ``user.vrange.volatile`` mark."""
        return None

    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 30
        st.f_files = st.f_ffree = st.f_favail = 1 << 30
        st.f_namemax = 255
        return st

    # -- file data --------------------------------------------------------
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        self._node(inode)
        return self._file_info(inode)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        length = min(size, self.inodes[fh].attr.st_size - off)
        if length <= 0:
            return b""
        zeros = self.zeros.get(length)
        if zeros is None:
            zeros = bytes(length)
            if len(self.zeros) < _ZERO_CACHE_MAX:
                self.zeros[length] = zeros
        return zeros

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        attr = self.inodes[fh].attr
        end = off + len(buf)
        if end > attr.st_size:
            attr.st_size = end
            attr.st_blocks = (end + 511) // 512
        return len(buf)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # -- the root directory ----------------------------------------------
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        entries = list(self.names.items())
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if not pyfuse3.readdir_reply(token, name, node.attr, index + 1):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # -- helpers ----------------------------------------------------------
    def _node(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _file_info(self, inode: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(inode), direct_io=self.direct_io, keep_cache=True
        )


async def _serve(max_tasks: int) -> None:
    """Run the FUSE loop until SIGTERM/SIGINT or an external unmount."""
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %d: terminating", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument(
        "--direct-io", action="store_true", help="open files with direct_io (no page cache)"
    )
    parser.add_argument(
        "--max-tasks",
        type=int,
        default=1,
        help="pyfuse3 worker tasks (default 1: no handler awaits, so more cannot overlap work)",
    )
    parser.add_argument(
        "--read-ahead-kb",
        type=int,
        default=READ_AHEAD_KB,
        help=f"readahead window set after INIT, as root (default {READ_AHEAD_KB}, as vrangefs;"
        " 0: leave the kernel's)",
    )
    parser.add_argument("--debug", action="store_true", help="log pyfuse3 debug messages")
    opts = parser.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if opts.debug else logging.WARNING,
        format="ceiling[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    operations = CeilingOperations(
        direct_io=opts.direct_io,
        mountpoint=os.path.abspath(opts.mountpoint),
        read_ahead_kb=opts.read_ahead_kb,
    )
    fuse_options = set(pyfuse3.default_options)
    fuse_options |= {"fsname=ceiling", "subtype=ceiling"}
    pyfuse3.init(operations, opts.mountpoint, fuse_options)
    try:
        trio.run(_serve, opts.max_tasks)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
