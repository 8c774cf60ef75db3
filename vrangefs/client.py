"""Python client for applications: mark ranges of vrangefs files volatile and back, and pin them.

Every function takes a path or an open file descriptor.  Offsets and lengths
are in bytes; a length of 0 means "through the end of the file".  Example::

    from vrangefs import client

    with open("/mnt/cache/thumb.png", "rb") as f:
        with client.pinned(f.fileno()) as pin:   # nothing purges it while inside
            if pin.intact:
                data = f.read()
            else:
                data = regenerate()
    # unpinned: purgeable again if it is volatile

The functions refuse files that are not on a vrangefs mount
(:class:`NotVrangefsError`): on another filesystem a ``user.vrange.*``
attribute would be stored as an ordinary xattr and mean nothing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vrangefs import mountinfo, protocol
from vrangefs.protocol import PAGE_SIZE, PinLine

Target = str | os.PathLike[str] | int
Range = tuple[int, int]

VRANGE_VOLATILE = 0
VRANGE_NONVOLATILE = 1

FUSE_FSTYPE = "fuse.vrangefs"


class NotVrangefsError(OSError):
    """The file is not on a vrangefs mount."""


def _fstype_of_dev(dev: int) -> str | None:
    """The type of the filesystem mounted as *dev*, read afresh each time.

    Not cached: the kernel hands a freed device number to the next mount, so a
    cached answer could take a later tmpfs for an earlier vrangefs.
    """
    entry = mountinfo.of_device(dev)
    return entry.fstype if entry is not None else None


def _check(target: Target) -> None:
    st = os.stat(target) if not isinstance(target, int) else os.fstat(target)
    if _fstype_of_dev(st.st_dev) != FUSE_FSTYPE:
        raise NotVrangefsError(errno.ENOTSUP, f"{_name(target)} is not on a vrangefs mount")


def _name(target: Target) -> str:
    return f"fd {target}" if isinstance(target, int) else os.fspath(target)


def _set(target: Target, name: str, value: bytes) -> None:
    _check(target)
    os.setxattr(target, name, value)


def _get(target: Target, name: str) -> bytes:
    _check(target)
    return os.getxattr(target, name)


def _range_value(offset: int, length: int) -> bytes:
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must not be negative: {offset}, {length}")
    return b"%d,%d" % (offset, length)


def _size(target: Target) -> int:
    return (os.fstat(target) if isinstance(target, int) else os.stat(target)).st_size


def mark_volatile(target: Target, offset: int = 0, length: int = 0) -> None:
    """Let the filesystem purge the pages wholly inside the range (one purge unit)."""
    _set(target, protocol.VOLATILE, _range_value(offset, length))


def mark_nonvolatile(target: Target, offset: int = 0, length: int = 0) -> list[Range]:
    """Protect every page touching the range; return the purged ranges among them.

    An empty list means the content survived.  Once this returns nothing can
    purge those pages, so the answer cannot go stale.
    """
    _set(target, protocol.NONVOLATILE, _range_value(offset, length))
    pages = protocol.nonvolatile_pages(offset, length, _size(target))
    return [] if pages is None else _purged_in(target, *pages)


def purged(target: Target) -> list[Range]:
    """The file's purged ranges (pages whose data is gone and not written since)."""
    return protocol.parse_ranges(_get(target, protocol.PURGED))


def volatile_ranges(target: Target) -> list[Range]:
    """The file's volatile ranges, one per purge unit, purged ones included."""
    return protocol.parse_ranges(_get(target, protocol.VOLATILE))


def _purged_in(target: Target, first: int, end: int) -> list[Range]:
    """The purged byte ranges of the file inside pages [first, end)."""
    lo, hi = first * PAGE_SIZE, end * PAGE_SIZE
    out = []
    for start, size in purged(target):
        a, b = max(start, lo), min(start + size, hi)
        if a < b:
            out.append((a, b - a))
    return out


def pin(target: Target, offset: int = 0, length: int = 0) -> None:
    """This process takes one more pin on every page touching the range.

    Nothing purges a pinned page: a volatile unit holding one is skipped whole
    until its pins are gone.  Pins are counted (each needs its own
    :func:`unpin`), belong to the calling process (not inherited by children)
    and go when it exits.  Needs read permission on the file: the pin is set
    through ``system.vrange.pin``, which the daemon checks, falling back to
    ``user.vrange.pin`` (write permission) where a security module refuses the
    ``system.`` name.  OSError EDQUOT past the per-user limit.
    """
    _set_pin(target, protocol.SYSTEM_PIN, protocol.PIN, offset, length)


def unpin(target: Target, offset: int = 0, length: int = 0) -> None:
    """Drop one pin of this process on exactly the pages the range names (as :func:`pin`).

    OSError ENOENT, changing nothing, if the process holds no pin there.
    """
    _set_pin(target, protocol.SYSTEM_UNPIN, protocol.UNPIN, offset, length)


def _set_pin(target: Target, name: str, fallback: str, offset: int, length: int) -> None:
    value = _range_value(offset, length)
    _check(target)
    try:
        os.setxattr(target, name, value)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        os.setxattr(target, fallback, value)  # refused by a security module: try user.*


def pins(target: Target) -> list[PinLine]:
    """The file's live pins: ``PinLine(offset, length, pid, count)``, sorted by offset."""
    return protocol.parse_pins(_get(target, protocol.PINS))


def stats(mountpoint: str | os.PathLike[str]) -> dict[str, int | str]:
    """The mount's statistics (``pid``, ``memory_cap``, ``resident_bytes``, ...)."""
    return protocol.parse_stats(_get(mountpoint, protocol.STATS))


def purge_all(mountpoint: str | os.PathLike[str]) -> None:
    """Purge every volatile page of the mount now."""
    _set(mountpoint, protocol.PURGE, protocol.PURGE_ALL)


def set_cache_dir(directory: Target, on: bool = True) -> None:
    """Make a directory a cache directory (its closed files may be evicted whole), or not.

    Only this directory: directories created in it later inherit the setting.
    """
    _set(directory, protocol.CACHE_DIR, b"1" if on else b"0")


def is_cache_dir(directory: Target) -> bool:
    """Whether a directory is a cache directory."""
    return protocol.parse_flag(_get(directory, protocol.CACHE_DIR))


def fvrange(fd: int, start: int, length: int, mode: int) -> int:
    """The 2013 RFC's call: VRANGE_VOLATILE or VRANGE_NONVOLATILE on ``fd``.

    Returns 0 for VOLATILE; for NONVOLATILE, 1 if any page of the range was
    purged and 0 otherwise, so code written for the kernel proposal ports
    directly.
    """
    if mode == VRANGE_VOLATILE:
        mark_volatile(fd, start, length)
        return 0
    if mode == VRANGE_NONVOLATILE:
        return 1 if mark_nonvolatile(fd, start, length) else 0
    raise ValueError(f"invalid fvrange mode {mode}: expected VRANGE_VOLATILE or VRANGE_NONVOLATILE")


@dataclass
class Pin:
    """What :func:`pinned` found once it held the range."""

    purged: list[Range] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        """True if nothing in the range was purged."""
        return not self.purged


@contextmanager
def pinned(target: Target, offset: int = 0, length: int = 0) -> Iterator[Pin]:
    """Hold a real, counted pin of this process on the range inside the block.

    On entry it pins (:func:`pin`), then reads what was purged in the pinned
    pages: the yielded :class:`Pin` tells whether the content survived, and the
    answer is final while the block runs (nothing purges a pinned page).  On
    exit, however the block is left, it drops that pin.  Volatility is not
    changed: a volatile range is purgeable again once no process pins it.
    Rewrite purged pages inside the block if you want them back: a write makes
    a purged page data again.

    Pins are counted and owned by the process, so several processes (or
    nested blocks) can hold one range and none unpins it under another.
    LENGTH 0 is resolved here to the file's size at entry, so the exit unpins
    exactly the pages the entry pinned even if the file grows or shrinks; a
    range that holds no page (an empty file) pins nothing.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must not be negative: {offset}, {length}")
    if length == 0:
        length = max(_size(target) - offset, 0)
        if length == 0:
            _check(target)
            yield Pin([])
            return
    pin(target, offset, length)
    try:
        first, end = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        held = Pin(_purged_in(target, first, end))
        yield held
    finally:
        unpin(target, offset, length)
