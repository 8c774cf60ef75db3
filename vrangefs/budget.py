"""The metadata budget: everything the daemon holds besides page data, counted and capped.

File data is capped by the memory cap; this caps the rest, like tmpfs's ``nr_inodes`` but
in bytes and for every kind of state a user can make the daemon keep: inodes, names,
symlink targets, ``user.*`` xattrs, volatile units, pins, and the page tables of (sparse)
files.  Without it, anyone who may write one file could grow the daemon without bound
with xattrs or units, on a filesystem whose point is to give memory back.

The count is an estimate of the Python objects each thing costs, per object and per byte
(the constants below, measured with tracemalloc on CPython 3.11; tests check the estimate
against a measurement).  Inodes, names, targets and xattrs are charged as they are made
and released as they go; units, pins and page tables are counted where they live
(:class:`~vrangefs.reclaim.Reclaim`, :class:`~vrangefs.pins.PinTable`,
:class:`~vrangefs.pagestore.PageStore`) and read from there, so they can never drift.

Only operations that *make* state are refused (:class:`MetadataFullError`, ENOSPC to the
caller) and they are refused before they change anything.  Operations that shrink or
merely reshape state (unlink, unmark, truncate, rename, splitting a unit) always succeed,
even when a split or a longer name takes the count a little past the cap.
"""

from __future__ import annotations

INODE_BYTES = 200  # an Inode and its table entry
FILE_BYTES = 250  # a regular file's FileData, beyond the inode
DIRECTORY_BYTES = 430  # a Directory: its entry and cookie maps, beyond the inode
SYMLINK_BYTES = 10  # beyond the inode, plus the target's length
NAME_BYTES = 200  # a directory entry in every map of its directory, plus its length
XATTR_BYTES = 160  # one stored xattr, plus the lengths of its name and value
UNIT_BYTES = 280  # a volatile unit: PurgeUnit, its ints, order entry, index slot (273 B traced)
PIN_BYTES = 400  # one pin record (a process's pin of one range, however often held)
CHUNK_BYTES = 1200  # one page-table chunk (1 MiB of a file's pages)


def name_bytes(name: bytes) -> int:
    return NAME_BYTES + len(name)


def xattr_bytes(name: bytes, value: bytes) -> int:
    return XATTR_BYTES + len(name) + len(value)


class MetadataFullError(Exception):
    """Making this would take the metadata past its cap."""

    def __init__(self, what: str, needed: int, used: int, cap: int) -> None:
        super().__init__(
            f"{what} needs {needed} bytes of metadata; {used} of the metadata cap {cap} are used"
        )


class MetadataBudget:
    """The count of metadata bytes and the cap on it (see the module docstring)."""

    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes < 0:
            raise ValueError(f"metadata cap must not be negative: {cap_bytes}")
        self.cap = cap_bytes
        self.charged = 0  # inodes, names, targets, xattrs
        self._counted: list[tuple[object, str, int]] = []  # (owner, attribute, bytes each)

    def count(self, owner: object, attribute: str, each: int) -> None:
        """Add things counted elsewhere (units, pins, page-table chunks) to the total: as
        many as ``owner.attribute`` says, at *each* bytes."""
        self._counted.append((owner, attribute, each))

    @property
    def used(self) -> int:
        # Read on every mark: plain getattr in a loop, no Python call per counter.
        total = self.charged
        for owner, attribute, each in self._counted:
            total += getattr(owner, attribute) * each
        return total

    def fits(self, needed: int) -> bool:
        """Whether *needed* more bytes stay within the cap (:meth:`check` without a message,
        for hot paths that build one only when refused; :attr:`used` inlined, one call less
        on every mark)."""
        total = self.charged + needed
        for owner, attribute, each in self._counted:
            total += getattr(owner, attribute) * each
        return total <= self.cap

    def check(self, needed: int, what: str) -> None:
        """Raise MetadataFullError if *needed* more bytes would pass the cap."""
        used = self.used
        if used + needed > self.cap:
            raise MetadataFullError(what, needed, used, self.cap)

    def charge(self, nbytes: int, what: str) -> None:
        """Check, then count *nbytes* more (made by the caller right after)."""
        self.check(nbytes, what)
        self.charged += nbytes

    def force(self, nbytes: int) -> None:
        """Count bytes (or release them, if negative) without a check."""
        self.charged += nbytes
