"""The ``user.vrange.*`` extended attributes: names, value formats and page rounding.

Shared by the daemon and the client; pure (no FUSE, no interval tree), but for
:func:`read_stats`, the one reader of a mount's statistics.

Numbers in values are decimal bytes. Where a suffix is allowed it is ``K``, ``M``, ``G`` or
``T`` (powers of 1024), in either case, optionally followed by ``iB`` in any case: ``4K``,
``4k``, ``4KiB`` and ``4kib`` are all 4096. ``KB``-style suffixes are rejected, because they
are ambiguous (1000 or 1024). Numbers have no sign, no leading zeros (``0`` itself is fine,
``010`` is not: it could be meant as octal), no hex, no decimal point and no surrounding
whitespace.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

PAGE_SIZE = 4096
"""The unit of volatility, purging and memory accounting (the contract fixes it)."""


class PurgeCause(Enum):
    """Why units were purged; the value names the statistics (``purge_events_cap``, ...)."""

    CAP = "cap"  # a write needed room under the memory cap
    PRESSURE = "pressure"  # the machine or the daemon's cgroup ran short of memory
    EXPLICIT = "explicit"  # user.vrange.purge=all


XATTR_PREFIX = "user.vrange."
VOLATILE = "user.vrange.volatile"
NONVOLATILE = "user.vrange.nonvolatile"
PURGED = "user.vrange.purged"
STATS = "user.vrange.stats"
PURGE = "user.vrange.purge"
PIN = "user.vrange.pin"
UNPIN = "user.vrange.unpin"
PINS = "user.vrange.pins"
CACHE_DIR = "user.vrange.cache_dir"

# The same pin and unpin in the system namespace, which the kernel leaves to the
# filesystem: with default_permissions it demands write permission for any user.*
# setxattr, so readers pin through these names, and the daemon checks read permission.
SYSTEM_PREFIX = "system.vrange."
SYSTEM_PIN = "system.vrange.pin"
SYSTEM_UNPIN = "system.vrange.unpin"

# pyfuse3 passes attribute names as bytes.
XATTR_PREFIX_B = XATTR_PREFIX.encode()
VOLATILE_B = VOLATILE.encode()
NONVOLATILE_B = NONVOLATILE.encode()
PURGED_B = PURGED.encode()
STATS_B = STATS.encode()
PURGE_B = PURGE.encode()
PIN_B = PIN.encode()
UNPIN_B = UNPIN.encode()
PINS_B = PINS.encode()
CACHE_DIR_B = CACHE_DIR.encode()
SYSTEM_PREFIX_B = SYSTEM_PREFIX.encode()
SYSTEM_PIN_B = SYSTEM_PIN.encode()
SYSTEM_UNPIN_B = SYSTEM_UNPIN.encode()

PURGE_ALL = b"all"
"""The one value ``user.vrange.purge`` accepts (a trailing newline is allowed too)."""

MAX_OFFSET = 2**63 - 1
"""The largest byte offset (and offset + length) a range may reach."""

_MAX_SHOWN = 60
_MAX_SIZE_TEXT = 64

_UNITS = {b"": 1, b"k": 1024, b"m": 1024**2, b"g": 1024**3, b"t": 1024**4}
_NUMBER = rb"(0|[1-9][0-9]*)((?i:[kmgt](?:ib)?)?)"
_RANGE_RE = re.compile(_NUMBER + rb"," + _NUMBER)
_PLAIN_RANGE_RE = re.compile(rb"(0|[1-9][0-9]*),(0|[1-9][0-9]*)")
_PIN_LINE_RE = re.compile(rb"(0|[1-9][0-9]*),(0|[1-9][0-9]*) ([1-9][0-9]*) ([1-9][0-9]*)")
_SIZE_RE = re.compile(_NUMBER)
_PERCENT_RE = re.compile(rb"(0|[1-9][0-9]*(?:\.[0-9]+)?|0\.[0-9]+)%")
_STATS_KEY_RE = re.compile(r"[a-z][a-z0-9_]*")
_STATS_INT_RE = re.compile(rb"-?(0|[1-9][0-9]*)")

_RANGE_EXPECTED = (
    "expected OFFSET,LENGTH in decimal bytes, each with an optional K/M/G/T suffix "
    "(powers of 1024), e.g. 0,4096 or 8K,1M; LENGTH 0 means through the end of the file"
)
_SIZE_EXPECTED = (
    "expected a positive number of bytes with an optional K/M/G/T suffix (powers of 1024), "
    "e.g. 512M, or a percentage of RAM above 0 and at most 100, e.g. 25% or 12.5%"
)


class XattrValueError(ValueError):
    """A malformed ``user.vrange.*`` value; ``errno`` is what the caller should answer."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class RangeError(XattrValueError):
    """A malformed or out-of-range ``OFFSET,LENGTH`` value.

    ``errno`` is ``EINVAL`` for bad syntax (garbage, a sign, empty parts, extra fields, NUL
    bytes, hex, whitespace) and ``ERANGE`` for a well-formed number that exceeds
    ``MAX_OFFSET``, alone or as offset + length.
    """


def _show(value: bytes) -> str:
    """The value for an error message, cut short if long."""
    if len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN]) + f"... ({len(value)} bytes)"
    return repr(value)


_MAX_DIGITS = len(str(MAX_OFFSET))
_ZERO = ord("0")


def _number(digits: bytes, suffix: bytes) -> int | None:
    """The value of a matched number, or None if it exceeds MAX_OFFSET."""
    if len(digits) > _MAX_DIGITS:  # also keeps int() far from its digit limit
        return None
    value = int(digits)
    if suffix:
        value *= _UNITS[suffix[:1].lower()]
    return value if value <= MAX_OFFSET else None


def _strip_newline(value: bytes) -> bytes:
    return value[:-1] if value.endswith(b"\n") else value


def parse_range(value: bytes) -> tuple[int, int]:
    """Parse an ``OFFSET,LENGTH`` xattr value into (offset, length) in bytes.

    Each part is a decimal number with an optional suffix (see the module docstring). One
    trailing newline is allowed (``echo``-style values); nothing else: no other whitespace,
    sign, empty part, extra field or NUL byte. LENGTH 0 means through the end of the file
    and is returned as 0. Raises :class:`RangeError` (EINVAL or ERANGE).
    """
    text = _strip_newline(value)
    # Two plain decimal numbers (what the client library sends): no regex needed. Anything
    # else, and anything out of range, takes the general path below.
    offset_text, _, length_text = text.partition(b",")
    if (
        offset_text.isdigit()
        and length_text.isdigit()
        and (offset_text[0] != _ZERO or len(offset_text) == 1)
        and (length_text[0] != _ZERO or len(length_text) == 1)
        and len(offset_text) <= _MAX_DIGITS
        and len(length_text) <= _MAX_DIGITS
    ):
        offset, length = int(offset_text), int(length_text)
        if offset + length <= MAX_OFFSET:
            return offset, length
    return _parse_range_general(value)


def _parse_range_general(value: bytes) -> tuple[int, int]:
    """:func:`parse_range` by the grammar's regular expression, for every value."""
    match = _RANGE_RE.fullmatch(_strip_newline(value))
    if match is None:
        raise RangeError(errno.EINVAL, f"invalid range {_show(value)}: {_RANGE_EXPECTED}")
    offset = _number(match[1], match[2])
    length = _number(match[3], match[4])
    if offset is None or length is None or offset + length > MAX_OFFSET:
        raise RangeError(
            errno.ERANGE,
            f"range {_show(value)} is too large: offset and offset + length must not "
            f"exceed {MAX_OFFSET} (2**63 - 1)",
        )
    return offset, length


def parse_purge(value: bytes) -> None:
    """Check a ``user.vrange.purge`` value: ``all``, optionally with a trailing newline.

    Raises :class:`XattrValueError` (EINVAL) for anything else.
    """
    if _strip_newline(value) != PURGE_ALL:
        raise XattrValueError(
            errno.EINVAL, f"invalid purge request {_show(value)}: expected {PURGE_ALL!r}"
        )


def parse_flag(value: bytes) -> bool:
    """Parse a ``user.vrange.cache_dir`` value: ``1`` or ``0``, optionally with a newline.

    Raises :class:`XattrValueError` (EINVAL) for anything else.
    """
    flag = _strip_newline(value)
    if flag not in (b"0", b"1"):
        raise XattrValueError(
            errno.EINVAL, f"invalid {CACHE_DIR} value {_show(value)}: expected 1 or 0"
        )
    return flag == b"1"


def parse_size(text: str, total_ram: int | None = None) -> int:
    """Parse a memory size such as ``512M``, ``1GiB``, ``1048576`` or ``25%`` into bytes.

    Bytes take an optional K/M/G/T suffix (powers of 1024; see the module docstring). A
    percentage (``NN%`` or ``NN.N%``, above 0 and at most 100) is of ``total_ram``, rounded
    down to whole bytes; it needs ``total_ram``. The result is at least 1 and at most
    ``MAX_OFFSET``. No whitespace is allowed. Raises ValueError naming the value and what is
    expected.
    """
    raw = text.encode("ascii", "replace")
    if len(raw) > _MAX_SIZE_TEXT:
        raise ValueError(f"invalid size {text[:_MAX_SHOWN]!r}...: too long; {_SIZE_EXPECTED}")
    if (match := _SIZE_RE.fullmatch(raw)) is not None:
        size = _number(match[1], match[2])
        if size is None:
            raise ValueError(f"size {text!r} is too large: at most {MAX_OFFSET} bytes")
    elif (match := _PERCENT_RE.fullmatch(raw)) is not None:
        percent = Fraction(match[1].decode())
        if not 0 < percent <= 100:
            raise ValueError(f"invalid size {text!r}: {_SIZE_EXPECTED}")
        if total_ram is None or total_ram <= 0:
            raise ValueError(f"size {text!r} is a percentage of RAM, but the RAM size is unknown")
        size = int(total_ram * percent / 100)
        if size > MAX_OFFSET:
            raise ValueError(f"size {text!r} is too large: at most {MAX_OFFSET} bytes")
    else:
        raise ValueError(f"invalid size {text!r}: {_SIZE_EXPECTED}")
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: {_SIZE_EXPECTED}")
    return size


def format_ranges(ranges: Iterable[tuple[int, int]]) -> bytes:
    """Format (offset, length) pairs one ``OFFSET,LENGTH\\n`` line each, sorted by offset.

    No ranges give empty bytes. Raises ValueError for a negative pair or one that reaches
    past ``MAX_OFFSET`` (:func:`parse_ranges` would refuse it).
    """
    pairs = sorted(ranges)
    for offset, length in pairs:
        if offset < 0 or length < 0 or offset + length > MAX_OFFSET:
            raise ValueError(f"cannot format range ({offset}, {length}): negative or too large")
    return b"".join(b"%d,%d\n" % pair for pair in pairs)


def parse_ranges(value: bytes) -> list[tuple[int, int]]:
    """Parse what :func:`format_ranges` produced back into (offset, length) pairs.

    Plain decimal numbers only (no suffixes), one pair a line; the newline after the last
    line may be missing. Empty bytes give ``[]``. Raises :class:`RangeError`.
    """
    if not value:
        return []
    result = []
    for line in _strip_newline(value).split(b"\n"):
        match = _PLAIN_RANGE_RE.fullmatch(line)
        if match is None:
            raise RangeError(
                errno.EINVAL,
                f"invalid range line {_show(line)}: expected OFFSET,LENGTH in decimal bytes",
            )
        offset = _number(match[1], b"")
        length = _number(match[2], b"")
        if offset is None or length is None or offset + length > MAX_OFFSET:
            raise RangeError(errno.ERANGE, f"range line {_show(line)} is too large")
        result.append((offset, length))
    return result


def _clip(offset: int, length: int, file_size: int) -> tuple[int, bool]:
    """(end of the range clipped to file_size, whether the range reaches file_size)."""
    if offset < 0 or length < 0 or file_size < 0:
        raise ValueError(f"negative range or size: {offset}, {length}, {file_size}")
    reaches_eof = length == 0 or offset + length >= file_size
    return (file_size if reaches_eof else offset + length), reaches_eof


def volatile_pages(offset: int, length: int, file_size: int) -> tuple[int, int] | None:
    """The pages [first, end) wholly inside a byte range, for marking volatile.

    The range is clipped to ``file_size`` (LENGTH 0 reaches ``file_size``) and rounded
    inward. When it reaches the end of the file, the page holding the end of the file counts
    as whole. None if no page qualifies.
    """
    # _clip, inlined: every mark comes here.
    if offset < 0 or length < 0 or file_size < 0:
        raise ValueError(f"negative range or size: {offset}, {length}, {file_size}")
    reaches_eof = length == 0 or offset + length >= file_size
    end = file_size if reaches_eof else offset + length
    if offset >= end:
        return None
    first = -(-offset // PAGE_SIZE)
    last = -(-end // PAGE_SIZE) if reaches_eof else end // PAGE_SIZE
    return (first, last) if first < last else None


def nonvolatile_pages(offset: int, length: int, file_size: int) -> tuple[int, int] | None:
    """The pages [first, end) touching a byte range, for marking non-volatile.

    The range is clipped to ``file_size`` (LENGTH 0 reaches ``file_size``) and rounded
    outward. None if the clipped range is empty.
    """
    end, _ = _clip(offset, length, file_size)
    if offset >= end:
        return None
    return offset // PAGE_SIZE, -(-end // PAGE_SIZE)


def pin_pages(offset: int, length: int, file_size: int) -> tuple[int, int] | None:
    """The pages [first, end) a pin (or unpin) names: every page touching the byte range.

    Rounded outward. LENGTH 0 reaches ``file_size`` (the end of the file at the time of the
    call), and None is returned if the range starts at or past it. Other ranges are *not*
    clipped to the file: a pin may hold pages past the end of the file, which the file may
    grow into, so that the same value always names the same pages.
    """
    if offset < 0 or length < 0 or file_size < 0:
        raise ValueError(f"negative range or size: {offset}, {length}, {file_size}")
    end = file_size if length == 0 else offset + length
    if offset >= end:
        return None
    return offset // PAGE_SIZE, -(-end // PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class PinLine:
    """One line of ``user.vrange.pins``: pinned bytes (whole pages), owner's pid, count."""

    offset: int
    length: int
    pid: int
    count: int


_PIN_LINE = b"%d,%d %d %d\n"


def format_pins(pins: Iterable[PinLine]) -> bytes:
    """``OFFSET,LENGTH PID COUNT`` lines, sorted by (offset, length, pid)."""
    rows = sorted(pins, key=lambda p: (p.offset, p.length, p.pid))
    return format_pin_rows((p.offset, p.length, p.pid, p.count) for p in rows)


def format_pin_rows(rows: Iterable[tuple[int, int, int, int]]) -> bytes:
    """:func:`format_pins` of (offset, length, pid, count) rows already in that order."""
    return b"".join([_PIN_LINE % row for row in rows])


def parse_pins(value: bytes) -> list[PinLine]:
    """Parse what :func:`format_pins` produced. Raises :class:`RangeError` (EINVAL)."""
    out = []
    for line in _strip_newline(value).split(b"\n") if value else []:
        match = _PIN_LINE_RE.fullmatch(line)
        if match is None:
            raise RangeError(
                errno.EINVAL, f"invalid pin line {_show(line)}: expected OFFSET,LENGTH PID COUNT"
            )
        out.append(PinLine(*(int(group) for group in match.groups())))
    return out


def format_stats(stats: Mapping[str, int | str]) -> bytes:
    """Format statistics as ``key=value\\n`` lines, in the mapping's order.

    Keys are lower-case identifiers; values are integers or strings without newlines.
    """
    lines = []
    for key, value in stats.items():
        text = str(value)
        if not _STATS_KEY_RE.fullmatch(key) or "\n" in text:
            raise ValueError(f"cannot format statistic {key!r}={text!r}")
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode()


def parse_stats(value: bytes) -> dict[str, int | str]:
    """Parse :func:`format_stats` output; values that are decimal integers become ints."""
    result: dict[str, int | str] = {}
    for line in _strip_newline(value).split(b"\n") if value else []:
        key, sep, text = line.partition(b"=")
        name = key.decode("ascii", "replace")
        if not sep or not _STATS_KEY_RE.fullmatch(name):
            raise ValueError(f"invalid statistics line {_show(line)}: expected key=value")
        result[name] = int(text) if _STATS_INT_RE.fullmatch(text) else text.decode()
    return result


def read_stats(mountpoint: str | os.PathLike[str] | int) -> dict[str, int | str]:
    """A mount's statistics: ``user.vrange.stats`` of its root (a path or an open fd), parsed.

    Raises OSError as getxattr does (ENODATA anywhere but on the root of a vrangefs mount)
    and ValueError for a malformed value.
    """
    return parse_stats(os.getxattr(mountpoint, STATS))


def int_stats(stats: Mapping[str, int | str]) -> dict[str, int]:
    """The integer statistics (today all of them), typed as such for arithmetic."""
    return {key: value for key, value in stats.items() if isinstance(value, int)}


# -- the event stream (vrangefs events) ------------------------------------------------------
EVENTS_SOCKET = "events_socket"
"""The statistic naming the daemon's event socket: ``@`` and its abstract name, or empty."""


def event_socket_name(address: bytes | str) -> str:
    """How the stats show an abstract Unix socket address (``b"\\0" + name``): ``@name``.

    The daemon's name is picked by the kernel (autobind): five hex digits.
    """
    raw = address.encode() if isinstance(address, str) else address
    if not raw.startswith(b"\0") or not raw[1:].isascii() or not raw[1:].isalnum():
        raise ValueError(f"not an autobound abstract socket address: {raw!r}")
    return "@" + raw[1:].decode()


def event_socket_address(name: str) -> bytes:
    """The address to connect to for a name as the stats show it (``@name``)."""
    if not name.startswith("@") or not name[1:].isascii() or not name[1:].isalnum():
        raise ValueError(f"not an event socket name: {name!r}")
    return b"\0" + name[1:].encode()
