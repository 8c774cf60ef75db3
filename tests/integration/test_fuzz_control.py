"""Fuzzing the ``user.vrange.*`` interface on a real mount (hypothesis).

Arbitrary names under ``user.vrange.`` (odd bytes, names up to and past the VFS limit of 255
bytes, near misses such as ``user.vrange.volatile `` or ``user.vrange.Volatile``) and arbitrary
values (binary, huge or negative numbers, whitespace, suffixes, NUL bytes, up to and past the
64 KiB VFS limit) go through os.setxattr / getxattr / removexattr / listxattr, with and
without XATTR_CREATE / XATTR_REPLACE, on a regular file, a directory, a symlink (not
followed, and followed), a fifo and the mount root.

Each example starts from a known state and runs a short sequence of calls. The test keeps a
model of what the contract says the state is (purge units, purged pages, ordinary xattrs,
purge counters) and, around every call, reads the real state back: the volatile and purged
listings, a hash of the content, st_size and st_blocks, every target's ordinary xattrs and
the mount statistics. The properties:

- the daemon never dies: the ``pid=`` of the statistics never changes and the mount answers;
- every call ends exactly as :func:`expect` says from the contract (the errno, or success);
  where the contract leaves a choice open (a value such as ``4k,0`` or ``010,0`` that a
  lenient reading of "decimal bytes with K/M/G suffixes" would accept) the allowed set is
  wider and the reason is stated there;
- a failing call changes nothing: the whole snapshot is equal before and after;
- a successful call has the contract's effect: the snapshot equals the model's.

One module-scoped mount serves every example; the module runs in well under 40 s.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import Mount, errno_of, is_mounted
from tests.integration.vrange_helpers import (
    NONVOLATILE,
    PAGE,
    PURGE,
    PURGED,
    STATS,
    VOLATILE,
    module_mount,
    new_dir,
    pattern,
)
from vrangefs.protocol import int_stats, read_stats

PREFIX = b"user.vrange."
VOLATILE_B, NONVOLATILE_B, PURGED_B = VOLATILE.encode(), NONVOLATILE.encode(), PURGED.encode()
STATS_B, PURGE_B = STATS.encode(), PURGE.encode()
RANGE_NAMES = (VOLATILE_B, NONVOLATILE_B, PURGED_B)  # "the range names" of the contract
NAME_MAX = 255  # XATTR_NAME_MAX: longer names get ERANGE from the VFS
SIZE_MAX = 65536  # XATTR_SIZE_MAX: longer values get E2BIG from the VFS
MAX_OFFSET = 2**63 - 1
T = TypeVar("T")
NAMESPACES = (b"user.", b"trusted.", b"security.")  # stored; others: EOPNOTSUPP

# The regular file: 10 whole pages and a 123-byte tail page (11 pages), page 8 a hole.
HOLE = 8
FILE_PAGES = 11
FILE_SIZE = 10 * PAGE + 123
DATA_PAGES = frozenset(range(FILE_PAGES)) - {HOLE}
# Baseline purge units, as page ranges: pages 1-2, and pages 7 to the end (hole inside).
BASELINE_UNITS = ((1, 3), (7, FILE_PAGES))

# Targets. "symlink" is lsetxattr & co. on the link itself; "via_symlink" follows it.
FILE, DIR, ROOT, SYMLINK, VIA_SYMLINK, FIFO = (
    "file",
    "dir",
    "root",
    "symlink",
    "via_symlink",
    "fifo",
)
TARGETS = (FILE, DIR, ROOT, SYMLINK, VIA_SYMLINK, FIFO)
# The inodes whose stored xattrs are tracked (user.* on the file, the directories; trusted.*
# on the symlink and the fifo too), sorted.
XATTR_HOLDERS = tuple(sorted((FILE, DIR, ROOT, SYMLINK, FIFO)))
OPS = ("set", "get", "remove", "list")


# -- the model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    start: int  # pages, [start, end)
    end: int
    purged: bool = False


@dataclass(frozen=True)
class Model:
    """What the contract says the state is (counters relative to the example's start)."""

    units: tuple[Unit, ...] = tuple(Unit(s, e) for s, e in BASELINE_UNITS)
    purged: frozenset[int] = frozenset()
    xattrs: tuple[tuple[str, tuple[tuple[bytes, bytes], ...]], ...] = tuple(
        (t, ()) for t in XATTR_HOLDERS
    )
    events: int = 0
    purged_pages_total: int = 0

    def stored(self, target: str) -> dict[bytes, bytes]:
        return dict(dict(self.xattrs)[holder(target)])

    def with_xattrs(self, target: str, values: dict[bytes, bytes]) -> Model:
        table = dict(self.xattrs)
        table[holder(target)] = tuple(sorted(values.items()))
        return dataclasses.replace(self, xattrs=tuple(sorted(table.items())))

    def mark(self, pages: tuple[int, int] | None) -> Model:
        """Contract: one new unit; units overlapping it merge into it; adjacent ones do not."""
        if pages is None:
            return self
        start, end = pages
        keep: list[Unit] = []
        merged = [Unit(start, end)]
        for u in self.units:
            (merged if u.start < end and start < u.end else keep).append(u)
        new = Unit(min(u.start for u in merged), max(u.end for u in merged))
        return dataclasses.replace(self, units=tuple(sorted([*keep, new], key=_start)))

    def unmark(self, pages: tuple[int, int] | None) -> Model:
        """Contract: every page touching the range leaves its unit; the pieces stay units."""
        if pages is None:
            return self
        start, end = pages
        out = []
        for u in self.units:
            if u.start < start:
                out.append(dataclasses.replace(u, end=min(u.end, start)))
            if u.end > end:
                out.append(dataclasses.replace(u, start=max(u.start, end)))
        return dataclasses.replace(self, units=tuple(sorted(out, key=_start)))

    def resident(self) -> frozenset[int]:
        return DATA_PAGES - self.purged

    def purge_all(self) -> Model:
        """Contract: every unit not yet purged is purged whole; holes stay holes."""
        live = [u for u in self.units if not u.purged]
        gone = {p for u in live for p in range(u.start, u.end)} & self.resident()
        return dataclasses.replace(
            self,
            units=tuple(dataclasses.replace(u, purged=True) for u in self.units),
            purged=self.purged | gone,
            events=self.events + len(live),
            purged_pages_total=self.purged_pages_total + len(gone),
        )

    def volatile_reply(self) -> bytes:
        """One ``OFFSET,LENGTH`` line per unit, clipped to the size (contract)."""
        return b"".join(
            b"%d,%d\n" % (u.start * PAGE, min(u.end * PAGE, FILE_SIZE) - u.start * PAGE)
            for u in self.units
        )

    def purged_reply(self) -> bytes:
        return b"".join(b"%d,%d\n" % r for r in page_runs_as_bytes(self.purged))

    def volatile_resident_pages(self) -> int:
        live = {p for u in self.units if not u.purged for p in range(u.start, u.end)}
        return len(live & self.resident())


def _start(u: Unit) -> int:
    return u.start


def page_runs_as_bytes(pages: frozenset[int]) -> list[tuple[int, int]]:
    """Runs of consecutive pages as (offset, length) in bytes, clipped to the file size."""
    runs: list[tuple[int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return [(p * PAGE, min((p + n) * PAGE, FILE_SIZE) - p * PAGE) for p, n in runs]


def holder(target: str) -> str:
    """Whose xattrs a call on *target* reaches (a followed symlink reaches the file)."""
    return FILE if target == VIA_SYMLINK else target


# -- rounding, straight from the contract ---------------------------------------------------
def clip(offset: int, length: int) -> tuple[int, bool]:
    """(end of the range clipped to the size, whether it reaches the end of the file)."""
    reaches = length == 0 or offset + length >= FILE_SIZE
    return (FILE_SIZE if reaches else offset + length), reaches


def volatile_pages(offset: int, length: int) -> tuple[int, int] | None:
    """Pages wholly inside (round inward); the end-of-file page is whole if reached."""
    end, reaches = clip(offset, length)
    if offset >= end:
        return None
    first = -(-offset // PAGE)
    last = -(-end // PAGE) if reaches else end // PAGE
    return (first, last) if first < last else None


def nonvolatile_pages(offset: int, length: int) -> tuple[int, int] | None:
    """Pages touching the range (round outward)."""
    end, _ = clip(offset, length)
    return (offset // PAGE, -(-end // PAGE)) if offset < end else None


# -- values, as the contract reads them -----------------------------------------------------
SUFFIX = {b"": 1, b"k": 1 << 10, b"m": 1 << 20, b"g": 1 << 30, b"t": 1 << 40}
# The contract: "OFFSET,LENGTH in decimal bytes (K/M/G suffixes accepted)".
STRICT = re.compile(rb"(0|[1-9][0-9]*)([KMG]?),(0|[1-9][0-9]*)([KMG]?)")
# Readings the contract neither promises nor forbids: leading zeros, lower-case or T
# suffixes, "KiB", one trailing newline (echo-style). Each may be accepted or refused.
LENIENT = re.compile(
    rb"([0-9]+)((?:[KMGTkmgt](?:[Ii][Bb])?)?),([0-9]+)((?:[KMGTkmgt](?:[Ii][Bb])?)?)\n?"
)


def number(digits: bytes, suffix: bytes) -> int:
    return int(digits) * SUFFIX[suffix[:1].lower()]


@dataclass(frozen=True)
class RangeValue:
    """How the contract judges a range value."""

    errors: frozenset[int]  # the errnos a refusal may carry
    parsed: tuple[int, int] | None  # (offset, length) if it may be accepted
    must_accept: bool


def judge_range(value: bytes) -> RangeValue:
    strict = STRICT.fullmatch(value)
    lenient = strict or LENIENT.fullmatch(value)
    if lenient is None:
        # Garbage, signs, whitespace, NUL bytes, hex, extra fields: EINVAL.
        return RangeValue(frozenset({errno.EINVAL}), None, False)
    if len(lenient[1]) > 40 or len(lenient[3]) > 40:  # keep int() cheap; far past 2**63
        offset = length = MAX_OFFSET + 1
    else:
        offset, length = number(lenient[1], lenient[2]), number(lenient[3], lenient[4])
    too_big = offset > MAX_OFFSET or length > MAX_OFFSET or offset + length > MAX_OFFSET
    if strict is not None:
        # Well-formed: overflow past 2**63 - 1 is ERANGE (the contract's "overflow"), else
        # it must work.
        if too_big:
            return RangeValue(frozenset({errno.ERANGE}), None, False)
        return RangeValue(frozenset(), (offset, length), True)
    # A lenient-only reading: refusing it with EINVAL (not the grammar) or ERANGE is fine;
    # accepting it must mean exactly the numbers written, and never past 2**63 - 1.
    refusals = frozenset({errno.EINVAL, errno.ERANGE})
    return RangeValue(refusals, None if too_big else (offset, length), False)


# -- expectations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    op: str
    target: str
    name: bytes
    value: bytes = b""
    flags: int = 0

    def __repr__(self) -> str:
        text = f"{self.op} {self.target} {self.name!r}"
        if self.op == "set":
            value = self.value if len(self.value) <= 40 else self.value[:40] + b"..."
            text += f" = {value!r} ({len(self.value)} bytes), flags {self.flags}"
        return f"Call({text})"

    def short(self) -> str:
        """A test id: op, target, name and value lengths."""
        name = self.name.decode(errors="replace")
        if len(name) > 30:
            name = f"{name[:20]}...({len(self.name)})"
        return f"{self.op}-{self.target}-{name}-{len(self.value)}B-f{self.flags}"


@dataclass(frozen=True)
class Expect:
    """The allowed outcomes of one call."""

    errors: frozenset[int] = frozenset()
    after: Model | None = None  # the state after a success; None: success is wrong
    reply: bytes | None = None  # getxattr: the exact value, where the contract fixes it


def fail(*errnos: int) -> Expect:
    return Expect(frozenset(errnos))


def expect(call: Call, model: Model) -> Expect:
    """What the contract (and the kernel's VFS in front of the daemon) allows for *call*."""
    name, target = call.name, call.target
    if call.op == "list":
        # listxattr reaches the daemon for every kind of inode; the virtual names are never
        # listed, so it shows exactly the stored ordinary names.
        return Expect(after=model, reply=b"\0".join(sorted(model.stored(target))))
    # The VFS copies the name first: longer than XATTR_NAME_MAX is ERANGE, before anything.
    if len(name) > NAME_MAX:
        return fail(errno.ERANGE)
    if call.op == "set" and len(call.value) > SIZE_MAX:
        return fail(errno.E2BIG)  # the VFS again: values are at most 64 KiB
    if target in (SYMLINK, FIFO) and name.startswith(b"user."):
        # xattr_permission(): user.* exists only on regular files and directories; writing
        # one elsewhere is EPERM, reading one ENODATA. The daemon never sees the call.
        return fail(errno.EPERM if call.op in ("set", "remove") else errno.ENODATA)
    if not name.startswith(NAMESPACES):
        # tmpfs-like: unknown namespaces are not supported (EOPNOTSUPP is ENOTSUP on Linux)
        return fail(errno.EOPNOTSUPP)
    if call.op == "get":
        return expect_get(call, model)
    if call.op == "remove":
        if name.startswith(PREFIX):
            return fail(errno.ENODATA)  # virtual names cannot be removed, and are not stored
        stored = model.stored(target)
        if name not in stored:
            return fail(errno.ENODATA)
        del stored[name]
        return Expect(after=model.with_xattrs(target, stored))
    return expect_set(call, model)


def expect_get(call: Call, model: Model) -> Expect:
    name, target = call.name, call.target
    is_dir = target in (DIR, ROOT)
    if name.startswith(PREFIX):
        if name in RANGE_NAMES and is_dir:
            return fail(errno.EISDIR)  # "The range names on a directory answer EISDIR."
        if name == VOLATILE_B:
            return Expect(after=model, reply=model.volatile_reply())
        if name == PURGED_B:
            return Expect(after=model, reply=model.purged_reply())
        if name == STATS_B and target == ROOT:
            return Expect(after=model)  # checked by the snapshot that follows
        # stats elsewhere, purge, nonvolatile on a file, unknown names: ENODATA.
        return fail(errno.ENODATA)
    stored = model.stored(target)
    if name in stored:
        return Expect(after=model, reply=stored[name])
    return fail(errno.ENODATA)


def expect_set(call: Call, model: Model) -> Expect:
    name, target = call.name, call.target
    # pyfuse3 implements XATTR_CREATE / XATTR_REPLACE by calling getxattr first: CREATE fails
    # with EEXIST where getxattr would answer, REPLACE with getxattr's error where it would
    # not, and any other getxattr error comes out as it is.
    if call.flags:
        probe = expect_get(dataclasses.replace(call, op="get"), model)
        if call.flags & os.XATTR_CREATE:
            if probe.after is not None:
                return fail(errno.EEXIST)
            if probe.errors != {errno.ENODATA}:
                return probe
        elif probe.after is None:
            return probe
    if not name.startswith(PREFIX):
        stored = model.stored(target)
        stored[name] = call.value
        return Expect(after=model.with_xattrs(target, stored))
    is_dir = target in (DIR, ROOT)
    if name in RANGE_NAMES and is_dir:
        return fail(errno.EISDIR)
    if name == PURGE_B:
        if target != ROOT:
            return fail(errno.EINVAL)  # "purge exists only on the mount root"
        if call.value == b"all":
            return Expect(after=model.purge_all())
        if call.value == b"all\n":  # echo-style: the contract does not say
            return Expect(frozenset({errno.EINVAL}), model.purge_all())
        return fail(errno.EINVAL)
    if name not in (VOLATILE_B, NONVOLATILE_B):
        return fail(errno.EINVAL)  # unknown, or read-only (purged, stats): EINVAL
    judged = judge_range(call.value)
    if judged.parsed is None:
        return Expect(judged.errors)
    offset, length = judged.parsed
    if name == VOLATILE_B:
        after = model.mark(volatile_pages(offset, length))
    else:
        after = model.unmark(nonvolatile_pages(offset, length))
    return Expect(judged.errors if not judged.must_accept else frozenset(), after)


# -- the real state -------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    volatile: bytes
    purged: bytes
    content: str  # sha256, or the errno name of a failing read
    size: int
    blocks: int
    xattrs: tuple[tuple[str, tuple[tuple[bytes, bytes], ...]], ...]
    pid: int
    resident_bytes: int
    volatile_bytes: int
    purge_events: int
    purged_bytes_total: int


CONTENT = bytearray(pattern(FILE_PAGES - 1, seed=7, tail=123))
CONTENT[HOLE * PAGE : (HOLE + 1) * PAGE] = bytes(PAGE)
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


@dataclass(frozen=True)
class Place:
    """The targets on the mount."""

    mount: Mount
    paths: dict[str, Path]

    @property
    def file(self) -> Path:
        return self.paths[FILE]

    def stats(self) -> dict[str, int]:
        return int_stats(read_stats(self.mount.path))

    def snapshot(self) -> Snapshot:
        f = self.file
        try:
            content = hashlib.sha256(f.read_bytes()).hexdigest()
        except OSError as e:
            content = errno.errorcode.get(e.errno or 0, str(e.errno))
        st = f.stat()
        xattrs = []
        for t in XATTR_HOLDERS:
            path = self.paths[t]
            names = sorted(os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False))
            pairs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
            xattrs.append((t, pairs))
        s = self.stats()
        return Snapshot(
            volatile=os.getxattr(f, VOLATILE),
            purged=os.getxattr(f, PURGED),
            content=content,
            size=st.st_size,
            blocks=st.st_blocks,
            xattrs=tuple(xattrs),
            pid=s["pid"],
            resident_bytes=s["resident_bytes"],
            volatile_bytes=s["volatile_bytes"],
            purge_events=s["purge_events"],
            purged_bytes_total=s["purged_bytes_total"],
        )

    def reset(self) -> Snapshot:
        """Back to the baseline; returns its snapshot (the counters are cumulative)."""
        for t in XATTR_HOLDERS:
            for n in os.listxattr(self.paths[t], follow_symlinks=False):
                os.removexattr(self.paths[t], n, follow_symlinks=False)
        with open(self.file, "r+b") as fh:
            fh.truncate(0)  # drops every unit and purged page
            fh.write(CONTENT[: HOLE * PAGE])
            fh.seek((HOLE + 1) * PAGE)
            fh.write(CONTENT[(HOLE + 1) * PAGE :])
        for start, end in BASELINE_UNITS:
            length = 0 if end == FILE_PAGES else (end - start) * PAGE
            os.setxattr(self.file, VOLATILE, b"%d,%d" % (start * PAGE, length))
        return self.snapshot()

    def call(self, call: Call) -> tuple[int, bytes | None]:
        """Perform *call*: (errno or 0, the reply of get/list)."""
        path = self.paths[call.target]
        follow = call.target != SYMLINK
        try:
            if call.op == "set":
                os.setxattr(path, call.name, call.value, call.flags, follow_symlinks=follow)
            elif call.op == "get":
                return 0, os.getxattr(path, call.name, follow_symlinks=follow)
            elif call.op == "remove":
                os.removexattr(path, call.name, follow_symlinks=follow)
            else:
                names = os.listxattr(path, follow_symlinks=follow)
                return 0, b"\0".join(sorted(os.fsencode(n) for n in names))
        except OSError as e:
            return e.errno or -1, None
        return 0, None


def render(model: Model, base: Snapshot) -> Snapshot:
    """The snapshot the contract predicts for *model*, counters on top of *base*'s."""
    resident = model.resident()
    return Snapshot(
        volatile=model.volatile_reply(),
        purged=model.purged_reply(),
        content=CONTENT_SHA if not model.purged else "EIO",
        size=FILE_SIZE,
        blocks=len(resident) * (PAGE // 512),
        xattrs=model.xattrs,
        pid=base.pid,
        resident_bytes=base.resident_bytes - (len(DATA_PAGES) - len(resident)) * PAGE,
        volatile_bytes=model.volatile_resident_pages() * PAGE,
        purge_events=base.purge_events + model.events,
        purged_bytes_total=base.purged_bytes_total + model.purged_pages_total * PAGE,
    )


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Place]:
    for mount in module_mount(tmp_path_factory, "64M"):
        d = new_dir(mount)
        paths = {
            FILE: d / "file",
            DIR: d / "dir",
            ROOT: mount.path,
            SYMLINK: d / "link",
            VIA_SYMLINK: d / "link",
            FIFO: d / "fifo",
        }
        paths[FILE].write_bytes(b"")
        paths[DIR].mkdir()
        paths[SYMLINK].symlink_to("file")
        os.mkfifo(paths[FIFO])
        yield Place(mount, paths)


# -- strategies -----------------------------------------------------------------------------
def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of *choices*, each (weight, strategy) drawn in proportion to its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda strategy: strategy)


EXACT_NAMES = [VOLATILE_B, NONVOLATILE_B, PURGED_B, STATS_B, PURGE_B]
NEAR_MISSES = [
    b"user.vrange.volatile ",
    b"user.vrange.volatile\n",
    b"user.vrange.Volatile",
    b"user.vrange.VOLATILE",
    b"user.vrange.nonvolatile\t",
    b"user.vrange.non-volatile",
    b"user.vrange.volatil",
    b"user.vrange.volatile.x",
    b"user.vrange..volatile",
    b"user.vrange. volatile",
    b"user.vrange.purge\xff",
    b"user.vrange.stats/",
    b"user.vrange.",
    b"user.vrange.fault",
    # outside the prefix: ordinary xattrs (stored) or unknown namespaces
    b"user.vrange",
    b"user.vrangevolatile",
    b"user.Vrange.volatile",
    b"user..vrange.volatile",
    b"user.vrange_volatile",
    b"User.vrange.volatile",
    b"vrange.volatile",
    b"trusted.vrange.volatile",
]
odd_bytes = st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\0", b"\x01"))
long_suffix = st.integers(NAME_MAX - len(PREFIX) - 3, NAME_MAX - len(PREFIX) + 3).flatmap(
    lambda n: st.sampled_from([b"a", b"\xff", b"volatile"]).map(lambda c: (c * n)[:n])
)
names = weighted(
    (12, st.sampled_from(EXACT_NAMES)),
    (4, st.sampled_from(NEAR_MISSES)),
    (2, odd_bytes.map(lambda b: PREFIX + b)),
    (
        1,
        st.text(min_size=1, max_size=20).map(
            lambda s: PREFIX + s.encode("utf-8", "surrogatepass").replace(b"\0", b"?")
        ),
    ),
    (1, long_suffix.map(lambda b: PREFIX + b)),
    (1, st.sampled_from(EXACT_NAMES).map(lambda n: n + b"x" * (NAME_MAX + 1 - len(n)))),
)

magnitudes = weighted(
    (4, st.integers(0, FILE_PAGES + 2).map(lambda p: p * PAGE)),  # whole pages: adjacency
    (
        1,
        st.tuples(st.integers(0, FILE_PAGES + 2), st.sampled_from([-1, 1])).map(
            lambda t: max(t[0] * PAGE + t[1], 0)
        ),
    ),
    (3, st.integers(0, FILE_SIZE + 2 * PAGE)),
    (4, st.sampled_from([0, 1, PAGE - 1, PAGE, PAGE + 1, FILE_SIZE - 1, FILE_SIZE])),
    (1, st.integers(0, 2**64)),
    (1, st.sampled_from([MAX_OFFSET, MAX_OFFSET + 1, 2**63, 2**64, 2**53 + 1])),
)
suffixes = weighted(
    (12, st.just("")),
    (3, st.sampled_from(["K", "M", "G"])),
    (1, st.sampled_from(["T", "k", "m", "KiB", "kib", "gIB"])),
    (1, st.sampled_from(["KB", "B", "e3", "KK", "Ki", " K"])),
)
BENDS = {
    "neg": "-{o},{n}",
    "neg length": "{o},-{n}",
    "space": "{o}, {n}",
    "leading space": " {o},{n}",
    "newline": "{o},{n}\n",
    "2 newlines": "{o},{n}\n\n",
    "crlf": "{o},{n}\r\n",
    "nul": "{o},{n}\0",
    "nul inside": "{o}\0,{n}",
    "zeros": "00{o},0{n}",
    "extra field": "{o},{n},0",
    "trailing comma": "{o},{n},",
    "no length": "{o},",
    "no offset": ",{n}",
    "one number": "{o}",
    "hex": "0x{o},{n}",
    "plus": "+{o},{n}",
    "dot": "{o}.0,{n}",
    "tab": "\t{o},{n}",
    "semicolon": "{o};{n}",
}


@st.composite
def range_values(draw: st.DrawFn) -> bytes:
    """Ranges, mostly well-formed, the rest bent a little (see BENDS)."""
    off = f"{draw(magnitudes)}{draw(suffixes)}"
    length = f"{draw(magnitudes)}{draw(suffixes)}"
    shape = draw(weighted((3, st.just("{o},{n}")), (1, st.sampled_from(sorted(BENDS.values())))))
    return shape.format(o=off, n=length).encode()


big_values = st.tuples(
    st.binary(min_size=1, max_size=8),
    weighted((2, st.integers(1, SIZE_MAX + 64)), (1, st.sampled_from([SIZE_MAX, SIZE_MAX + 1]))),
).map(lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]])
purge_values = st.sampled_from(
    [b"all", b"all\n", b"ALL", b" all", b"all\0", b"all\n\n", b"", b"0,0", b"al", b"all all"]
)
any_values = weighted(
    (2, range_values()),
    (2, st.binary(max_size=64)),
    (1, purge_values),
    (1, st.integers(20, 5000).map(lambda n: b"9" * n + b",0")),
    (1, st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass"))),
    (1, big_values),
)
flags = st.sampled_from([0, 0, 0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])


@st.composite
def calls(draw: st.DrawFn) -> Call:
    """A call; the values drawn mostly fit the name (ranges for the range names...)."""
    op = draw(
        weighted(
            (5, st.just("set")), (2, st.just("get")), (1, st.just("remove")), (1, st.just("list"))
        )
    )
    target = draw(weighted((4, st.just(FILE)), (3, st.just(ROOT)), (1, st.sampled_from(TARGETS))))
    name = draw(names)
    if op != "set":
        return Call(op, target, name)
    if name in (VOLATILE_B, NONVOLATILE_B):
        value = draw(weighted((4, range_values()), (1, any_values)))
    elif name == PURGE_B:
        value = draw(weighted((2, purge_values), (1, any_values)))
    else:
        value = draw(any_values)
    return Call(op, target, name, value, draw(flags))


# -- the properties -------------------------------------------------------------------------
def check_call(place: Place, call: Call, model: Model, base: Snapshot) -> Model:
    """Run *call* and check it against the contract; returns the new model."""
    before = place.snapshot()
    assert before == render(model, base), f"state drifted from the model before {call!r}"
    want = expect(call, model)
    got, reply = place.call(call)
    event(f"{call.op} on {call.target}: {errno.errorcode.get(got, 'success')}")
    after = place.snapshot()
    assert after.pid == base.pid, "the daemon changed (died and came back?)"
    if got:
        assert got in want.errors, (
            f"{call!r} failed with {errno.errorcode.get(got, got)}; the contract allows "
            f"{sorted(errno.errorcode[e] for e in want.errors)}"
            + (" or success" if want.after is not None else "")
        )
        assert after == before, f"{call!r} failed but changed the state"
        return model
    assert want.after is not None, (
        f"{call!r} succeeded; the contract wants {sorted(errno.errorcode[e] for e in want.errors)}"
    )
    if want.reply is not None:
        assert reply == want.reply, f"{call!r} answered {reply!r}, not {want.reply!r}"
    if call.op == "get" and call.name == STATS_B:
        assert reply is not None and b"pid=%d\n" % base.pid in reply
    assert after == render(want.after, base), f"{call!r} did not have the contract's effect"
    return want.after


@settings(
    max_examples=220,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sequence=st.lists(calls(), min_size=1, max_size=4))
def test_every_call_is_answered_as_the_contract_says(place: Place, sequence: list[Call]) -> None:
    base = place.reset()
    assert base == render(Model(), base)
    model = Model()
    for call in sequence:
        model = check_call(place, call, model, base)
    assert os.path.ismount(place.mount.path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from([VOLATILE_B, NONVOLATILE_B]),
    value=st.one_of(range_values(), st.binary(max_size=32)),
)
def test_range_values_on_the_file(place: Place, name: bytes, value: bytes) -> None:
    """Range values alone, many more of them, on the one target where they can work."""
    base = place.reset()
    check_call(place, Call("set", FILE, name, value), Model(), base)


# -- boundaries hypothesis may not hit ------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "expected"),
    [
        # name length: 255 bytes reach the daemon, 256 are refused by the VFS
        (Call("set", FILE, PREFIX + b"v" * (NAME_MAX - len(PREFIX)), b"0,0"), errno.EINVAL),
        (Call("set", FILE, PREFIX + b"v" * (NAME_MAX + 1 - len(PREFIX)), b"0,0"), errno.ERANGE),
        (Call("get", ROOT, PREFIX + b"v" * (NAME_MAX + 1 - len(PREFIX))), errno.ERANGE),
        (Call("remove", DIR, PREFIX + b"v" * (NAME_MAX + 1 - len(PREFIX))), errno.ERANGE),
        # value size: 65,536 bytes reach the daemon, 65,537 are refused by the VFS
        (Call("set", FILE, VOLATILE_B, b"0" * SIZE_MAX), errno.EINVAL),
        (Call("set", FILE, VOLATILE_B, b"0" * (SIZE_MAX + 1)), errno.E2BIG),
        (Call("set", ROOT, PURGE_B, b"all" + b"\0" * (SIZE_MAX - 3)), errno.EINVAL),
        (Call("set", ROOT, PURGE_B, b"all" + b"\0" * (SIZE_MAX - 2)), errno.E2BIG),
        # the kernel's order: name length, then value size, then the inode type
        (Call("set", SYMLINK, VOLATILE_B, b"0" * (SIZE_MAX + 1)), errno.E2BIG),
        (Call("set", FIFO, PREFIX + b"v" * NAME_MAX, b"0,0"), errno.ERANGE),
        # a directory answers EISDIR before the value is even read
        (Call("set", DIR, VOLATILE_B, b"garbage"), errno.EISDIR),
        (Call("set", ROOT, NONVOLATILE_B, b"-1,0"), errno.EISDIR),
        (Call("set", DIR, PURGED_B, b"0,0"), errno.EISDIR),
        (Call("get", ROOT, NONVOLATILE_B), errno.EISDIR),
        # XATTR_CREATE on a name getxattr answers; XATTR_REPLACE on one it does not
        (Call("set", FILE, VOLATILE_B, b"0,0", os.XATTR_CREATE), errno.EEXIST),
        (Call("set", FILE, NONVOLATILE_B, b"0,0", os.XATTR_REPLACE), errno.ENODATA),
        (Call("set", ROOT, STATS_B, b"x", os.XATTR_CREATE), errno.EEXIST),
    ],
    ids=lambda v: v.short() if isinstance(v, Call) else errno.errorcode[v],
)
def test_boundaries(place: Place, call: Call, expected: int) -> None:
    base = place.reset()
    assert expect(call, Model()).errors == {expected}, "the oracle disagrees with this table"
    before = place.snapshot()
    got, _ = place.call(call)
    assert got == expected, errno.errorcode.get(got, got)
    assert place.snapshot() == before == render(Model(), base)


def test_largest_values_work_where_they_are_valid(place: Place) -> None:
    """A 64 KiB ordinary value is stored whole; the daemon still serves marks after."""
    base = place.reset()
    big = bytes(range(256)) * (SIZE_MAX // 256)
    os.setxattr(place.file, b"user.vrange", big)  # a near miss: an ordinary xattr
    assert os.getxattr(place.file, b"user.vrange") == big
    assert os.listxattr(place.file) == ["user.vrange"]
    os.setxattr(place.file, VOLATILE, b"0,0")
    assert place.snapshot().volatile == b"0,%d\n" % FILE_SIZE
    assert errno_of(os.removexattr, place.file, VOLATILE) == errno.ENODATA
    os.removexattr(place.file, b"user.vrange")
    assert place.snapshot().pid == base.pid
    assert is_mounted(place.mount.path)
