"""Concurrent stress test of a vrangefs mount against an exact model of what must survive.

Usage::

    python tools/stress.py MOUNTPOINT [--procs 8] [--seconds 600] [--seed S] [--files 16]
    python tools/stress.py --mount-fresh [--memory-cap 64M] [--procs 8] [--seconds 600] ...
    python tools/stress.py --mount-fresh --mount-args '--min-free 99%' ...  # pressure purges
    python tools/stress.py --mount-fresh --memory-cap 16M --mix hostile --seconds 120

``--mount-fresh`` mounts a vrangefs of its own in a temporary directory (``vrangefs mount``
with ``--memory-cap``) and always unmounts it, on success, failure or Ctrl-C; its daemon log
is checked for errors. Otherwise the run works in a new directory ``stress-PID`` under
MOUNTPOINT and removes it at the end. The seed is printed first; ``--seed`` repeats a run's
choices (not its timing: the processes race each other for real). ``--json FILE`` writes the
summary as JSON as well. The summary ends with the daemon's RSS and open descriptors at the
start and at the end (once the run's files are freed), for spotting leaks over long runs, and its
peak RSS, which must stay within memory cap + metadata cap + 64 MiB (an unexpected error
otherwise). Exit status: 0 if no corruption and no unexpected error, 1 otherwise, 2 for bad
arguments.

What it does. ``--procs`` worker processes run for ``--seconds`` seconds. Each worker *owns*
its own directory and the files in it (``--files`` is the total, shared out among the owners):
only the owner creates, writes (``pwrite`` and ``mmap`` stores), truncates, renames, unlinks
and marks ranges of them volatile or non-volatile. Every worker also reads everybody's files
(``pread`` and ``mmap`` loads in a forked child, which may die of SIGBUS), purges everything
(``user.vrange.purge``), and reads the statistics. Purges -- explicit, by the memory cap when
writes need room, by memory pressure -- are the only thing that changes a file behind its
owner's back, and they touch only volatile pages. So each owner keeps an *exact* model of its
files, page by page:

- the expected bytes, and for each page: resident (written) or a hole, volatile or not, known
  to be purged, or unknown (a partial write into a page that may have been purged: the
  filesystem zero-fills a purged page's unwritten bytes);
- a page that is non-volatile and not purged is *guaranteed*: reading it must give exactly the
  expected bytes, never EIO; a known purged page must read EIO (SIGBUS through mmap) until it
  is written; a volatile resident page may give either, but never other bytes;
- marking non-volatile and then reading ``user.vrange.purged`` (race-free by the contract)
  settles the volatile pages of the range: listed ones are purged, the others intact. A
  listed page that the model holds guaranteed is lost data; a known purged page no longer
  listed was revived without a write. ``user.vrange.volatile`` must list exactly the model's
  volatile pages.

File content is self-describing: every 64-byte block is a 16-byte header (magic, file id,
block index, write generation) repeated four times; holes and zero-filled tails are zeros.
Writes, truncates and marks use multiples of 64 bytes, biased to page and 1 MiB boundaries.
Readers of *other* owners' files cannot know the model; they check that every block they
get is zeros or a block of that very file (its id is the ``user.stress.fid`` xattr, read from
the same descriptor) at that very position. A block that fails is re-read: a read racing the
owner's write may legitimately see a page half old, half new (that is counted as ``torn``);
a block that still fails is corruption.

The hostile mix (``--mix hostile``, or any of ``--waiters``, ``--readers``, ``--victims``,
``--watchdog``) adds, next to the workers, what once deadlocked the whole mount: ``--waiters``
processes (200 in the preset) that loop ``getxattr user.vrange.purged`` on files being purged,
``--readers`` processes (4) that re-read whole files, dropping their cached pages with
``posix_fadvise(DONTNEED)`` between passes, and ``--victims`` processes (1) that each rewrite a
file of their own (4 MiB at most, a quarter of the cap), read it, mark it volatile and purge it,
over and over: by purge-all every second cycle, by writing volatile filler past the cap
otherwise. A victim keeps an exact model of its file: after purge-all has returned, every page
must be listed in ``user.vrange.purged`` and fail with EIO (old bytes from the kernel's cache
are corruption); after a mark non-volatile, listed pages must fail and the others read exactly
what was written, and the file, one unit, is purged whole or not at all. Half of the waiters'
picks go to a victim (the readers': 80 %; a read in flight is what a purge's invalidation waits
for), a quarter to the "hot" file of the owners' files (the same file in every process; it
changes every 2 s), the rest to any file. They learn the owners' file names from one thread of
the tool that lists the directories twice a second (the kernel serializes READDIR and LOOKUP in
a directory: a listing storm would slow the owners more than the mount). They stop when
``--seconds`` are up; the owners then settle their files (the final check) without them. Run as
root on a mount with ``allow_other`` (``--mount-fresh`` adds ``-o allow_other`` for the hostile
mix), every second one of them runs as ``--second-user`` (65534). Readers check what they read
as foreign readers do; waiters check that the list is well formed; the owners' models must hold
as always. A watchdog thread probes ``getxattr user.vrange.stats`` on the mount root every
``--probe-every`` seconds: a probe that gets no answer within ``--watchdog`` seconds (15) fails
the run. The tool then shows the daemon's threads (their state, and the kernel stacks of blocked
ones; SIGUSR1 makes the daemon log its Python stacks), aborts the FUSE connection through
``/sys/fs/fuse/connections/N/abort`` (N: the mount's minor device number; all data on the mount
is lost) so that nothing stays blocked, and exits 1. The probe latencies (median, p99, max) are
reported at the end. Whatever the tool starts ends with it: children are killed on the way out
(and die with the tool through PR_SET_PDEATHSIG); children that cannot be killed because the
mount stopped answering are freed by the same abort.

Counted and printed at the end: operations by kind, errors by operation and errno (expected
ones: ENOSPC on writes, EIO and SIGBUS where a page may be purged, ENOENT for a file its
owner just renamed or removed), corruptions (must be 0), unexpected errors, the daemon's RSS
and the mount's statistics. Each corruption is reported with its worker's last operations.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import faulthandler
import json
import mmap
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, ClassVar

from vrangefs import mountinfo, protocol

PAGE = 4096
BLOCK = 64
CHUNK = 1 << 20
MAGIC = b"VRS1"
HEADER = struct.Struct("<4sIII")  # magic, file id, block index, generation
ZERO_HEADER = bytes(HEADER.size)
READ_MAX = 256 * 1024

FID_XATTR = "user.stress.fid"
VOLATILE = "user.vrange.volatile"
NONVOLATILE = "user.vrange.nonvolatile"
PURGED = "user.vrange.purged"
STATS = "user.vrange.stats"
PURGE = "user.vrange.purge"

MOUNT_TIMEOUT = 60.0
HANG_SECONDS = 120.0
RSS_SLACK = 64 << 20  # the daemon may hold this much beyond its memory and metadata caps
PR_SET_PDEATHSIG = 1
HOT_PERIOD = 2.0  # seconds a hot file stays hot for the hostile mix
VICTIM_SHARE = {"waiter": 0.5, "reader": 0.8}  # the share of picks that go to a victim
HOT_SHARE = 0.25  # ... and to the hot file of the owners' files
VICTIM_FID = 0xFF000000  # file ids of victims (owners' ids are index << 24 | n)
VICTIM_MAX = 4 << 20  # a victim's size, at most a quarter of the cap
STOP_GRACE = 10.0  # seconds children get to stop before they are killed
LIST_EVERY = 0.5  # seconds between listings of the owners' directories for the hostile mix
_LOG_PROBLEM = re.compile(r" (ERROR|CRITICAL): |Traceback \(most recent call last\)")

# Weights of the operations a worker picks from.
OPS: dict[str, float] = {
    "create": 3,
    "write": 22,
    "read": 12,
    "truncate": 3,
    "rename": 3,
    "unlink": 1,
    "reopen": 2,
    "volatile": 12,
    "nonvolatile": 10,
    "purged": 4,
    "volatile_list": 3,
    "mmap_write": 4,
    "mmap_read": 4,
    "foreign_read": 14,
    "foreign_mmap": 4,
    "regenerate": 10,
    "purge_all": 0.05,
    "stats": 1,
}


# -- content ----------------------------------------------------------------------------
def _writeback_shaped(off: int, length: int) -> bool:
    """A WRITE the daemon cannot tell from writeback of a mapped page: at most one page,
    page-aligned (see vrangefs.operations.Operations.write)."""
    return off % PAGE == 0 and length <= PAGE


def pattern(fid: int, gen: int, off: int, length: int) -> bytes:
    """The bytes a write of generation *gen* puts at [off, off + length) of file *fid*.

    *off* and *length* are multiples of BLOCK: each block is its header four times.
    """
    first = off // BLOCK
    pack = HEADER.pack
    return b"".join([pack(MAGIC, fid, i, gen) * 4 for i in range(first, first + length // BLOCK)])


def describe_block(block: bytes) -> str:
    """What a block holds, for reports: zeros, a block of (file, index, generation), garbage."""
    if not any(block):
        return "zeros"
    header = block[: HEADER.size]
    if len(header) == HEADER.size and header[:4] == MAGIC:
        _, fid, index, gen = HEADER.unpack(header)
        whole = block == (header * 4)[: len(block)]
        return f"fid={fid:#x} block={index} gen={gen}" + ("" if whole else " (torn block)")
    return f"garbage {block[:16].hex()}..."


def bad_block(buf: bytes, off: int, fid: int) -> int | None:
    """The offset of the first block of *buf* (read at *off*) that is not zeros or a block
    of file *fid* at its own position; None if every block is fine.

    *off* is a multiple of BLOCK; a final partial block is checked as far as it goes.
    """
    n = len(buf)
    headers = [buf[i : i + HEADER.size] for i in range(0, n, BLOCK)]
    expected = b"".join([h * 4 for h in headers])[:n]
    if expected != buf:
        for i, h in enumerate(headers):
            a = i * BLOCK
            if buf[a : a + BLOCK] != (h * 4)[: len(buf[a : a + BLOCK])]:
                return off + a
    first = off // BLOCK
    for i, h in enumerate(headers):
        if h == ZERO_HEADER or len(h) < HEADER.size:
            if len(h) < HEADER.size and any(h):
                return off + i * BLOCK
            continue
        magic, hfid, index, _ = HEADER.unpack(h)
        if magic != MAGIC or hfid != fid or index != first + i:
            return off + i * BLOCK
    return None


# -- the contract's page arithmetic ----------------------------------------------------------
def pages_spanned(size: int) -> int:
    return -(-size // PAGE)


def volatile_pages(off: int, length: int, size: int) -> range:
    """Pages a volatile mark covers: clipped to *size*, rounded inward, the page holding the
    end of the file counting as whole when the range reaches it."""
    reaches_eof = length == 0 or off + length >= size
    end = size if reaches_eof else off + length
    if off >= end:
        return range(0)
    first = pages_spanned(off)
    last = pages_spanned(end) if reaches_eof else end // PAGE
    return range(first, max(first, last))


def nonvolatile_pages(off: int, length: int, size: int) -> range:
    """Pages a non-volatile mark covers: clipped to *size*, rounded outward."""
    end = size if length == 0 or off + length >= size else off + length
    if off >= end:
        return range(0)
    return range(off // PAGE, pages_spanned(end))


def parse_ranges(value: bytes) -> list[tuple[int, int]]:
    out = []
    for line in value.decode().splitlines():
        offset, length = line.split(",")
        out.append((int(offset), int(length)))
    return out


def pages_of(ranges: Sequence[tuple[int, int]]) -> set[int]:
    pages: set[int] = set()
    for offset, length in ranges:
        pages.update(range(offset // PAGE, pages_spanned(offset + length)))
    return pages


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Page numbers as runs [first, end)."""
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [(a, b) for a, b in out]


def runs(pages: Iterable[int]) -> str:
    """Page numbers as compact text: ``3-5,9``."""
    return ",".join(str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in page_runs(pages))


# -- mounts -----------------------------------------------------------------------------------
def vrangefs_command() -> list[str]:
    cli = Path(sys.executable).with_name("vrangefs")
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "vrangefs"]


def read_stats(mountpoint: Path) -> dict[str, int]:
    """The integer ``key=value`` lines of the mount's ``user.vrange.stats``."""
    return protocol.int_stats(protocol.read_stats(mountpoint))


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes (empty if it is gone)."""
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def open_descriptors(pid: int) -> int | None:
    """How many descriptors a process has open (None if it is gone or not ours to see)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def daemon_memory(
    pid: int, stats: dict[str, int], rss0: int, fds0: int | None
) -> dict[str, int | None]:
    """The daemon's RSS and descriptors now against the run's start, its peak RSS and the
    bound the contract sets on it: memory cap + metadata cap + 64 MiB."""
    memory = process_memory(pid)
    return {
        "rss_start": rss0,
        "rss_end": memory.get("VmRSS"),
        "rss_peak": memory.get("VmHWM"),
        "rss_limit": stats.get("memory_cap", 0) + stats.get("metadata_cap", 0) + RSS_SLACK,
        "fds_start": fds0,
        "fds_end": open_descriptors(pid),
    }


def _mounted(path: Path) -> bool:
    """Whether *path* is a mount point; the mount is not touched (it may have stopped
    answering)."""
    return mountinfo.is_mounted(path)


def allows_other(path: Path) -> bool:
    """Whether the FUSE mount at *path* was made with ``allow_other``."""
    entry = mountinfo.find(path)
    return entry is not None and "allow_other" in entry.super_options.split(",")


def abort_connection(mountpoint: Path) -> str:
    """Abort the FUSE connection of the mount at *mountpoint*; say what was done.

    The last way out of a mount that stopped answering: every request, pending or new, fails
    with ENOTCONN, processes blocked on it wake up, and the mount's data is lost.
    """
    entry = mountinfo.find(mountpoint)
    if entry is None:
        return f"{mountpoint} is not mounted: no connection to abort"
    minor = entry.fuse_connection
    if minor is None:
        return f"{mountpoint} is {entry.fstype}, not FUSE: not aborted"
    abort = Path(f"/sys/fs/fuse/connections/{minor}/abort")
    try:
        abort.write_text("1")
    except OSError as e:
        return (
            f"could not abort FUSE connection {minor} ({abort}: {e.strerror}); "
            "is fusectl mounted on /sys/fs/fuse/connections?"
        )
    return (
        f"aborted FUSE connection {minor} of {mountpoint} ({abort}): its requests fail with "
        "ENOTCONN and its data is lost"
    )


def thread_report(pid: int) -> list[str]:
    """One line per thread of *pid*: id, name, state, wait channel; the kernel stack of each
    thread in D state (readable by root only)."""
    out = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return [f"process {pid}: {e.strerror}"]
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat = f.read()
            with open(f"{base}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2 :].split()[0]
        out.append(f"thread {tid} ({name}): state {state}, waiting in {wchan or '-'}")
        if state == "D":
            with contextlib.suppress(OSError), open(f"{base}/stack") as f:
                out += ["    " + line.rstrip() for line in f.readlines()[:12]]
    return out


def process_state(pid: int) -> str:
    """The one-letter state of a process ('?' if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def become(uid: int) -> None:
    """Drop to *uid* (its group: the same number), with no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when *parent* dies (set after any change of credentials, which
    clears it), so that nothing the tool started outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def fresh_mount(
    memory_cap: str, extra: Sequence[str] = (), label: str = "vrangefs"
) -> Iterator[Path]:
    """Mount a vrangefs of our own in a temporary directory; always unmount it.

    On the way out the daemon's log is checked: errors in it raise RuntimeError (after the
    unmount), so a run that passed its own checks still fails if the daemon complained.
    """
    base = Path(tempfile.mkdtemp(prefix=f"{label}-"))
    base.chmod(0o755)  # so that a second user can reach the mount (with allow_other)
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    log = base / "daemon.log"
    cmd = [*vrangefs_command(), "mount", str(mountpoint), "--memory-cap", memory_cap]
    result = subprocess.run(
        [*cmd, "--log-file", str(log), *extra],
        capture_output=True,
        text=True,
        timeout=MOUNT_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"vrangefs mount failed: {result.stderr.strip()}")
    print(f"mounted vrangefs at {mountpoint} (--memory-cap {memory_cap} {' '.join(extra)})")
    problem = ""
    try:
        yield mountpoint
    finally:
        pid = None
        with contextlib.suppress(OSError):
            pid = read_stats(mountpoint).get("pid")
        try:
            umount = subprocess.run(
                [*vrangefs_command(), "umount", str(mountpoint)],
                capture_output=True,
                text=True,
                timeout=MOUNT_TIMEOUT,
                check=False,
            )
            why = umount.stderr.strip()
        except subprocess.TimeoutExpired:
            why = f"no answer in {MOUNT_TIMEOUT:.0f} s; {abort_connection(mountpoint)}"
        if _mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            problem += f"vrangefs umount failed ({why}); lazily unmounted\n"
        deadline = time.monotonic() + 15
        while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text(errors="replace") if log.exists() else ""
        if _LOG_PROBLEM.search(text):
            kept = Path(tempfile.mkdtemp(prefix=f"{label}-log-")) / "daemon.log"
            shutil.copy(log, kept)
            problem += f"the daemon logged errors (log kept at {kept}):\n{text[-3000:]}"
        shutil.rmtree(base, ignore_errors=True)
    if problem:
        raise RuntimeError(problem)


# -- forked mmap children ---------------------------------------------------------------------
@dataclass
class ChildResult:
    data: bytes
    signal: int | None  # the signal that killed the child (SIGBUS), if any
    status: int | None  # its exit status otherwise

    @property
    def ok(self) -> bool:
        return self.signal is None and self.status == 0


def in_child(body: Callable[[int], None]) -> ChildResult:
    """Run *body(write_fd)* in a forked child that may die of SIGBUS; collect what it sent.

    Exit status 0: body returned; 3: ValueError (mmap length past the end: raced a
    truncate); 4: OSError; 5: anything else.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 5
        try:
            os.close(r)
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            body(w)
            code = 0
        except ValueError:
            code = 3
        except OSError:
            code = 4
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        piece = os.read(r, 1 << 16)
        if not piece:
            break
        chunks.append(piece)
    os.close(r)
    _, wstatus = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wstatus):
        return ChildResult(b"".join(chunks), os.WTERMSIG(wstatus), None)
    return ChildResult(b"".join(chunks), None, os.WEXITSTATUS(wstatus))


def mmap_load(fd: int, offset: int, length: int) -> ChildResult:
    """Load [offset, offset + length) of *fd* through a shared mapping, page by page.

    *offset* is page-aligned. The child sends each page as it reads it, so a SIGBUS leaves
    the pages before the failing one in ``data``.
    """

    def body(w: int) -> None:
        with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset) as m:
            for a in range(0, length, PAGE):
                os.write(w, m[a : a + PAGE])

    return in_child(body)


def mmap_store(fd: int, offset: int, length: int, at: int, data: bytes) -> ChildResult:
    """Store *data* at byte *at* of a shared mapping of [offset, offset + length); msync."""

    def body(_w: int) -> None:
        with mmap.mmap(fd, length, mmap.MAP_SHARED, offset=offset) as m:
            m[at - offset : at - offset + len(data)] = data
            m.flush()

    return in_child(body)


# -- the model of one owned file ---------------------------------------------------------------
@dataclass
class Owned:
    """A file its owner has open, and what must be in it."""

    fid: int
    name: str
    fd: int
    data: bytearray = field(default_factory=bytearray)
    resident: bytearray = field(default_factory=bytearray)  # per page: written, not a hole
    vol: bytearray = field(default_factory=bytearray)  # per page: in a volatile range
    purged: bytearray = field(default_factory=bytearray)  # per page: known to be purged
    unknown: bytearray = field(default_factory=bytearray)  # per page: content not known

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def npages(self) -> int:
        return len(self.vol)

    def resize(self, size: int) -> None:
        """Truncate or extend (with zeros; new pages are holes) the model."""
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        n = pages_spanned(size)
        for arr in (self.resident, self.vol, self.purged, self.unknown):
            if len(arr) > n:
                del arr[n:]
            else:
                arr.extend(bytes(n - len(arr)))

    def uncertain(self, p: int) -> bool:
        """Page p may or may not have been purged (so its content after a partial write is
        not known)."""
        return bool(self.unknown[p] or (self.vol[p] and self.resident[p] and not self.purged[p]))

    def may_fail(self, p: int) -> bool:
        """Reading page p may give EIO."""
        return bool(self.purged[p]) or self.uncertain(p)

    def guaranteed(self, p: int) -> bool:
        """Page p must read back exactly (non-volatile, or a hole, and not purged)."""
        return not self.may_fail(p)

    def nonvolatile_resident(self) -> int:
        return sum(
            1
            for r, v, pu in zip(self.resident, self.vol, self.purged, strict=True)
            if r and not v and not pu
        )

    def apply_write(self, off: int, data: bytes) -> None:
        """Record that *data* was written at *off*."""
        if not data:
            return
        end = off + len(data)
        old_size = self.size
        if end > old_size:
            self.resize(end)
        self.data[off:end] = data
        for p in range(off // PAGE, pages_spanned(end)):
            start = p * PAGE
            kept_head = min(off, old_size) > start
            kept_tail = min(start + PAGE, old_size) > end
            if (kept_head or kept_tail) and self.uncertain(p):
                self.unknown[p] = 1  # zero-filled if it was purged, old bytes if not
            elif not kept_head and not kept_tail:
                self.unknown[p] = 0
            self.purged[p] = 0
            self.resident[p] = 1

    def set_purged(self, p: int) -> None:
        self.purged[p] = 1
        self.unknown[p] = 0
        a, b = p * PAGE, min((p + 1) * PAGE, self.size)
        self.data[a:b] = bytes(b - a)  # a write makes it data again, the rest zeros


# -- reports ---------------------------------------------------------------------------------
@dataclass
class Report:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "op errno" -> count, expected ones
    unexpected: list[str] = field(default_factory=list)
    unexpected_count: int = 0
    corruptions: list[str] = field(default_factory=list)
    corruption_count: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    latency_max: dict[str, float] = field(default_factory=dict)

    def merge(self, other: Report) -> None:
        self.ops.update(other.ops)
        self.errors.update(other.errors)
        self.unexpected += other.unexpected
        self.unexpected_count += other.unexpected_count
        self.corruptions += other.corruptions
        self.corruption_count += other.corruption_count
        self.notes.update(other.notes)
        for kind, t in other.latency_max.items():
            self.latency_max[kind] = max(self.latency_max.get(kind, 0.0), t)


def errno_name(e: int | None) -> str:
    return errno.errorcode.get(e or 0, str(e))


class Unexpected(Exception):
    """An operation failed in a way the contract does not allow (already reported)."""


# -- a worker ------------------------------------------------------------------------------------
@dataclass
class Config:
    mountpoint: Path
    root: Path
    procs: int
    seconds: float
    seed: int
    files: int
    max_file_size: int
    nonvolatile_budget: int  # bytes of non-volatile data each owner keeps at most
    owner_target: int  # bytes of files each owner grows toward (volatile ones included)
    progress_every: float = 30.0
    parent: int = 0  # the tool's pid: its children die with it
    # The hostile mix (see the module's docstring); zeros leave it out.
    waiters: int = 0
    readers: int = 0
    victims: int = 0
    memory_cap: int = 0
    watchdog: float = 0.0  # seconds the root may take to answer a probe; 0: no watchdog
    probe_every: float = 0.1
    second_user: int = 0  # uid for every second waiter and reader; 0: none

    @property
    def hostile(self) -> bool:
        return bool(self.waiters or self.readers or self.victims or self.watchdog)

    @property
    def victim_dir(self) -> Path:
        return self.root / "victims"

    @property
    def victim_size(self) -> int:
        return max(min(VICTIM_MAX, self.memory_cap // 4) // PAGE * PAGE, PAGE)


def on_a_file(
    method: Callable[[Worker, Owned], bool],
) -> Callable[[Worker], bool]:
    """An operation on one of the worker's own files, picked at random (skipped if none)."""

    def op(self: Worker) -> bool:
        f = self.pick_file()
        return False if f is None else method(self, f)

    op.__name__ = method.__name__
    op.__doc__ = method.__doc__
    return op


class Worker:
    def __init__(self, cfg: Config, index: int, progress: Any, stop: Synchronized[int]) -> None:
        self.cfg = cfg
        self.index = index
        self.label = f"worker {index}"
        self.progress = progress
        self.stop = stop
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.dir = cfg.root / f"o{index}"
        self.slots = cfg.files // cfg.procs + (1 if index < cfg.files % cfg.procs else 0)
        self.files: dict[str, Owned] = {}
        self.created = 0
        self.gen = 0
        self.report = Report()
        self.log: deque[str] = deque(maxlen=30)
        self.kinds = list(OPS)
        self.weights = list(OPS.values())
        self.budget_pages = max(cfg.nonvolatile_budget // PAGE, 16)

    # -- bookkeeping ----------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.log.append(text)

    def corrupt(self, what: str) -> None:
        self.report.corruption_count += 1
        if len(self.report.corruptions) < 20:
            tail = "\n    ".join(self.log)
            self.report.corruptions.append(f"{self.label}: {what}\n  last operations:\n    {tail}")

    def unexpected(self, op: str, e: BaseException) -> None:
        self.report.unexpected_count += 1
        if len(self.report.unexpected) < 20:
            tail = "\n    ".join(self.log)
            self.report.unexpected.append(
                f"{self.label}: {op}: {e!r}\n  last operations:\n    {tail}"
            )

    def expected(self, op: str, code: int | None) -> None:
        self.report.errors[f"{op} {errno_name(code)}"] += 1

    def path(self, f: Owned) -> Path:
        return self.dir / f.name

    # -- choosing ranges --------------------------------------------------------------------
    def pick_offset(self, size: int) -> int:
        rng, limit = self.rng, self.cfg.max_file_size
        r = rng.random()
        if r < 0.25:
            off = rng.randint(0, size // PAGE) * PAGE
        elif r < 0.4:
            off = rng.randint(1, max(limit // CHUNK, 1)) * CHUNK
            off += rng.choice((-2 * PAGE, -PAGE, -BLOCK, 0, BLOCK, PAGE))
        elif r < 0.55:
            off = size
        elif r < 0.6:
            off = size + rng.randint(1, 8) * PAGE
        else:
            off = rng.randint(0, size // BLOCK) * BLOCK
        return min(max(off, 0), limit - BLOCK) // BLOCK * BLOCK

    def pick_length(self, off: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            n = BLOCK * rng.randint(1, 63)
        elif r < 0.6:
            n = PAGE * rng.randint(1, 16)
        elif r < 0.9:
            n = PAGE * rng.randint(16, 256)
        else:
            n = CHUNK + PAGE * rng.randint(-4, 4)
        return max(min(n, self.cfg.max_file_size - off), BLOCK)

    def pick_range(self, size: int) -> tuple[int, int]:
        """An ``OFFSET,LENGTH`` for a mark: sometimes everything (0,0), sometimes past EOF."""
        r = self.rng.random()
        if r < 0.15 or size == 0:
            return 0, 0
        off = self.pick_offset(size) if r < 0.9 else self.rng.randint(0, size // BLOCK) * BLOCK
        length = 0 if self.rng.random() < 0.2 else self.pick_length(off)
        return off, length

    def pick_file(self) -> Owned | None:
        return self.rng.choice(list(self.files.values())) if self.files else None

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> Report:
        deadline = time.monotonic() + self.cfg.seconds
        count = 0
        while time.monotonic() < deadline and not self.stop.value:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            if self.relieve_needed() and kind in ("write", "create", "nonvolatile"):
                kind = "relieve"
            self.step(kind)
            count += 1
            self.progress[self.index] = count
        self.step("final")
        self.progress[self.index] = count + 1
        for f in self.files.values():
            os.close(f.fd)
        return self.report

    def step(self, kind: str) -> None:
        t = time.monotonic()
        try:
            done = getattr(self, "op_" + kind)()
        except Unexpected:
            done = True
        except OSError as e:
            self.unexpected(kind, e)
            self.forget_broken()
            done = True
        if done is not False:
            self.report.ops[kind] += 1
        elapsed = time.monotonic() - t
        if elapsed > self.report.latency_max.get(kind, 0.0):
            self.report.latency_max[kind] = elapsed

    def forget_broken(self) -> None:
        """After an unexpected error the model may be wrong: start those files over."""
        for f in list(self.files.values()):
            with contextlib.suppress(OSError):
                os.close(f.fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path(f))
        self.files.clear()

    # -- owner operations ------------------------------------------------------------------
    def op_create(self) -> bool:
        if len(self.files) >= self.slots:
            return False
        self.created += 1
        fid = (self.index << 24) | self.created
        name = f"{fid:08x}.0"
        tmp = self.dir / f".tmp-{fid:08x}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.setxattr(fd, FID_XATTR, str(fid).encode())
        f = Owned(fid, name, fd)
        self.note(f"create {name}")
        if self.rng.random() < 0.7:
            self.write(f, 0, self.pick_length(0), "create")
        os.rename(tmp, self.dir / name)
        self.files[name] = f
        return True

    def op_write(self) -> bool:
        f = self.pick_file()
        if f is None or (len(self.files) < self.slots and self.rng.random() < 0.3):
            return self.op_create()
        total = sum(g.size for g in self.files.values())
        if total < self.cfg.owner_target and self.rng.random() < 0.7:
            f = min(self.files.values(), key=lambda g: g.size)  # grow toward the target
            off = f.size // BLOCK * BLOCK
            length = min(PAGE * self.rng.randint(64, 512), self.cfg.max_file_size - off)
            if length > 0:
                self.write(f, off, length, "append")
                return True
        off = self.pick_offset(f.size)
        self.write(f, off, self.pick_length(off), "write")
        return True

    def write(self, f: Owned, off: int, length: int, op: str) -> None:
        """pwrite a new generation at [off, off + length), widened to whole pages where a
        partial write would leave bytes of unknown content; keep within the budget."""
        end = off + length
        if off % PAGE and off // PAGE < f.npages and f.uncertain(off // PAGE):
            off -= off % PAGE
        last = (end - 1) // PAGE
        if end % PAGE and end < f.size and f.uncertain(last):
            end = (last + 1) * PAGE
        self.gen += 1
        data = pattern(f.fid, self.gen, off, end - off)
        self.note(f"{op} {f.name} [{off},{end}) gen {self.gen} size {f.size}")
        try:
            n = os.pwrite(f.fd, data, off)
        except OSError as e:
            if (
                e.errno == errno.EIO
                and _writeback_shaped(off, len(data))
                and f.may_fail(off // PAGE)
            ):
                # The documented exception (README, Limitations): a write of at most one
                # page, page-aligned, through a read-write descriptor, into a purged page
                # while the file's purge is being flushed looks like writeback of a stale
                # mapped page and is refused; it changes nothing.
                self.expected(op, e.errno)
                return
            if e.errno != errno.ENOSPC:
                raise
            self.expected(op, e.errno)
            return
        if n < len(data):
            self.report.notes["short writes"] += 1
            self.note(f"  short write: {n} of {len(data)}")
        f.apply_write(off, data[:n])
        if self.relieve_needed():
            self.mark_volatile(f, off, n, "write")

    def relieve_needed(self) -> bool:
        return sum(f.nonvolatile_resident() for f in self.files.values()) > self.budget_pages

    def op_relieve(self) -> bool:
        """Over the non-volatile budget: mark a file volatile or shrink it."""
        f = max(self.files.values(), key=lambda g: g.nonvolatile_resident())
        if self.rng.random() < 0.8:
            self.mark_volatile(f, 0, 0, "relieve")
        else:
            self.truncate(f, f.size // 2 // BLOCK * BLOCK, "relieve")
        return True

    @on_a_file
    def op_read(self, f: Owned) -> bool:
        if self.rng.random() < 0.3 or f.size == 0:
            a, b = 0, f.size
        else:
            a = self.rng.randrange(f.size)
            b = min(f.size, a + self.rng.choice((1, 100, PAGE, 5 * PAGE, CHUNK)))
        fd = f.fd
        other = self.rng.random() < 0.2
        if other:
            fd = os.open(self.path(f), os.O_RDONLY)
        try:
            self.verify(f, fd, a, b, "read")
        finally:
            if other:
                os.close(fd)
        return True

    def verify(self, f: Owned, fd: int, a: int, b: int, op: str) -> None:
        """Read [a, b) and check it against the model, page by page where reads fail."""
        self.note(f"{op} {f.name} [{a},{b}) size {f.size}")
        size = os.fstat(fd).st_size
        if size != f.size:
            self.corrupt(f"{f.name}: st_size {size}, expected {f.size}")
            raise Unexpected
        pos = b if a >= b else a
        while pos < b:
            try:
                buf = os.pread(fd, min(b - pos, READ_MAX), pos)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self.verify_pages(f, fd, pos, b, op)
                return
            if not buf:
                self.corrupt(f"{f.name}: read at {pos} hit end of file; size is {f.size}")
                return
            self.compare(f, pos, buf, op)
            pos += len(buf)

    def verify_pages(self, f: Owned, fd: int, pos: int, b: int, op: str) -> None:
        """A read of [pos, b) failed with EIO: read page by page; only pages that may be
        purged may fail, and pages known purged must."""
        if not any(f.may_fail(p) for p in range(pos // PAGE, pages_spanned(b))):
            self.corrupt(f"{f.name}: EIO reading [{pos},{b}); every page there is guaranteed")
            return
        while pos < b:
            p = pos // PAGE
            end = min(b, (p + 1) * PAGE)
            try:
                buf = os.pread(fd, end - pos, pos)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                if f.may_fail(p):
                    self.expected(op, e.errno)
                else:
                    self.corrupt(f"{f.name}: EIO reading guaranteed page {p} alone")
            else:
                if len(buf) != end - pos:
                    self.corrupt(f"{f.name}: short read of page {p}: {len(buf)} of {end - pos}")
                self.compare(f, pos, buf, op)
            pos = end

    def compare(self, f: Owned, pos: int, buf: bytes, op: str) -> None:
        end = pos + len(buf)
        pages = range(pos // PAGE, pages_spanned(end))
        if not any(f.purged[p] or f.unknown[p] for p in pages) and buf == f.data[pos:end]:
            return
        for p in pages:
            a, b = max(pos, p * PAGE), min(end, (p + 1) * PAGE)
            got = buf[a - pos : b - pos]
            if f.purged[p]:
                self.corrupt(f"{f.name}: {op} of purged page {p} returned data ({got[:16].hex()})")
            elif f.unknown[p]:
                bad = bad_block(got, a, f.fid)
                if bad is not None:
                    block = got[bad - a : bad - a + BLOCK]
                    self.corrupt(f"{f.name}: {op}: block at {bad} is {describe_block(block)}")
            elif got != f.data[a:b]:
                i = next(i for i in range(len(got)) if got[i] != f.data[a + i])
                at = (a + i) // BLOCK * BLOCK
                block = bytes(buf[at - pos : at - pos + BLOCK])
                want = bytes(f.data[at : at + BLOCK])
                state = "volatile" if f.vol[p] else "non-volatile"
                self.corrupt(
                    f"{f.name}: {op}: byte {a + i} (page {p}, {state}) differs: got block "
                    f"{describe_block(block)}, expected {describe_block(want)}"
                )
                self.report.notes["mismatched pages"] += 1

    @on_a_file
    def op_truncate(self, f: Owned) -> bool:
        r = self.rng.random()
        if r < 0.05:
            size = 0
        elif r < 0.6 and f.size:
            size = self.rng.randint(f.size // 2 // BLOCK, f.size // BLOCK) * BLOCK
            if self.rng.random() < 0.4:
                size = size // PAGE * PAGE
        else:
            size = self.pick_offset(f.size)
        self.truncate(f, size, "truncate")
        return True

    def truncate(self, f: Owned, size: int, op: str) -> None:
        self.note(f"{op} {f.name} {f.size} -> {size}")
        if self.rng.random() < 0.5:
            os.ftruncate(f.fd, size)
        else:
            os.truncate(self.path(f), size)
        f.resize(size)

    @on_a_file
    def op_reopen(self, f: Owned) -> bool:
        flags = os.O_RDWR
        if self.rng.random() < 0.2:
            flags |= os.O_TRUNC
        self.note(f"reopen {f.name}" + (" O_TRUNC" if flags & os.O_TRUNC else ""))
        os.close(f.fd)
        f.fd = os.open(self.path(f), flags)
        if flags & os.O_TRUNC:
            f.resize(0)
        return True

    @on_a_file
    def op_rename(self, f: Owned) -> bool:
        others = [g for g in self.files.values() if g is not f]
        if others and self.rng.random() < 0.25:
            victim: Owned | None = self.rng.choice(others)
            assert victim is not None
            new = victim.name
        else:
            victim = None
            gen = int(f.name.rpartition(".")[2]) + 1
            new = f"{f.fid:08x}.{gen}"
        self.note(f"rename {f.name} -> {new}" + (" (over it)" if victim else ""))
        os.rename(self.path(f), self.dir / new)
        del self.files[f.name]
        if victim is not None:
            os.close(victim.fd)
            del self.files[victim.name]
        f.name = new
        self.files[new] = f
        return True

    @on_a_file
    def op_unlink(self, f: Owned) -> bool:
        self.note(f"unlink {f.name}")
        os.unlink(self.path(f))
        del self.files[f.name]
        try:
            if self.rng.random() < 0.5:  # an unlinked open file keeps its data
                self.verify(f, f.fd, 0, f.size, "read-unlinked")
        finally:
            os.close(f.fd)
        return True

    # -- volatile ranges --------------------------------------------------------------------
    def target(self, f: Owned) -> int | str:
        return f.fd if self.rng.random() < 0.5 else str(self.path(f))

    @on_a_file
    def op_volatile(self, f: Owned) -> bool:
        self.mark_volatile(f, *self.pick_range(f.size), "volatile")
        return True

    def mark_volatile(self, f: Owned, off: int, length: int, op: str) -> None:
        pages = volatile_pages(off, length, f.size)
        self.note(f"{op}: volatile {f.name} {off},{length} -> pages {runs(pages)}")
        os.setxattr(self.target(f), VOLATILE, b"%d,%d" % (off, length))
        for p in pages:
            f.vol[p] = 1

    @on_a_file
    def op_nonvolatile(self, f: Owned) -> bool:
        self.mark_nonvolatile(f, *self.pick_range(f.size), "nonvolatile")
        return True

    def mark_nonvolatile(self, f: Owned, off: int, length: int, op: str) -> None:
        """Mark non-volatile, then settle the range with ``user.vrange.purged``."""
        pages = nonvolatile_pages(off, length, f.size)
        self.note(f"{op}: nonvolatile {f.name} {off},{length} -> pages {runs(pages)}")
        os.setxattr(self.target(f), NONVOLATILE, b"%d,%d" % (off, length))
        listed = self.check_purged(f, op)
        survived = 0
        for p in pages:
            if f.vol[p] and f.resident[p] and not f.purged[p] and not f.unknown[p]:
                survived += p not in listed
            f.vol[p] = 0
        self.report.notes["volatile pages found intact"] += survived
        for p in pages:
            if f.unknown[p]:  # not purged and stable now: learn what it holds
                self.adopt(f, p, op)

    @on_a_file
    def op_regenerate(self, f: Owned) -> bool:
        """A cache's cycle: pin a range, rewrite what was purged, check it, unpin it."""
        if f.size == 0:
            return False
        off, length = self.pick_range(f.size)
        self.mark_nonvolatile(f, off, length, "regenerate")
        pages = nonvolatile_pages(off, length, f.size)
        for first, end in page_runs(p for p in pages if f.purged[p]):
            a = first * PAGE
            self.write(f, a, min(end * PAGE, f.size) - a, "regenerate")
        if pages:
            a, b = pages.start * PAGE, min(pages.stop * PAGE, f.size)
            self.verify(f, f.fd, a, b, "regenerate")
        self.mark_volatile(f, off, length, "regenerate")
        return True

    def adopt(self, f: Owned, p: int, op: str) -> None:
        a, b = p * PAGE, min((p + 1) * PAGE, f.size)
        buf = os.pread(f.fd, b - a, a)
        bad = bad_block(buf, a, f.fid)
        if len(buf) != b - a or bad is not None:
            self.corrupt(f"{f.name}: {op}: unknown page {p} (now non-volatile) reads badly")
            return
        f.data[a:b] = buf
        f.unknown[p] = 0
        self.report.notes["unknown pages adopted"] += 1

    def check_purged(self, f: Owned, op: str) -> set[int]:
        """Read ``user.vrange.purged``; listed pages that may be purged become known purged.

        A listed page the model holds guaranteed is lost data; a known purged page not listed
        came back without a write.
        """
        listed = pages_of(parse_ranges(os.getxattr(self.target(f), PURGED)))
        for p in sorted(listed):
            if p >= f.npages:
                self.corrupt(f"{f.name}: {op}: purged list names page {p} past the end")
            elif f.purged[p]:
                continue
            elif f.uncertain(p):
                f.set_purged(p)
                self.report.notes["volatile pages found purged"] += 1
            else:
                what = "a hole" if not f.resident[p] else "non-volatile"
                self.corrupt(f"{f.name}: {op}: page {p} ({what}) is listed as purged")
        for p in range(f.npages):
            if f.purged[p] and p not in listed:
                self.corrupt(f"{f.name}: {op}: known purged page {p} is no longer listed")
        return listed

    @on_a_file
    def op_purged(self, f: Owned) -> bool:
        self.note(f"purged? {f.name}")
        self.check_purged(f, "purged")
        return True

    @on_a_file
    def op_volatile_list(self, f: Owned) -> bool:
        self.check_volatile_list(f, "volatile_list")
        return True

    def check_volatile_list(self, f: Owned, op: str) -> None:
        listed = pages_of(parse_ranges(os.getxattr(self.target(f), VOLATILE)))
        model = {p for p in range(f.npages) if f.vol[p]}
        self.note(f"{op} {f.name}: {runs(sorted(listed))}")
        if listed != model:
            self.corrupt(
                f"{f.name}: {op}: volatile pages listed {runs(sorted(listed))}, "
                f"expected {runs(sorted(model))}"
            )

    # -- mmap ---------------------------------------------------------------------------------
    @on_a_file
    def op_mmap_write(self, f: Owned) -> bool:
        good = [p for p in range(f.npages) if f.resident[p] and not f.vol[p] and f.guaranteed(p)]
        if not good:
            return False
        first = last = self.rng.choice(good)
        while last + 1 in good and last - first < 15 and self.rng.random() < 0.8:
            last += 1
        lo, hi = first * PAGE, min((last + 1) * PAGE, f.size)
        a = lo + self.rng.randint(0, (hi - lo) // BLOCK - 1) * BLOCK
        b = a + self.rng.randint(1, (hi - a) // BLOCK) * BLOCK
        self.gen += 1
        data = pattern(f.fid, self.gen, a, b - a)
        self.note(f"mmap_write {f.name} [{a},{b}) gen {self.gen} (pages {first}-{last})")
        result = mmap_store(f.fd, lo, hi - lo, a, data)
        if not result.ok:
            self.corrupt(
                f"{f.name}: mmap store into guaranteed pages {first}-{last} failed "
                f"(signal {result.signal}, status {result.status})"
            )
            for p in range(first, last + 1):
                f.unknown[p] = 1
            return True
        f.apply_write(a, data)
        return True

    @on_a_file
    def op_mmap_read(self, f: Owned) -> bool:
        if f.size == 0:
            return False
        purged = [p for p in range(f.npages) if f.purged[p]]
        if purged and self.rng.random() < 0.3:
            first = self.rng.choice(purged)
        else:
            first = self.rng.randrange(f.npages)
        last = min(f.npages, first + self.rng.choice((1, 4, 32)))
        lo, hi = first * PAGE, min(last * PAGE, f.size)
        self.note(f"mmap_read {f.name} pages {first}-{last - 1}")
        result = mmap_load(f.fd, lo, hi - lo)
        got = result.data
        if got:
            self.compare(f, lo, got, "mmap_read")
        if result.ok:
            return True
        failed = (lo + len(got)) // PAGE
        if result.signal == signal.SIGBUS and failed < f.npages and f.may_fail(failed):
            self.expected("mmap_read", errno.EIO)  # counted as EIO: SIGBUS is its mmap form
            self.report.notes["SIGBUS on mmap loads"] += 1
        else:
            self.corrupt(
                f"{f.name}: mmap load of pages {first}-{last - 1} stopped at page {failed} "
                f"(signal {result.signal}, status {result.status}); that page is guaranteed"
            )
        return True

    # -- other owners' files --------------------------------------------------------------------
    def open_foreign(self) -> tuple[int, int, str] | None:
        """Open a random file of another owner: (fd, file id, name), or None if it vanished."""
        owners = [i for i in range(self.cfg.procs) if i != self.index] or [self.index]
        d = self.cfg.root / f"o{self.rng.choice(owners)}"
        names = [n for n in os.listdir(d) if not n.startswith(".")]
        if not names:
            return None
        name = self.rng.choice(names)
        try:
            fd = os.open(d / name, os.O_RDONLY)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            self.expected("foreign_open", e.errno)
            return None
        try:
            fid = int(os.getxattr(fd, FID_XATTR))
        except BaseException:
            os.close(fd)
            raise
        return fd, fid, f"{d.name}/{name}"

    def op_foreign_read(self) -> bool:
        opened = self.open_foreign()
        if opened is None:
            return True
        fd, fid, name = opened
        try:
            size = os.fstat(fd).st_size
            if self.rng.random() < 0.4:
                a, b = 0, size
            else:
                a = self.rng.randint(0, size // BLOCK) * BLOCK
                b = a + self.rng.choice((BLOCK, PAGE, 8 * PAGE, CHUNK))
            self.note(f"foreign_read {name} [{a},{b}) size {size}")
            self.read_checked(fd, fid, name, a, b, "foreign_read")
        finally:
            os.close(fd)
        return True

    def read_checked(self, fd: int, fid: int, name: str, pos: int, end: int, op: str) -> None:
        """Read [pos, end) in pieces, each checked against the model; a piece that gives EIO
        (expected only where pages are purged) is skipped to the next page. Stops early at
        end of file (truncated meanwhile) or when the run is told to stop."""
        while pos < end and not self.stop.value:
            try:
                buf = os.pread(fd, min(end - pos, READ_MAX), pos)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self.expected(op, e.errno)
                pos = (pos // PAGE + 1) * PAGE  # go on after the page
                continue
            if not buf:
                break
            self.check_foreign(fd, fid, name, pos, buf, op)
            pos += len(buf)

    def check_foreign(self, fd: int, fid: int, name: str, pos: int, buf: bytes, op: str) -> None:
        """Every block must be zeros or this file's block at this place; re-read failures."""
        while (bad := bad_block(buf, pos, fid)) is not None:
            p = bad // PAGE
            a = max(pos, p * PAGE)
            first_look = describe_block(buf[bad - pos : bad - pos + BLOCK])
            for delay in (0.0, 0.001, 0.01, 0.05):
                time.sleep(delay)
                try:
                    again = os.pread(fd, PAGE - a % PAGE, a)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    self.report.notes["bad foreign blocks purged before a re-read"] += 1
                    break
                if bad_block(again, a, fid) is None:
                    self.report.notes["torn foreign reads resolved by a re-read"] += 1
                    break
            else:
                self.corrupt(
                    f"{name}: {op}: block at {bad} is {first_look} and stays bad on re-reads"
                )
            skip = (p + 1) * PAGE - pos
            if skip >= len(buf):
                return
            buf, pos = buf[skip:], pos + skip

    def op_foreign_mmap(self) -> bool:
        opened = self.open_foreign()
        if opened is None:
            return True
        fd, fid, name = opened
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return True
            first = self.rng.randrange(pages_spanned(size))
            lo = first * PAGE
            hi = min(size, lo + self.rng.choice((1, 4, 32)) * PAGE)
            self.note(f"foreign_mmap {name} [{lo},{hi}) size {size}")
            result = mmap_load(fd, lo, hi - lo)
            if result.data:
                self.check_foreign(fd, fid, name, lo, result.data, "foreign_mmap")
            if result.signal == signal.SIGBUS:
                self.expected("foreign_mmap", errno.EIO)
                self.report.notes["SIGBUS on mmap loads"] += 1
            elif result.status == 3:
                self.report.notes["foreign mmap raced a truncate"] += 1
            elif not result.ok:
                self.unexpected(
                    "foreign_mmap",
                    RuntimeError(f"child: signal {result.signal}, status {result.status}"),
                )
        finally:
            os.close(fd)
        return True

    # -- the whole mount ------------------------------------------------------------------------
    def op_purge_all(self) -> bool:
        self.note("purge all")
        os.setxattr(self.cfg.mountpoint, PURGE, b"all")
        return True

    def op_stats(self) -> bool:
        stats = read_stats(self.cfg.mountpoint)
        if stats.get("resident_bytes", 0) > stats.get("memory_cap", 0):
            self.corrupt(f"resident_bytes over memory_cap: {stats}")
        st = os.statvfs(self.cfg.mountpoint)
        if st.f_bfree > st.f_blocks:
            self.corrupt(f"statfs: {st.f_bfree} free of {st.f_blocks} blocks")
        return True

    def op_final(self) -> bool:
        """Settle and check everything this worker owns."""
        for f in list(self.files.values()):
            self.mark_nonvolatile(f, 0, 0, "final")
            self.check_volatile_list(f, "final")
            self.verify(f, f.fd, 0, f.size, "final")
        return True


def worker_main(
    cfg: Config,
    index: int,
    progress: Any,
    stop: Synchronized[int],
    conn: multiprocessing.connection.Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    die_with_parent(cfg.parent)
    worker = Worker(cfg, index, progress, stop)
    try:
        report = worker.run()
    except BaseException as e:  # a bug in this tool, or the mount went away
        report = worker.report
        worker.unexpected("worker", e)
        report.unexpected.append(traceback.format_exc())
    conn.send(report)
    conn.close()


# -- the hostile mix ---------------------------------------------------------------------------
class SharedListing:
    """The owners' files (``oN/NAME``, sorted), listed by one thread of the parent every
    LIST_EVERY seconds and read by every hostile process from shared memory.

    The kernel serializes READDIR and LOOKUP in a directory, each waiting its turn in the
    daemon's queue: hundreds of processes listing the same directories would slow the owners
    far more than the mount. Two buffers: the writer fills the one not in use, then flips.
    """

    CAP = 1 << 16

    def __init__(self, ctx: Any) -> None:
        self.buf = ctx.RawArray("c", 2 * self.CAP)
        self.lens = ctx.RawArray("i", 2)
        self.which = ctx.RawValue("i", 0)

    def publish(self, names: Sequence[str]) -> None:
        data = "\n".join(names).encode()
        if len(data) > self.CAP:
            data = data[: data.rindex(b"\n", 0, self.CAP)]
        w = 1 - self.which.value
        self.buf[w * self.CAP : w * self.CAP + len(data)] = data
        self.lens[w] = len(data)
        self.which.value = w

    def read(self) -> list[str]:
        w = self.which.value
        n = self.lens[w]
        return bytes(self.buf[w * self.CAP : w * self.CAP + n]).decode().split("\n") if n else []

    def scout(self, root: Path, owners: int, done: threading.Event) -> None:
        """List the owners' directories until *done* (a thread of the parent)."""
        while not done.is_set():
            names = []
            for i in range(owners):
                with contextlib.suppress(OSError):
                    names += [f"o{i}/{n}" for n in os.listdir(root / f"o{i}") if n[0] != "."]
            self.publish(sorted(names))
            done.wait(LIST_EVERY)


class Hostile(Worker):
    """A waiter, reader or victim of the hostile mix: it works on the owners' files and on the
    victims, and owns none of the owners' files. It runs until the parent says stop."""

    OPS: ClassVar[dict[str, str]] = {
        "waiter": "wait_purged",
        "reader": "reread",
        "victim": "victim_cycle",
    }

    def __init__(self, cfg: Config, kind: str, k: int, stop: Any, listing: SharedListing) -> None:
        offset = {"waiter": 1, "reader": 1 + cfg.waiters, "victim": 1 + cfg.waiters + cfg.readers}
        super().__init__(cfg, cfg.procs + offset[kind] + k, None, stop)
        self.kind = kind
        self.k = k
        self.label = f"{kind} {k}"
        self.current: Path | None = None
        self.fd: int | None = None
        self.until = 0.0
        self.cycles = 0
        self.listing = listing

    def run(self) -> Report:
        op = self.OPS[self.kind]
        try:
            while not self.stop.value:
                self.step(op)
        finally:
            self.drop_target()
        return self.report

    def unexpected(self, op: str, e: BaseException) -> None:
        super().unexpected(op, e)
        time.sleep(0.05)  # a dead mount fails at once: do not spin

    # -- targets ------------------------------------------------------------------------------
    def pick_target(self) -> Path | None:
        """A victim, the hot file of the moment (the same in every process), or any file."""
        r = self.rng.random()
        victim_share = VICTIM_SHARE.get(self.kind, 0.0)
        if r < victim_share and self.cfg.victims:
            return self.cfg.victim_dir / f"v{self.rng.randrange(self.cfg.victims)}"
        names = self.listing.read()
        if not names:
            return None
        rng = self.rng
        if r < victim_share + HOT_SHARE:
            rng = random.Random(self.cfg.seed * 1_000_003 + int(time.time() / HOT_PERIOD))
        return self.cfg.root / rng.choice(names)

    def drop_target(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.current, self.fd = None, None

    def name(self, path: Path) -> str:
        return f"{path.parent.name}/{path.name}"

    # -- operations -----------------------------------------------------------------------------
    def op_wait_purged(self) -> bool:
        """``getxattr user.vrange.purged`` on the current target (by path, or through a
        descriptor held open), which changes every 0.5-2 s."""
        now = time.monotonic()
        if self.current is None or now >= self.until:
            self.drop_target()
            self.current = self.pick_target()
            if self.current is None:
                time.sleep(0.05)
                return False
            self.until = now + self.rng.uniform(0.5, 2.0)
            by_fd = self.rng.random() < 0.25
            self.note(f"wait on {self.name(self.current)}" + (" (open)" if by_fd else ""))
            if by_fd:
                opened = time.monotonic()
                try:
                    self.fd = os.open(self.current, os.O_RDONLY)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    self.expected("wait_purged", e.errno)
                    self.drop_target()
                    return True
                self.slow("open", opened)
        target = self.current
        started = time.monotonic()
        try:
            value = os.getxattr(self.fd if self.fd is not None else target, PURGED)
        except OSError as e:
            if e.errno != errno.ENOENT or self.fd is not None:
                raise
            self.expected("wait_purged", e.errno)  # renamed or removed by its owner
            self.drop_target()
            return True
        what = "a victim" if target.parent == self.cfg.victim_dir else "an owner's file"
        self.slow(f"getxattr purged on {what}", started)
        self.check_listing(self.name(target), value)
        return True

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.slow(what, started)

    def slow(self, what: str, started: float) -> None:
        """Count a step that took over 1 s (and over 10 s) by what it did."""
        took = time.monotonic() - started
        if took > 1.0:
            self.report.notes[f"{self.kind}: {what} over {10 if took > 10 else 1} s"] += 1

    def check_listing(self, name: str, value: bytes) -> None:
        """A ``purged`` list must be ranges sorted by offset, page-aligned, not overlapping."""
        try:
            ranges = parse_ranges(value)
        except ValueError:
            self.corrupt(f"{name}: {PURGED} is not a list of ranges: {value[:80]!r}")
            return
        end = 0
        for off, length in ranges:
            if off % PAGE or length <= 0 or off < end:
                self.corrupt(f"{name}: {PURGED} lists {off},{length} after a range ending at {end}")
                return
            end = off + length

    def op_reread(self) -> bool:
        """Read a whole file several times, dropping its cached pages between passes, so that
        every pass asks the daemon again (while the file is being purged)."""
        target = self.pick_target()
        if target is None:
            time.sleep(0.05)
            return False
        name = self.name(target)
        try:
            fd = os.open(target, os.O_RDONLY)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            self.expected("reread", e.errno)
            return True
        try:
            fid = int(os.getxattr(fd, FID_XATTR))
            for _ in range(self.rng.randint(2, 4)):
                size = os.fstat(fd).st_size
                self.note(f"reread {name} size {size}")
                self.read_checked(fd, fid, name, 0, size, "reread")
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self.report.notes["reread passes (then fadvise DONTNEED)"] += 1
                if self.stop.value:
                    break
        finally:
            os.close(fd)
        return True

    # -- a victim: purged over and over, with an exact model of its own -------------------
    def op_victim_cycle(self) -> bool:
        """Make the victim stable, rewrite it whole, read it (into the kernel's cache), mark it
        volatile, then purge it: by purge-all (every second cycle) or by writing volatile
        filler past the cap. Then settle it with a non-volatile mark and ``purged``, and read
        it all: listed pages must fail with EIO, the others hold exactly what was written.
        After purge-all every page must be listed (purge-all returns only once they are)."""
        size = self.cfg.victim_size
        path = self.cfg.victim_dir / f"v{self.k}"
        if self.fd is None:  # readers find it by name: it appears with its file id
            tmp = path.with_name(f".tmp-v{self.k}")
            self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.setxattr(self.fd, FID_XATTR, str(VICTIM_FID | self.k).encode())
            os.rename(tmp, path)
        fd, name = self.fd, self.name(path)
        self.cycles += 1
        with self.timed("mark non-volatile"):
            os.setxattr(fd, NONVOLATILE, b"0,0")
        self.gen += 1
        data = pattern(VICTIM_FID | self.k, self.gen, 0, size)
        self.note(f"cycle {self.cycles}: rewrite {name} gen {self.gen}")
        try:
            with self.timed("rewrite"):
                written = os.pwrite(fd, data, 0)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self.expected("victim_cycle", e.errno)
            return True
        if written != size:
            self.report.notes["short writes"] += 1
            return True
        os.ftruncate(fd, size)
        with self.timed("read after the rewrite"):
            self.check_victim(fd, name, data, set(), "after the rewrite")
        with self.timed("mark volatile"):
            os.setxattr(fd, VOLATILE, b"0,0")
        explicit = self.cycles % 2 == 1
        if explicit:
            self.note("purge all")
            with self.timed("purge-all"):
                os.setxattr(self.cfg.mountpoint, PURGE, b"all")
            # Purge-all has returned: the victim is gone, and no read may see its old bytes.
            listed = pages_of(parse_ranges(os.getxattr(fd, PURGED)))
            if listed != set(range(size // PAGE)):
                self.corrupt(f"{name}: after purge-all, purged lists pages {runs(listed)}")
            self.check_victim(fd, name, data, set(range(size // PAGE)), "after purge-all")
        else:
            with self.timed("push at the cap"):
                self.push_at_cap()
        self.note(f"nonvolatile {name}")
        with self.timed("mark non-volatile"):
            os.setxattr(fd, NONVOLATILE, b"0,0")
        listed = pages_of(parse_ranges(os.getxattr(fd, PURGED)))
        if listed and listed != set(range(size // PAGE)):
            self.corrupt(f"{name}: one unit, but only pages {runs(listed)} are purged")
        how = "by purge-all" if explicit else "at the cap"
        self.report.notes[
            f"victim cycles, purged {how}" if listed else "victim cycles, intact"
        ] += 1
        with self.timed("read when settled"):
            self.check_victim(fd, name, data, listed, "settled")
        return True

    def push_at_cap(self) -> None:
        """Write volatile filler, 1.25 times the cap in all, so that the cap purges."""
        part = max(self.cfg.memory_cap // 4 // CHUNK, 1) * CHUNK
        body = b"f" * CHUNK
        for i in range(5):
            path = self.cfg.victim_dir / f"filler{self.k}-{i}"
            self.note(f"push: {path.name} {part} bytes")
            with contextlib.ExitStack() as stack:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                stack.callback(os.close, fd)
                try:
                    for off in range(0, part, CHUNK):
                        os.pwrite(fd, body, off)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    self.expected("victim_push", e.errno)
                os.setxattr(fd, VOLATILE, b"0,0")

    def check_victim(self, fd: int, name: str, data: bytes, purged: set[int], when: str) -> None:
        """Read the victim whole: pages in *purged* must fail with EIO, the others must read
        as *data*."""
        size = len(data)
        for pos in range(0, size, READ_MAX):
            end = min(size, pos + READ_MAX)
            pages = range(pos // PAGE, pages_spanned(end))
            try:
                buf = os.pread(fd, end - pos, pos)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self.expected("victim_read", e.errno)
                if not any(p in purged for p in pages):
                    self.corrupt(f"{name}: {when}: EIO reading [{pos},{end}), no page purged")
                continue
            if len(buf) != end - pos:
                self.corrupt(f"{name}: {when}: short read at {pos}: {len(buf)} of {end - pos}")
                continue
            for p in pages:
                a, b = p * PAGE - pos, min((p + 1) * PAGE, end) - pos
                if p in purged:
                    got = describe_block(buf[a : a + BLOCK])
                    self.corrupt(f"{name}: {when}: purged page {p} read as data ({got})")
                    return
                if buf[a:b] != data[pos + a : pos + b]:
                    got = describe_block(buf[a : a + BLOCK])
                    self.corrupt(f"{name}: {when}: page {p} read as {got}, gen {self.gen} expected")
                    return


def hostile_main(
    cfg: Config,
    kind: str,
    k: int,
    uid: int | None,
    stop: Any,
    listing: SharedListing,
    conn: multiprocessing.connection.Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    hostile = Hostile(cfg, kind, k, stop, listing)
    try:
        if uid is not None:
            become(uid)
        die_with_parent(cfg.parent)
        report = hostile.run()
    except BaseException as e:
        report = hostile.report
        hostile.unexpected(kind, e)
        report.unexpected.append(traceback.format_exc())
    conn.send(report)
    conn.close()


def second_user_problem(cfg: Config) -> str | None:
    """Why the hostile mix cannot use ``cfg.second_user`` on this mount (None if it can)."""
    if not cfg.second_user:
        return "none asked for (--second-user 0)"
    if os.geteuid() != 0:
        return "the tool does not run as root"
    if not allows_other(cfg.mountpoint):
        return "the mount was made without -o allow_other"

    def body(_w: int) -> None:
        become(cfg.second_user)
        os.listdir(cfg.root / "o0")

    result = in_child(body)
    if not result.ok:
        return f"uid {cfg.second_user} cannot list {cfg.root / 'o0'} (status {result.status})"
    return None


class Watchdog:
    """Probe ``getxattr user.vrange.stats`` on the mount root at a steady pace from a thread;
    call *on_failure* once if a probe takes longer than *deadline* seconds (hung=True) or
    fails (hung=False)."""

    def __init__(
        self,
        mountpoint: Path,
        deadline: float,
        every: float,
        on_failure: Callable[[str, bool], None],
    ) -> None:
        self.mountpoint = mountpoint
        self.deadline = deadline
        self.every = every
        self.on_failure = on_failure
        self.latencies: list[float] = []
        self.failure: str | None = None
        self.in_flight: float | None = None  # when the pending probe started
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.probe, name="probe", daemon=True),
            threading.Thread(target=self.watch, name="watchdog", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.done.set()

    def probe(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            self.in_flight = started
            error = None
            try:
                os.getxattr(self.mountpoint, STATS)
            except OSError as e:
                error = e
            took = time.monotonic() - started
            self.latencies.append(took)  # a hung probe too, once the abort ends it
            self.in_flight = None
            if error is not None:
                if not self.done.is_set():
                    gone = "" if _mounted(self.mountpoint) else "; it is no longer mounted"
                    self.fail(
                        f"the mount root answered getxattr({STATS}) with {error!r}{gone} "
                        "(the daemon's log may tell why)",
                        False,
                    )
                return
            self.done.wait(max(0.0, self.every - took))

    def watch(self) -> None:
        while not self.done.wait(0.2):
            since = self.in_flight
            if since is not None and time.monotonic() - since > self.deadline:
                self.fail(
                    f"the mount root did not answer getxattr({STATS}) within {self.deadline:g} s",
                    True,
                )
                return

    def fail(self, message: str, hung: bool) -> None:
        with self.lock:
            if self.failure is not None:
                return
            self.failure = message
        self.on_failure(message, hung)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        since = self.in_flight
        if since is not None:  # a probe still pending counts with what it has waited so far
            lat.append(time.monotonic() - since)
        out: dict[str, Any] = {
            "deadline": self.deadline,
            "every": self.every,
            "probes": len(lat),
            "failure": self.failure,
        }
        if lat:
            out["median_ms"] = round(statistics.median(lat) * 1e3, 2)
            out["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 2)
            out["max_ms"] = round(max(lat) * 1e3, 2)
        return out


def join_all(procs: Sequence[multiprocessing.process.BaseProcess], seconds: float) -> list[int]:
    """Join *procs* within *seconds* in all; the pids of those still alive."""
    deadline = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    return [p.pid or 0 for p in procs if p.is_alive()]


def receive_report(
    pipe: multiprocessing.connection.Connection, proc: multiprocessing.process.BaseProcess, who: str
) -> Report:
    """A child's report from its pipe, or one unexpected error if it died without one."""
    try:
        report: Report = pipe.recv()
    except EOFError:
        report = Report()
        report.unexpected_count = 1
        report.unexpected.append(f"{who} died: exit code {proc.exitcode}")
    return report


def finish_hostile(
    procs: Sequence[multiprocessing.process.BaseProcess],
    pipes: Sequence[multiprocessing.connection.Connection],
    names: Sequence[str],
) -> tuple[list[Report], list[int]]:
    """Collect the reports of the hostile processes (told to stop); kill those that do not
    report within STOP_GRACE seconds. Returns the reports and the pids still alive."""
    reports: dict[int, Report] = {}
    deadline = time.monotonic() + STOP_GRACE
    while len(reports) < len(procs) and time.monotonic() < deadline:
        waiting = {id(pipes[i]): i for i in range(len(procs)) if i not in reports}
        ready = multiprocessing.connection.wait([pipes[i] for i in waiting.values()], timeout=0.5)
        for conn in ready:
            i = waiting[id(conn)]
            reports[i] = receive_report(pipes[i], procs[i], names[i])
    late = [i for i in range(len(procs)) if i not in reports]
    for i in late:
        procs[i].kill()
    if late:
        r = Report()
        r.unexpected_count = len(late)
        shown = ", ".join(names[i] for i in late[:10]) + (", ..." if len(late) > 10 else "")
        r.unexpected.append(
            f"{len(late)} hostile processes did not stop within {STOP_GRACE:g} s "
            f"(killed): {shown}; states: "
            + "".join(sorted(process_state(procs[i].pid or 0) for i in late))
        )
        reports[-1] = r
    return list(reports.values()), join_all(procs, STOP_GRACE)


# -- the parent ------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def progress_line(cfg: Config, daemon: int | None) -> str:
    try:
        stats = read_stats(cfg.mountpoint)
    except OSError as e:
        return f"stats unreadable: {e}"
    rss = process_memory(daemon).get("VmRSS", 0) if daemon else 0
    cap = stats.get("purge_events_cap", 0)
    pressure = stats.get("purge_events_pressure", 0)
    explicit = stats.get("purge_events_explicit", 0)
    return (
        f"resident {format_bytes(stats.get('resident_bytes', 0))}, volatile "
        f"{format_bytes(stats.get('volatile_bytes', 0))}, purge events cap/pressure/explicit "
        f"{cap}/{pressure}/{explicit}, daemon RSS {format_bytes(rss)}"
    )


def run(cfg: Config, json_path: Path | None = None) -> int:
    """Run the workers (and the hostile mix); print the summary; return the exit status."""
    stats0 = read_stats(cfg.mountpoint)
    daemon = stats0.get("pid")
    rss0 = process_memory(daemon).get("VmRSS", 0) if daemon else 0
    fds0 = open_descriptors(daemon) if daemon else None
    cfg.parent = os.getpid()
    if cfg.hostile:
        os.umask(0o022)  # the owners' files must be readable by the second user
    cfg.root.mkdir()
    cfg.root.chmod(0o755)
    for i in range(cfg.procs):
        (cfg.root / f"o{i}").mkdir()
        (cfg.root / f"o{i}").chmod(0o755)
    if cfg.victims:
        cfg.victim_dir.mkdir()
        cfg.victim_dir.chmod(0o755)
    ctx = multiprocessing.get_context("fork")
    progress = ctx.RawArray("q", cfg.procs)
    stop: Synchronized[int] = ctx.Value("i", 0)
    hostile_stop = ctx.RawValue("i", 0)  # read in a tight loop by hundreds: no lock
    listing = SharedListing(ctx)
    scout_done = threading.Event()

    # Who does what in the hostile mix: (kind, k, uid or None).
    why_not = second_user_problem(cfg) if cfg.waiters or cfg.readers else None
    other = None if why_not else cfg.second_user
    plan = [("waiter", k, other if k % 2 else None) for k in range(cfg.waiters)]
    plan += [("reader", k, other if k % 2 else None) for k in range(cfg.readers)]
    plan += [("victim", k, None) for k in range(cfg.victims)]
    hostile_lines = []
    if cfg.hostile:
        as_other = sum(1 for _, _, uid in plan if uid is not None)
        hostile_lines.append(
            f"hostile mix: {cfg.waiters} waiters and {cfg.readers} readers "
            + (f"({as_other} of them as uid {other})" if other else f"(no second user: {why_not})")
            + (f", {cfg.victims} victims of {format_bytes(cfg.victim_size)}" if cfg.victims else "")
            + (f", watchdog {cfg.watchdog:g} s" if cfg.watchdog > 0 else "")
        )
        print("stress: " + hostile_lines[0], flush=True)

    pipes: list[multiprocessing.connection.Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    hostile_pipes: list[multiprocessing.connection.Connection] = []
    hostile_procs: list[multiprocessing.process.BaseProcess] = []
    aborted: list[str] = []

    def abort_once() -> None:
        if not aborted:
            aborted.append(abort_connection(cfg.mountpoint))
            print(f"stress: {aborted[0]}", flush=True)

    def on_watchdog(message: str, hung: bool) -> None:
        print(f"stress: WATCHDOG: {message}; stopping the run", flush=True)
        hostile_stop.value = 1
        stop.value = 1
        if not hung:
            return
        if daemon:
            print(f"stress: threads of the daemon (pid {daemon}):", flush=True)
            for line in thread_report(daemon):
                print("  " + line, flush=True)
            with contextlib.suppress(OSError):
                os.kill(daemon, signal.SIGUSR1)  # the daemon logs its Python stacks
            time.sleep(1)
        blocked = Counter(process_state(p.pid or 0) for p in procs + hostile_procs)
        print(f"stress: states of the tool's processes: {dict(blocked)}", flush=True)
        abort_once()

    watchdog = None
    if cfg.watchdog > 0:
        watchdog = Watchdog(cfg.mountpoint, cfg.watchdog, cfg.probe_every, on_watchdog)
        watchdog.start()

    def on_signal(signum: int, _frame: object) -> None:
        print(f"stress: signal {signum}: stopping the workers", flush=True)
        stop.value = 1
        hostile_stop.value = 1

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hostile_reports: list[Report] = []
    left: list[int] = []
    start = time.monotonic()
    reports: dict[int, Report] = {}
    hung: list[str] = []
    try:
        for i in range(cfg.procs):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker_main, args=(cfg, i, progress, stop, send), name=f"w{i}")
            p.start()
            send.close()
            pipes.append(recv)
            procs.append(p)
        if plan:
            threading.Thread(
                target=listing.scout,
                args=(cfg.root, cfg.procs, scout_done),
                name="scout",
                daemon=True,
            ).start()
        for kind, k, uid in plan:
            recv, send = ctx.Pipe(duplex=False)
            hp = ctx.Process(
                target=hostile_main,
                args=(cfg, kind, k, uid, hostile_stop, listing, send),
                name=f"{kind}{k}",
            )
            hp.start()
            send.close()
            hostile_pipes.append(recv)
            hostile_procs.append(hp)
        last_total, last_change, last_print = -1, start, start
        while len(reports) < cfg.procs:
            waiting = {id(pipes[i]): i for i in range(cfg.procs) if i not in reports}
            ready = multiprocessing.connection.wait(
                [pipes[i] for i in waiting.values()], timeout=1.0
            )
            for conn in ready:
                i = waiting[id(conn)]
                reports[i] = receive_report(pipes[i], procs[i], f"worker {i}")
            now = time.monotonic()
            if now - start >= cfg.seconds:
                hostile_stop.value = 1  # the workers settle their files in peace
            total = sum(progress)
            if total != last_total:
                last_total, last_change = total, now
            if now - last_print >= cfg.progress_every:
                last_print = now
                print(
                    f"  {now - start:6.0f} s: {total} ops, {progress_line(cfg, daemon)}", flush=True
                )
            if now - last_change > HANG_SECONDS:
                hung = [f"w{i}" for i in range(cfg.procs) if i not in reports]
                print(f"stress: no progress for {HANG_SECONDS:.0f} s; stacks follow", flush=True)
                for i in range(cfg.procs):
                    if i not in reports and procs[i].pid:
                        with contextlib.suppress(OSError):
                            os.kill(procs[i].pid or 0, signal.SIGUSR1)
                if daemon:
                    with contextlib.suppress(OSError):
                        os.kill(daemon, signal.SIGUSR1)  # the daemon logs its stacks
                time.sleep(2)
                for i in range(cfg.procs):
                    if i not in reports:
                        procs[i].kill()
                        r = Report()
                        r.unexpected_count = 1
                        r.unexpected.append(f"worker {i} hung (killed)")
                        reports[i] = r
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        stop.value = 1
        hostile_stop.value = 1
        scout_done.set()
        for wp in procs:
            wp.join(STOP_GRACE)
            if wp.is_alive():
                wp.kill()
        hostile_reports, left = finish_hostile(
            hostile_procs, hostile_pipes, [hp.name for hp in hostile_procs]
        )
        left += join_all(procs, STOP_GRACE)
        if left:  # blocked on the mount even after SIGKILL: only an abort frees them
            print(f"stress: {len(left)} processes do not die; aborting the mount", flush=True)
            abort_once()
            left = join_all(procs + hostile_procs, STOP_GRACE)
    duration = time.monotonic() - start
    total_report = Report()
    for i in sorted(reports):
        total_report.merge(reports[i])
    for r in hostile_reports:
        total_report.merge(r)
    if left:
        total_report.unexpected_count += 1
        total_report.unexpected.append(f"processes still alive at the end: {left}")

    shutil.rmtree(cfg.root, ignore_errors=True)
    try:
        stats = settled_stats(cfg.mountpoint, stats0)
    except OSError as e:
        stats = {}
        total_report.unexpected_count += 1
        total_report.unexpected.append(f"the statistics are unreadable at the end: {e!r}")
    memory = daemon_memory(daemon, stats, rss0, fds0) if daemon and stats else {}
    peak, limit = memory.get("rss_peak"), memory.get("rss_limit")
    if peak is not None and limit is not None and peak > limit:
        total_report.unexpected_count += 1
        total_report.unexpected.append(
            f"the daemon's peak RSS {format_bytes(peak)} passed memory cap + metadata cap"
            f" + 64 MiB = {format_bytes(limit)}"
        )
    probe: dict[str, Any] = {}
    if watchdog is not None:
        watchdog.stop()
        probe = watchdog.summary()
        line = (
            f"watchdog: {probe['probes']} probes of {STATS} on the root, one every "
            f"{cfg.probe_every:g} s"
        )
        if "max_ms" in probe:
            line += (
                f": latency median {probe['median_ms']:.1f} ms, p99 {probe['p99_ms']:.1f} ms, "
                f"max {probe['max_ms']:.1f} ms (deadline {cfg.watchdog:g} s)"
            )
        hostile_lines.append(line)
        if watchdog.failure:
            hostile_lines.append(f"WATCHDOG FAILURE: {watchdog.failure}")
    hostile_lines += [f"ABORTED: {text}" for text in aborted]
    failed = bool(
        total_report.corruption_count
        or total_report.unexpected_count
        or hung
        or (watchdog is not None and watchdog.failure)
        or aborted
    )
    print_summary(cfg, total_report, duration, stats0, stats, memory, failed, hostile_lines)
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "seed": cfg.seed,
                    "procs": cfg.procs,
                    "seconds": duration,
                    "ops": dict(total_report.ops),
                    "errors": dict(total_report.errors),
                    "corruptions": total_report.corruption_count,
                    "unexpected": total_report.unexpected_count,
                    "notes": dict(total_report.notes),
                    "latency_max": total_report.latency_max,
                    "stats": stats,
                    "daemon_memory": memory,
                    "hostile": {
                        "waiters": cfg.waiters,
                        "readers": cfg.readers,
                        "victims": cfg.victims,
                        "second_user": other,
                        "second_user_processes": sum(1 for *_, uid in plan if uid is not None),
                        "no_second_user": why_not,
                    },
                    "watchdog": probe,
                    "aborted": aborted,
                    "ok": not failed,
                },
                indent=2,
            )
        )
    return 1 if failed else 0


def print_summary(
    cfg: Config,
    report: Report,
    duration: float,
    stats0: dict[str, int],
    stats: dict[str, int],
    memory: dict[str, int | None],
    failed: bool,
    hostile_lines: Sequence[str] = (),
) -> None:
    total = sum(report.ops.values())
    print(f"\nstress summary (seed {cfg.seed}, {cfg.procs} processes, {duration:.1f} s)")
    for line in hostile_lines:
        print(line)
    print(f"operations: {total} ({total / max(duration, 1e-9):.0f}/s)")
    for kind, n in sorted(report.ops.items(), key=lambda kv: -kv[1]):
        slowest = report.latency_max.get(kind, 0.0)
        print(f"  {kind:<16} {n:>9}   slowest {slowest * 1000:8.1f} ms")
    print("expected errors by errno:" + ("" if report.errors else " none"))
    for key, n in sorted(report.errors.items()):
        print(f"  {key:<28} {n:>9}")
    print("model notes:")
    for key, n in sorted(report.notes.items()):
        print(f"  {key:<42} {n:>9}")
    print(f"unexpected errors: {report.unexpected_count}")
    for text in report.unexpected:
        print("  " + text.replace("\n", "\n  "))
    print(f"corruptions: {report.corruption_count}")
    for text in report.corruptions:
        print("  " + text.replace("\n", "\n  "))
    if memory:
        print(memory_line(stats.get("pid", 0), memory))
    delta = {k: v - stats0.get(k, 0) for k, v in stats.items() if k != "pid"}
    print("mount statistics (change during the run):")
    for key in sorted(stats):
        if key != "pid":
            print(f"  {key:<28} {stats[key]:>14}  ({delta[key]:+d})")
    print(f"result: {'FAIL' if failed else 'OK'} (seed {cfg.seed})")


def memory_line(pid: int, memory: dict[str, int | None]) -> str:
    """The summary's line on the daemon's memory and descriptors, start against end."""

    def size(key: str) -> str:
        value = memory.get(key)
        return "?" if value is None else format_bytes(value)

    start, end = memory.get("rss_start"), memory.get("rss_end")
    change = "" if not start or end is None else f" ({format_bytes(end - start)} more)"
    return (
        f"daemon pid {pid}: RSS at start {size('rss_start')}, at end {size('rss_end')}{change},"
        f" peak {size('rss_peak')} (limit: memory cap + metadata cap + 64 MiB ="
        f" {size('rss_limit')}); open descriptors at start {memory.get('fds_start')},"
        f" at end {memory.get('fds_end')}"
    )


def settled_stats(mountpoint: Path, stats0: dict[str, int], wait: float = 10.0) -> dict[str, int]:
    """The statistics once the run's files are freed (the kernel forgets unlinked inodes
    soon after the last close), or after *wait* seconds."""
    deadline = time.monotonic() + wait
    while True:
        stats = read_stats(mountpoint)
        freed = stats.get("resident_bytes", 0) <= stats0.get("resident_bytes", 0)
        if freed or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected e.g. 4M")
    return int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Concurrent stress test of a vrangefs mount against an exact model."
    )
    parser.add_argument("mountpoint", nargs="?", type=Path, help="a mounted vrangefs")
    parser.add_argument("--mount-fresh", action="store_true", help="mount our own vrangefs")
    parser.add_argument("--memory-cap", default="64M", help="with --mount-fresh (default 64M)")
    parser.add_argument(
        "--mount-args",
        default="",
        help="with --mount-fresh: more vrangefs mount options, e.g. '--min-free 99%%' "
        "(pressure purging all the time)",
    )
    parser.add_argument("--procs", type=int, default=8, help="worker processes (default 8)")
    parser.add_argument("--seconds", type=float, default=600, help="duration (default 600)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--files", type=int, default=16, help="files in all (default 16)")
    parser.add_argument(
        "--max-file-size", type=parse_size, default=None, help="default: fits the cap"
    )
    parser.add_argument("--json", type=Path, help="also write the summary here as JSON")
    parser.add_argument("--progress", type=float, default=30, help="seconds between reports")
    hostile = parser.add_argument_group(
        "hostile mix", "processes that crowd the files being purged, and a watchdog on the root"
    )
    hostile.add_argument(
        "--mix",
        choices=("default", "hostile"),
        default="default",
        help="hostile: --waiters 200 --readers 4 --victims 1 --watchdog 15 unless given otherwise",
    )
    hostile.add_argument(
        "--waiters", type=int, help="processes looping getxattr user.vrange.purged (default 0)"
    )
    hostile.add_argument(
        "--readers",
        type=int,
        help="processes re-reading whole files with fadvise DONTNEED between passes (default 0)",
    )
    hostile.add_argument(
        "--victims",
        type=int,
        help="processes that each rewrite a file, mark it volatile and purge it, over and over, "
        "by purge-all and by writing at the cap (default 0)",
    )
    hostile.add_argument(
        "--watchdog",
        type=float,
        help="fail (and abort the mount) if the root does not answer a stats probe within this "
        "many seconds (default 15 with any of the hostile mix, else 0: off)",
    )
    hostile.add_argument(
        "--probe-every", type=float, default=0.1, help="seconds between probes (default 0.1)"
    )
    hostile.add_argument(
        "--second-user",
        type=int,
        default=65534,
        help="uid for every second waiter and reader, as root on an allow_other mount "
        "(default 65534; 0: none)",
    )
    args = parser.parse_args(argv)
    if (args.mountpoint is None) == (not args.mount_fresh):
        parser.error("give a MOUNTPOINT or --mount-fresh (one of them)")
    if not 2 <= args.procs < 255 or args.files < 1:
        parser.error("--procs must be 2 to 254 and --files at least 1")
    preset = {"waiters": 200, "readers": 4, "victims": 1} if args.mix == "hostile" else {}
    for key in ("waiters", "readers", "victims"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, 0))
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must not be negative")
    if args.watchdog is None:
        any_hostile = args.mix == "hostile" or args.waiters or args.readers or args.victims
        args.watchdog = 15.0 if any_hostile else 0.0
    if args.watchdog < 0 or args.probe_every <= 0 or args.second_user < 0:
        parser.error("--watchdog, --probe-every and --second-user must be positive (or 0)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"stress: seed {seed}", flush=True)

    def go(mountpoint: Path) -> int:
        cap = read_stats(mountpoint)["memory_cap"]
        per_file = max(cap * 3 // args.files, 4 * PAGE)
        max_file = args.max_file_size or min(16 * CHUNK, per_file // PAGE * PAGE)
        cfg = Config(
            mountpoint=mountpoint,
            root=mountpoint / f"stress-{os.getpid()}",
            procs=args.procs,
            seconds=args.seconds,
            seed=seed,
            files=args.files,
            max_file_size=max(max_file // BLOCK * BLOCK, 4 * PAGE),
            nonvolatile_budget=cap * 45 // 100 // args.procs,
            owner_target=cap * 2 // args.procs,
            progress_every=args.progress,
            waiters=args.waiters,
            readers=args.readers,
            victims=args.victims,
            memory_cap=cap,
            watchdog=args.watchdog,
            probe_every=args.probe_every,
            second_user=args.second_user,
        )
        print(
            f"stress: {cfg.procs} processes for {cfg.seconds:g} s on {mountpoint} "
            f"(memory_cap {format_bytes(cap)}), {cfg.files} files of up to "
            f"{format_bytes(cfg.max_file_size)}, non-volatile budget "
            f"{format_bytes(cfg.nonvolatile_budget)} per owner",
            flush=True,
        )
        return run(cfg, args.json)

    if not args.mount_fresh:
        return go(args.mountpoint)
    try:
        extra = shlex.split(args.mount_args)
        wants_other = (args.waiters or args.readers) and args.second_user and os.geteuid() == 0
        if wants_other and "allow_other" not in args.mount_args:
            extra += ["-o", "allow_other"]  # so that the second user can use the mount
        with fresh_mount(args.memory_cap, extra, label="stress") as mountpoint:
            status = go(mountpoint)
    except RuntimeError as e:
        print(f"stress: {e}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
