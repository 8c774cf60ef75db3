"""The inode table: inodes, directories, and the counts that decide when an inode dies.

An inode lives while any of three things holds it: a directory entry (nlink),
the kernel (lookup count, dropped by FORGET) or an open file handle.  Its data
is freed when the last of them goes, never in unlink (pyfuse3's gotchas).
"""

from __future__ import annotations

import bisect
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vrangefs.pagestore import FileData

if TYPE_CHECKING:
    from vrangefs.vrange import VrangeRoot

ROOT_INO = 1
DAY_NS = 86_400 * 1_000_000_000


class Directory:
    """Entries of one directory, with stable cookies for readdir.

    Cookies grow with every insertion and are never reused, so a listing that
    resumes at a cookie neither skips nor repeats entries while others are
    added or removed.  ``_cookies`` is append-only with lazy deletion and is
    compacted when more than half of it is stale.
    """

    __slots__ = ("_cookie_of", "_cookies", "_names", "_next_cookie", "entries")

    def __init__(self) -> None:
        self.entries: dict[bytes, int] = {}
        self._names: dict[int, bytes] = {}  # cookie -> name, live entries only
        self._cookie_of: dict[bytes, int] = {}
        self._cookies: list[int] = []  # ascending, may hold stale cookies
        self._next_cookie = 1

    def add(self, name: bytes, ino: int) -> None:
        """Add or replace the entry *name*; a replaced entry gets a new cookie."""
        if name in self.entries:
            self.remove(name)
        self.entries[name] = ino
        cookie = self._next_cookie
        self._next_cookie += 1
        self._names[cookie] = name
        self._cookie_of[name] = cookie
        self._cookies.append(cookie)

    def remove(self, name: bytes) -> int:
        ino = self.entries.pop(name)
        del self._names[self._cookie_of.pop(name)]
        if len(self._cookies) > 64 and len(self._cookies) > 2 * len(self._names):
            self._cookies = [c for c in self._cookies if c in self._names]
        return ino

    def after(self, cookie: int) -> Iterator[tuple[int, bytes]]:
        """Entries whose cookie is greater than *cookie*, in cookie order.

        Lazy: a READDIR request takes only the few entries that fit its
        buffer, so a listing costs O(n log n), not O(n^2).  The directory must
        not change while the iterator is in use (requests are atomic).
        """
        cookies = self._cookies
        names = self._names
        for i in range(bisect.bisect_right(cookies, cookie), len(cookies)):
            c = cookies[i]
            name = names.get(c)
            if name is not None:
                yield c, name

    def __len__(self) -> int:
        return len(self.entries)


def now_ns() -> int:
    return time.time_ns()


class Inode:
    """One file, directory, symlink or special file."""

    __slots__ = (
        "atime_ns",
        "cache_dir",
        "ctime_ns",
        "data",
        "dir",
        "evicted",
        "ghosts",
        "gid",
        "ino",
        "kept",
        "lookups",
        "mode",
        "more_links",
        "mtime_ns",
        "name",
        "nlink",
        "opens",
        "parent",
        "rdev",
        "target",
        "uid",
        "vroot",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, rdev: int = 0) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.nlink = 0
        t = now_ns()
        self.atime_ns = self.mtime_ns = self.ctime_ns = t
        self.data: FileData | None = None
        self.dir: Directory | None = None
        self.target: bytes | None = None
        self.xattrs: dict[bytes, bytes] | None = None
        self.vroot: VrangeRoot | None = None
        self.lookups = 0
        self.opens = 0
        # Its names: the first in (parent, name), any further hard links in more_links.
        # Eviction removes them all, and events name files by path.
        self.parent = 0
        self.name: bytes | None = None
        self.more_links: list[tuple[int, bytes]] | None = None
        self.cache_dir = False  # a directory whose files are evicted whole (cache directory)
        self.kept = False  # marked non-volatile as a whole: a cache directory keeps it
        self.evicted = False  # evicted from a cache directory: gone, though the kernel may know it
        self.ghosts = 0  # names it had when evicted that the kernel has yet to unlink

    def links(self) -> list[tuple[int, bytes]]:
        """Every (directory inode, name) of this inode."""
        if self.name is None:
            return []
        first = (self.parent, self.name)
        return [first, *self.more_links] if self.more_links else [first]

    def add_link(self, parent: int, name: bytes) -> None:
        if self.name is None:
            self.parent, self.name = parent, name
        elif self.more_links is None:
            self.more_links = [(parent, name)]
        else:
            self.more_links.append((parent, name))

    def drop_link(self, parent: int, name: bytes) -> None:
        if self.parent == parent and self.name == name:
            if self.more_links:
                self.parent, self.name = self.more_links.pop()
            else:
                self.parent, self.name = 0, None
        elif self.more_links is not None:
            self.more_links.remove((parent, name))
        if not self.more_links:
            self.more_links = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def size(self) -> int:
        if self.data is not None:
            return self.data.size
        if self.target is not None:
            return len(self.target)
        if self.dir is not None:
            return (len(self.dir) + 2) * 20  # as tmpfs reports it
        return 0

    @property
    def blocks(self) -> int:
        """st_blocks in 512-byte units: resident pages only."""
        return self.data.resident_pages * 8 if self.data is not None else 0

    def touch(self, atime: bool = False, mtime: bool = False, ctime: bool = False) -> None:
        t = now_ns()
        if atime:
            self.atime_ns = t
        if mtime:
            self.mtime_ns = t
        if ctime:
            self.ctime_ns = t

    def touch_atime_relatime(self) -> None:
        """Update atime the way relatime does: only when it lags mtime/ctime or is a day old."""
        t = now_ns()
        a = self.atime_ns
        if a <= self.mtime_ns or a <= self.ctime_ns or t - a >= DAY_NS:
            self.atime_ns = t

    @property
    def alive(self) -> bool:
        return self.nlink > 0 or self.lookups > 0 or self.opens > 0 or self.ghosts > 0


class InodeTable:
    """Inode numbers to inodes; numbers are never reused while mounted."""

    def __init__(self) -> None:
        self._inodes: dict[int, Inode] = {}
        self._next_ino = ROOT_INO

    def new(self, mode: int, uid: int, gid: int, rdev: int = 0) -> Inode:
        inode = Inode(self._next_ino, mode, uid, gid, rdev)
        self._next_ino += 1
        self._inodes[inode.ino] = inode
        return inode

    def get(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def remove(self, ino: int) -> None:
        del self._inodes[ino]

    def __len__(self) -> int:
        return len(self._inodes)

    def __iter__(self) -> Iterator[Inode]:
        return iter(self._inodes.values())
