"""The ``user.vrange.*`` control interface: virtual xattrs mapped onto the volume.

These names are never stored and never listed.  Each is served by one entry
of a dispatch table; values are parsed strictly by :mod:`vrangefs.protocol`.

Errors (as the contract fixes them): the range names on a directory give
EISDIR; ``stats`` and ``purge`` exist only on the mount root (elsewhere
getxattr answers ENODATA and setxattr EINVAL); an unknown ``user.vrange.``
name answers ENODATA to getxattr and EINVAL to setxattr; a malformed value
gives EINVAL or ERANGE and changes nothing.  Permission (write access to mark,
read access to query) is enforced by the kernel before the request arrives,
because the mount uses ``default_permissions``.

Pins are the exception.  ``user.vrange.pin`` and ``unpin`` are set like the
others, so the kernel demands write permission (its rule for every ``user.*``
setxattr).  Readers pin through ``system.vrange.pin`` and ``unpin``: the
kernel leaves the ``system.`` namespace to the filesystem, so these arrive
unchecked, and the daemon checks read permission itself, on the caller's
credentials (:class:`Pinner`, which the adapter finds out).  Pins act for the
calling process, so unpinning needs no permission: a process can only drop
its own pins.  On anything but a regular file or a directory a ``system.vrange.``
pin answers EPERM, as the kernel answers any ``user.*`` setxattr there.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

from vrangefs import protocol
from vrangefs.collector import collector
from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO, Inode
from vrangefs.protocol import PAGE_SIZE, PurgeCause
from vrangefs.volume import XATTR_SIZE_MAX, Caller, Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pinner:
    """Who pins or unpins: the calling process (thread group) and its credentials."""

    tgid: int
    caller: Caller


Getter = Callable[[Volume, int], bytes]
Job = Iterator[object]
"""A request's work in small synchronous steps, for the adapter to run with pauses between
them (so that other requests are served meanwhile); done when exhausted."""

Setter = Callable[[Volume, int, bytes], Job | None]
PinSetter = Callable[[Volume, int, bytes, Pinner], None]


_parse_range = functools.lru_cache(maxsize=256)(protocol.parse_range)
"""parse_range, remembering recent values: a program that marks and unmarks the same few
ranges over and over (a cache's objects) pays for parsing each once."""


def _range_value(ino: int, name: bytes, value: bytes) -> tuple[int, int]:
    try:
        return _parse_range(value)
    except protocol.RangeError as e:
        log.warning("inode %d: %s: %s", ino, name.decode(), e)
        raise FsError(e.errno, str(e)) from None


def _set_volatile(volume: Volume, ino: int, value: bytes) -> Job | None:
    offset, length = _range_value(ino, protocol.VOLATILE_B, value)
    return volume.marking_volatile(ino, offset, length)


def _mark_volatile(volume: Volume, ino: int, value: bytes) -> Job | None:
    """:func:`setxattr_job` for ``user.vrange.volatile``, the commonest request, in fewer
    calls, with the same errors: a directory or a gone inode (which marking_volatile
    refuses) is refused before a bad value."""
    try:
        offset, length = _parse_range(value)
    except protocol.RangeError as e:
        _check_kind(volume, ino, protocol.VOLATILE_B)
        log.warning("inode %d: %s: %s", ino, protocol.VOLATILE, e)
        raise FsError(e.errno, str(e)) from None
    return volume.marking_volatile(ino, offset, length)


def _set_nonvolatile(volume: Volume, ino: int, value: bytes) -> Job:
    offset, length = _range_value(ino, protocol.NONVOLATILE_B, value)
    return volume.marking_nonvolatile(ino, offset, length)


def _set_purge(volume: Volume, ino: int, value: bytes) -> Job:
    _root_only(ino, errno.EINVAL)
    try:
        protocol.parse_purge(value)
    except protocol.XattrValueError as e:
        log.warning("%s: %s", protocol.PURGE, e)
        raise FsError(e.errno, str(e)) from None
    return _purging_all(volume)


def _purging_all(volume: Volume) -> Job:
    units = 0
    for got in volume.reclaim.purging_all():
        units += got > 0
        yield got
    log.info("purge all: %d units purged or files evicted", units)


def _set_cache_dir(volume: Volume, ino: int, value: bytes) -> Job:
    _directory_only(volume, ino)
    try:
        on = protocol.parse_flag(value)
    except protocol.XattrValueError as e:
        log.warning("inode %d: %s", ino, e)
        raise FsError(e.errno, str(e)) from None
    return volume.setting_cache_dir(ino, on)


def _get_cache_dir(volume: Volume, ino: int) -> bytes:
    _directory_only(volume, ino)
    return b"1" if volume.is_cache_dir(ino) else b"0"


def _directory_only(volume: Volume, ino: int) -> None:
    if not volume.inode(ino).is_dir:
        raise FsError(errno.ENOTDIR, f"inode {ino}: {protocol.CACHE_DIR} is for directories")


def _set_pin(volume: Volume, ino: int, value: bytes, pinner: Pinner) -> None:
    offset, length = _range_value(ino, protocol.PIN_B, value)
    volume.pin(ino, offset, length, pinner.tgid, pinner.caller.uid)


def _set_unpin(volume: Volume, ino: int, value: bytes, pinner: Pinner) -> None:
    offset, length = _range_value(ino, protocol.UNPIN_B, value)
    volume.unpin(ino, offset, length, pinner.tgid)


def _set_system_pin(volume: Volume, ino: int, value: bytes, pinner: Pinner) -> None:
    inode = _system_target(volume, ino)
    if not volume.may_read(inode, pinner.caller):
        raise FsError(errno.EACCES, f"inode {ino}: pinning needs read permission")
    _set_pin(volume, ino, value, pinner)


def _set_system_unpin(volume: Volume, ino: int, value: bytes, pinner: Pinner) -> None:
    _system_target(volume, ino)
    _set_unpin(volume, ino, value, pinner)


def _system_target(volume: Volume, ino: int) -> Inode:
    """The kernel's rules for ``user.*`` names, which it does not apply to ``system.*``."""
    inode = volume.inode(ino)
    if not inode.is_dir and inode.data is None:
        raise FsError(errno.EPERM, "pins on a symlink or special file")
    return inode


def _get_volatile(volume: Volume, ino: int) -> bytes:
    return _listing(ino, protocol.VOLATILE, volume.volatile_ranges(ino))


def _get_purged(volume: Volume, ino: int) -> bytes:
    return _listing(ino, protocol.PURGED, volume.purged_ranges(ino))


def _listing(ino: int, name: str, ranges: Iterator[tuple[int, int]]) -> bytes:
    """Ranges (ascending) one per line; E2BIG as soon as they pass what an xattr can hold.

    The kernel refuses values over XATTR_SIZE_MAX anyway; stopping early keeps a
    file with a huge number of ranges from costing a long walk for nothing.
    """
    out = bytearray()
    for offset, length in ranges:
        out += b"%d,%d\n" % (offset, length)
        if len(out) > XATTR_SIZE_MAX:
            raise FsError(
                errno.E2BIG,
                f"inode {ino}: {name} lists more than {XATTR_SIZE_MAX} bytes of ranges",
            )
    return bytes(out)


# The shortest line a pin lists as ("0,4096 1 1\n"): more pins than fit at that length
# cannot fit at all, and are refused before the listing is built (500,000 pins: 2 s).
_SHORTEST_PIN_LINE = 11


def _get_pins(volume: Volume, ino: int) -> bytes:
    """``OFFSET,LENGTH PID COUNT`` per pin; E2BIG past what an xattr holds, as _listing."""
    if volume.pin_records(ino) > XATTR_SIZE_MAX // _SHORTEST_PIN_LINE:
        _too_many_pins(ino)
    value = protocol.format_pin_rows(
        (start * PAGE_SIZE, (end - start) * PAGE_SIZE, tgid, count)
        for start, end, tgid, count in volume.pin_rows(ino)  # (start, end) order is that too
    )
    if len(value) > XATTR_SIZE_MAX:
        _too_many_pins(ino)
    return value


def _too_many_pins(ino: int) -> NoReturn:
    raise FsError(
        errno.E2BIG, f"inode {ino}: {protocol.PINS} lists more than {XATTR_SIZE_MAX} bytes of pins"
    )


def _get_stats(volume: Volume, ino: int) -> bytes:
    _root_only(ino, errno.ENODATA)
    return protocol.format_stats(stats(volume))


def stats(volume: Volume) -> dict[str, int | str]:
    """The mount statistics, in the order they are printed.

    ``metadata_bytes`` is the metadata budget's count (:mod:`vrangefs.budget`):
    what the daemon holds besides file data, as estimated object by object;
    ``daemon_rss_bytes`` is what the process really uses, interpreter included.
    """
    r = volume.reclaim.statistics()
    resident = r.resident_pages * PAGE_SIZE
    volatile = r.volatile_pages * PAGE_SIZE
    rss = _rss_bytes()
    out: dict[str, int | str] = {
        "pid": os.getpid(),
        "memory_cap": r.capacity_pages * PAGE_SIZE,
        "resident_bytes": resident,
        "volatile_bytes": volatile,
        "nonvolatile_bytes": resident - volatile,
        "purged_bytes_total": sum(r.purged_pages.values()) * PAGE_SIZE,
        "purge_events": sum(r.purge_events.values()),
    }
    for cause in PurgeCause:
        out[f"purged_bytes_{cause.value}"] = r.purged_pages[cause] * PAGE_SIZE
        out[f"purge_events_{cause.value}"] = r.purge_events[cause]
    out.update(
        volatile_units=r.volatile_units,
        purgeable_units=r.purgeable_units,
        pinned_volatile_bytes=r.pinned_volatile_pages * PAGE_SIZE,
        pins=r.pins,
        pinned_bytes=r.pinned_pages * PAGE_SIZE,
        pin_owners=r.pin_owners,
        pins_released_by_exit=r.pins_released_by_exit,
        pin_limit_bytes=volume.pin_limit,
        cache_dir_files=r.cache_dir_files,
        cache_dir_bytes=r.cache_dir_pages * PAGE_SIZE,
        evicted_files=sum(r.evicted_files.values()),
        evicted_bytes=sum(r.evicted_pages.values()) * PAGE_SIZE,
    )
    for cause in PurgeCause:
        out[f"evicted_files_{cause.value}"] = r.evicted_files[cause]
        out[f"evicted_bytes_{cause.value}"] = r.evicted_pages[cause] * PAGE_SIZE
    out.update(
        oldest_purgeable_age_ms=round(r.oldest_age * 1000),
        inodes=len(volume.inodes),
        high_watermark_bytes=r.high_pages * PAGE_SIZE,
        low_watermark_bytes=r.low_pages * PAGE_SIZE,
        daemon_rss_bytes=rss,
        page_pool_bytes=volume.store.pool_pages * PAGE_SIZE,
        returning_bytes=(volume.store.returning_pages + volume.store.pending_pages) * PAGE_SIZE,
        metadata_bytes=volume.budget.used,
        metadata_cap=volume.budget.cap,
    )
    out.update(collector.statistics())
    if volume.reclaim.observer is not None:  # the event stream's socket and counters
        out.update(volume.reclaim.observer.statistics())
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE")


def _root_only(ino: int, err: int) -> None:
    if ino != ROOT_INO:
        raise FsError(err, "only on the mount root")


GETTERS: dict[bytes, Getter] = {
    protocol.VOLATILE_B: _get_volatile,
    protocol.PURGED_B: _get_purged,
    protocol.PINS_B: _get_pins,
    protocol.STATS_B: _get_stats,
    protocol.CACHE_DIR_B: _get_cache_dir,
}

SETTERS: dict[bytes, Setter] = {
    protocol.VOLATILE_B: _set_volatile,
    protocol.NONVOLATILE_B: _set_nonvolatile,
    protocol.PURGE_B: _set_purge,
    protocol.CACHE_DIR_B: _set_cache_dir,
}

PIN_SETTERS: dict[bytes, PinSetter] = {
    protocol.PIN_B: _set_pin,
    protocol.UNPIN_B: _set_unpin,
    protocol.SYSTEM_PIN_B: _set_system_pin,
    protocol.SYSTEM_UNPIN_B: _set_system_unpin,
}
"""Names that act for the calling process: the adapter finds out who that is."""

PINNING = frozenset((protocol.PIN_B, protocol.SYSTEM_PIN_B))
READ_CHECKED = frozenset((protocol.SYSTEM_PIN_B,))
"""Names whose read permission the daemon checks: the pinner's groups and privilege count."""

# Range names: regular files only (EISDIR on directories, EINVAL on others).
_RANGE_NAMES = frozenset(
    (protocol.VOLATILE_B, protocol.NONVOLATILE_B, protocol.PURGED_B, protocol.PINS_B)
) | frozenset(PIN_SETTERS)


def is_control(name: bytes) -> bool:
    return name.startswith((protocol.XATTR_PREFIX_B, protocol.SYSTEM_PREFIX_B))


def needs_pinner(name: bytes) -> bool:
    """Whether setting *name* acts for the calling process (pin, unpin)."""
    return name in PIN_SETTERS


def _check_kind(volume: Volume, ino: int, name: bytes) -> None:
    if name in _RANGE_NAMES and volume.inode(ino).is_dir:
        raise FsError(errno.EISDIR, f"{name.decode()} on a directory")


def getxattr(volume: Volume, ino: int, name: bytes) -> bytes:
    _check_kind(volume, ino, name)
    getter = GETTERS.get(name)
    if getter is None:
        raise FsError(errno.ENODATA, f"no readable attribute {name!r}")
    return getter(volume, ino)


def setxattr(
    volume: Volume, ino: int, name: bytes, value: bytes, pinner: Pinner | None = None
) -> None:
    """Set a control name; *pinner* is the caller, for the names that need one."""
    job = setxattr_job(volume, ino, name, value, pinner)
    if job is not None:
        for _ in job:
            pass


def setxattr_job(
    volume: Volume, ino: int, name: bytes, value: bytes, pinner: Pinner | None = None
) -> Job | None:
    """As :func:`setxattr`, but a name whose work can be big (marking, unmarking,
    purge-all) only has its value checked here and returns the rest as a job (None when
    it is all done already)."""
    if name == protocol.VOLATILE_B:
        return _mark_volatile(volume, ino, value)
    _check_kind(volume, ino, name)
    pin_setter = PIN_SETTERS.get(name)
    if pin_setter is not None:
        if pinner is None:
            raise FsError(errno.ESRCH, f"{name.decode()}: the calling process is unknown")
        pin_setter(volume, ino, value, pinner)
        return None
    setter = SETTERS.get(name)
    if setter is None:
        raise FsError(errno.EINVAL, f"no writable attribute {name!r}")
    return setter(volume, ino, value)
