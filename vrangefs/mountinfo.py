"""The mount table (/proc/self/mountinfo), parsed in one place.

Stdlib only, so that the client library, the command line, the tests and the
tools can all use it.  Nothing here touches a mounted filesystem: finding the
mount at a path reads the table and, at most, the directory that *holds* the
mount point.  That matters for ``vrangefs umount``: a request to a daemon that
does not answer (stopped, deadlocked, a zombie) would hang for good, and even
``stat`` on the mount point itself can send one.

A line of the table (see proc(5)): mount id, parent id, major:minor, root, mount point,
options, optional fields, ``-``, filesystem type, source, superblock options::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue

Paths in it escape space, tab, newline and backslash as octal (``\\040``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")
_MAX_SYMLINKS = 40  # as the kernel's path walk


def unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of a mountinfo field."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of the mount table, its paths unescaped."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str

    @property
    def device(self) -> str:
        """``major:minor``, as ``os.stat().st_dev`` gives it for files on the mount."""
        return f"{self.major}:{self.minor}"

    def is_device(self, st_dev: int) -> bool:
        return (self.major, self.minor) == (os.major(st_dev), os.minor(st_dev))

    @property
    def fuse_connection(self) -> int | None:
        """The FUSE connection number (``/sys/fs/fuse/connections/N``), for a FUSE mount.

        It is the minor device number of the mount's anonymous device.
        """
        if self.major != 0 or not (self.fstype == "fuse" or self.fstype.startswith("fuse.")):
            return None
        return self.minor


def parse_line(line: str) -> MountEntry:
    """One mountinfo line; raises ValueError for anything else."""
    fields = line.split()
    try:
        dash = fields.index("-", 6)
        major, minor = fields[2].split(":")
        return MountEntry(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=unescape(fields[3]),
            mountpoint=unescape(fields[4]),
            options=fields[5],
            fstype=fields[dash + 1],
            source=unescape(fields[dash + 2]),
            super_options=fields[dash + 3] if len(fields) > dash + 3 else "",
        )
    except (ValueError, IndexError):
        raise ValueError(f"not a mountinfo line: {line!r}") from None


def entries(path: str = MOUNTINFO) -> list[MountEntry]:
    """The mount table, read afresh, in its order (a later mount on the same point is on top)."""
    with open(path) as f:
        return [parse_line(line) for line in f if line.strip()]


def find(path: str | os.PathLike[str]) -> MountEntry | None:
    """The mount whose mount point is *path* (the top one if several), or None.

    Dead FUSE mounts count.  Symbolic links are followed, but the mount itself is never
    touched (no ``stat`` or ``realpath`` of the mount point: either can send a request
    to its daemon): the directory holding the mount point is resolved and the last
    component looked up in the table first.
    """
    table = entries()
    by_point = {entry.mountpoint: entry for entry in table}  # the last one wins: on top
    current = os.path.abspath(path)
    for _ in range(_MAX_SYMLINKS):
        parent, name = os.path.split(current)
        candidate = os.path.join(os.path.realpath(parent), name) if name else parent
        if candidate in by_point:
            return by_point[candidate]
        if not os.path.islink(candidate):  # not a mount point, so lstat stays outside mounts
            return None
        current = os.path.normpath(os.path.join(os.path.dirname(candidate), os.readlink(candidate)))
    return None


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if *path* is a mount point, dead FUSE mounts included."""
    return find(path) is not None


def of_device(st_dev: int) -> MountEntry | None:
    """The first mount of the device *st_dev* (as ``os.stat`` reports it), or None.

    Read afresh each time: the kernel hands a freed anonymous device number to the next
    mount, so a cached answer could take a later tmpfs for an earlier vrangefs.
    """
    for entry in entries():
        if entry.is_device(st_dev):
            return entry
    return None
