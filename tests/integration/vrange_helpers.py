"""Helpers for the volatile-range integration tests (``test_vrange_*.py``, eviction).

The ``user.vrange.*`` names and value formats are spelled out here from the contract, not
imported from the package, so that the tests check the contract rather than the code's own
idea of it; only the statistics are read with the package's one parser of them
(:func:`vrangefs.protocol.read_stats`, itself tested against the contract's format).

Child processes are made with ``os.fork`` so that a test can drop privileges, die of
SIGBUS or run many clients at once without touching the pytest process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.integration.conftest import Mount, Mounter
from vrangefs.protocol import int_stats, read_stats

PAGE = 4096
VOLATILE = "user.vrange.volatile"
NONVOLATILE = "user.vrange.nonvolatile"
PURGED = "user.vrange.purged"
STATS = "user.vrange.stats"
PURGE = "user.vrange.purge"
STATS_KEYS = (
    "pid",
    "memory_cap",
    "resident_bytes",
    "volatile_bytes",
    "purged_bytes_total",
    "purge_events",
)

Target = str | Path | int
Ranges = list[tuple[int, int]]


def _target(target: Target) -> str | int:
    return target if isinstance(target, int) else os.fspath(target)


def parse_ranges(value: bytes) -> Ranges:
    """``OFFSET,LENGTH`` lines (the contract's reply format) as pairs; checks the format."""
    text = value.decode()
    assert text == "" or text.endswith("\n"), f"reply not newline-terminated: {value!r}"
    out = []
    for line in text.splitlines():
        offset, length = line.split(",")
        assert offset.isdigit() and length.isdigit(), f"bad range line {line!r}"
        out.append((int(offset), int(length)))
    assert out == sorted(out), f"ranges not sorted by offset: {value!r}"
    return out


def mark(target: Target, value: str) -> None:
    os.setxattr(_target(target), VOLATILE, value.encode())


def unmark(target: Target, value: str) -> None:
    os.setxattr(_target(target), NONVOLATILE, value.encode())


def volatile(target: Target) -> Ranges:
    return parse_ranges(os.getxattr(_target(target), VOLATILE))


def purged(target: Target) -> Ranges:
    return parse_ranges(os.getxattr(_target(target), PURGED))


def stats(mountpoint: Path) -> dict[str, int]:
    """The numeric ``key=value`` lines of ``user.vrange.stats`` (a malformed line fails)."""
    return int_stats(read_stats(mountpoint))


def purge_all(mountpoint: Path) -> None:
    os.setxattr(mountpoint, PURGE, b"all")


def make_file(path: Path, data: bytes) -> bytes:
    path.write_bytes(data)
    return data


def pattern(pages: int, seed: int = 0, tail: int = 0) -> bytes:
    """Distinct, recognisable content: every page differs from every other (no zero pages)."""
    out = bytearray()
    for page in range(pages):
        stamp = f"[seed {seed} page {page}]".encode()
        out += (stamp * (PAGE // len(stamp) + 1))[:PAGE]
    return bytes(out) + b"T" * tail


# -- mounts -------------------------------------------------------------------------------
def module_mount(
    factory: pytest.TempPathFactory,
    cap: str = "64M",
    options: Sequence[str] = (),
    args: Sequence[str] = (),
) -> Iterator[Mount]:
    """The body of a module-scoped mount fixture: one mount, unmounted (and checked) after."""
    mounter = Mounter(factory.mktemp("logs"))
    try:
        yield mounter.mount(cap, options=options, args=args)
    finally:
        mounter.close()


def new_dir(mount: Mount) -> Path:
    """A new directory of its own on a mount that several tests share."""
    return Path(tempfile.mkdtemp(dir=mount.path))


# -- child processes --------------------------------------------------------------------
def fork_child(fn: Callable[[], object]) -> tuple[int, int]:
    """Run *fn* in a forked child; return (pid, read end of a pipe carrying its JSON result).

    The child exits 0 after writing ``fn()``'s result, or 99 after writing the traceback.
    It never returns into the caller's code.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(read_fd)
            faulthandler.disable()  # die of the signal itself, silently
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            try:
                payload = json.dumps({"ok": fn()})
                code = 0
            except BaseException:
                payload = json.dumps({"error": traceback.format_exc()})
            os.write(write_fd, payload.encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def join_child(pid: int, read_fd: int) -> tuple[int, object]:
    """Wait for a child of :func:`fork_child`: (wait status, its result or None if none)."""
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return status, None
    decoded = json.loads(data)
    assert "error" not in decoded, f"child {pid} failed:\n{decoded['error']}"
    return status, decoded["ok"]


def in_child(fn: Callable[[], object]) -> object:
    """Run *fn* in a forked child and return its result; fails if the child did not exit 0."""
    status, result = join_child(*fork_child(fn))
    assert os.waitstatus_to_exitcode(status) == 0, f"child ended with status {status:#x}"
    return result


def child_signal(fn: Callable[[], object]) -> int | None:
    """Run *fn* in a forked child; return the signal that killed it, None if it exited 0."""
    status, _ = join_child(*fork_child(fn))
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, f"child exited with {os.WEXITSTATUS(status)}"
    return None


def as_nobody(fn: Callable[[], object]) -> object:
    """Run *fn* in a child whose real and effective ids are nobody's (65534)."""

    def drop_and_run() -> object:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        assert os.geteuid() == 65534
        return fn()

    return in_child(drop_and_run)


def errno_or_value(fn: Callable[[], object]) -> object:
    """fn()'s value, or ``{"errno": N}`` if it raised OSError (JSON-friendly)."""
    try:
        return fn()
    except OSError as e:
        return {"errno": e.errno}
