"""The processes that hold pins: who a request comes from.

FUSE tells the daemon which *thread* made a request (the request context's
``pid``: the thread id in the mount's pid namespace, 0 if the caller cannot be
seen from there).  A pin belongs to the process, its thread group, so the
thread-group id is read from ``/proc/<tid>/status`` while the request is in
flight: the calling thread is blocked in its system call, so its process has
not exited and its ids cannot have been reused.  A caller that cannot be
resolved (another pid namespace, a /proc that is not the daemon's) is refused
with ESRCH.  The same read gives what a pin through a ``system.vrange.`` name
needs for the daemon's own read-permission check: the supplementary groups,
and whether the process may read any file.

This is the adapter's side of pins, next to :mod:`vrangefs.invalidation`:
the core (:mod:`vrangefs.pins`) only counts and releases.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from vrangefs.errors import FsError

log = logging.getLogger(__name__)

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_READ_ANY = 1 << CAP_DAC_OVERRIDE | 1 << CAP_DAC_READ_SEARCH


@dataclass(frozen=True, slots=True)
class Process:
    """What the daemon needs to know of a calling process."""

    tgid: int
    groups: frozenset[int]  # supplementary groups
    privileged: bool  # CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH in the daemon's user namespace


class ProcessIdentifier:
    """Finds out which process a request comes from (see the module docstring)."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._own_user_ns = _user_ns(proc, "self")
        self.proc_problem = _proc_problem(proc)
        if self.proc_problem is not None:
            log.warning("pins are refused: %s", self.proc_problem)

    def identify(self, tid: int) -> Process:
        """The process of the calling thread *tid* (FUSE's ``ctx.pid``); ESRCH if unknown."""
        if self.proc_problem is not None:
            raise FsError(errno.ESRCH, f"pins are refused: {self.proc_problem}")
        if tid <= 0:
            raise FsError(
                errno.ESRCH,
                "the calling process is not visible in the daemon's pid namespace: "
                "it cannot hold pins",
            )
        try:
            with open(f"{self._proc}/{tid}/status", "rb") as f:
                status = f.read()
        except OSError as e:
            raise FsError(errno.ESRCH, f"cannot identify thread {tid}: {e.strerror}") from None
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        try:
            tgid = int(fields[b"Tgid"])
            groups = frozenset(int(g) for g in fields.get(b"Groups", b"").split())
            caps = int(fields.get(b"CapEff", b"0"), 16)
        except (KeyError, ValueError):
            raise FsError(errno.ESRCH, f"cannot identify thread {tid}: bad status") from None
        user_ns = _user_ns(self._proc, str(tid)) if caps & _READ_ANY else None
        privileged = user_ns is not None and user_ns == self._own_user_ns
        return Process(tgid, groups, privileged)


def _user_ns(proc: str, pid: str) -> int | None:
    try:
        return os.stat(f"{proc}/{pid}/ns/user").st_ino
    except OSError:
        return None


def _proc_problem(proc: str) -> str | None:
    """Why *proc* cannot tell the daemon who calls, or None if it can."""
    try:
        me = os.readlink(f"{proc}/self")
    except OSError as e:
        return f"{proc} cannot be read ({e.strerror})"
    if me != str(os.getpid()):
        return f"{proc} belongs to another pid namespace than the daemon"
    return None
