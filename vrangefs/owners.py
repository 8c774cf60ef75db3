"""The processes that hold pins: who a request comes from, and noticing when it exits.

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

Every process that holds pins is watched through a pidfd (``os.pidfd_open``),
opened before its first pin is recorded.  The pidfds are gathered in one epoll
set, on which the event loop waits (``trio.lowlevel.wait_readable``; one task
for all processes, no task per process).  The kernel makes a pidfd readable as
soon as its process has exited, however it exits (``exit``, a signal,
``kill -9``, the OOM killer), before anyone reaps it; the watcher then has the
process's pins dropped at once.  Nothing polls the process table.  A process
that holds no pin any more is no longer watched: the pin table reports it
(:meth:`ProcessWatcher.owner_gone`) and its pidfd is closed, so the daemon
holds one descriptor per process that holds pins.

Finding the process is the costly part of a pin or unpin request (opening
and formatting a /proc status file), so the common case skips it: the calling
thread is the main thread of its process (``tid == tgid``; every
single-threaded program) exactly when ``pidfd_open(tid)`` succeeds, since it
refuses any other thread (EINVAL).  A process already watched needs not even
that: every identification first handles the exits the epoll set reports, so
a watched pid names a live process (whose id cannot have been reused).  The
pidfd opened to identify a caller is kept for :meth:`ProcessWatcher.watch`,
which a pin calls next.  Other threads, and requests that need the caller's
groups and privilege, read the status file as before.

This is the adapter's side of pins, next to :mod:`vrangefs.invalidation`:
the core (:mod:`vrangefs.pins`) only counts and releases.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass

import trio

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


class ProcessWatcher:
    """Finds out who calls; calls *on_exit(tgid)* once a watched process has exited."""

    def __init__(self, on_exit: Callable[[int], object], proc: str = "/proc") -> None:
        self._on_exit = on_exit
        self._proc = proc
        self._pidfds: dict[int, int] = {}  # tgid -> pidfd
        self._tgids: dict[int, int] = {}  # pidfd -> tgid
        self._epoll = select.epoll()  # every pidfd: one descriptor for the event loop
        self._spare: tuple[int, int] | None = None  # (tgid, pidfd) opened by identify()
        self._real_proc = os.path.realpath(proc) == "/proc"  # pidfds describe its processes
        self._own_user_ns = _user_ns(proc, "self")
        self.proc_problem = _proc_problem(proc)
        if self.proc_problem is not None:
            log.warning("pins are refused: %s", self.proc_problem)

    def identify(self, tid: int, credentials: bool = False) -> Process:
        """The process of the calling thread *tid* (FUSE's ``ctx.pid``); ESRCH if unknown.

        Its groups and privilege are read only with *credentials* (the daemon's own
        permission check needs them; the other pin names do not): without, they are
        empty and False.
        """
        if self.proc_problem is not None:
            raise FsError(errno.ESRCH, f"pins are refused: {self.proc_problem}")
        if tid <= 0:
            raise FsError(
                errno.ESRCH,
                "the calling process is not visible in the daemon's pid namespace: "
                "it cannot hold pins",
            )
        self._drop_spare()  # a pidfd of an earlier request may name a process gone since
        self._handle_exits()  # so that a watched pid is one of a live process, not reused
        if not credentials and self._real_proc and self._is_leader(tid):
            return Process(tid, frozenset(), False)
        try:
            fd = os.open(f"{self._proc}/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                status = os.read(fd, 16384)
            finally:
                os.close(fd)
        except OSError as e:
            raise FsError(errno.ESRCH, f"cannot identify thread {tid}: {e.strerror}") from None
        try:
            tgid = int(_field(status, b"Tgid"))
            if not credentials:
                return Process(tgid, frozenset(), False)
            groups = frozenset(int(g) for g in _field(status, b"Groups").split())
            caps = int(_field(status, b"CapEff"), 16)
        except ValueError:
            raise FsError(errno.ESRCH, f"cannot identify thread {tid}: bad status") from None
        user_ns = _user_ns(self._proc, str(tid)) if caps & _READ_ANY else None
        privileged = user_ns is not None and user_ns == self._own_user_ns
        return Process(tgid, groups, privileged)

    def _is_leader(self, tid: int) -> bool:
        """Whether thread *tid*, blocked in a request, is its process's main thread.

        True for a watched process (alive: identify() handled the exits first) and where
        ``pidfd_open`` accepts *tid* (the pidfd is then kept for the watch() of this
        request; the next identify() closes it if unused).  False tells nothing: the
        caller reads /proc.
        """
        if tid in self._pidfds:
            return True
        try:
            fd = os.pidfd_open(tid)
        except OSError:  # EINVAL: another thread; ESRCH, EMFILE: /proc will tell
            return False
        self._spare = (tid, fd)
        return True

    def _drop_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare[1])
            self._spare = None

    # -- watching ---------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of processes watched."""
        return len(self._pidfds)

    def watch(self, tgid: int) -> None:
        """Watch *tgid* until it exits or holds no pin (idempotent).

        ESRCH if it is gone already; EMFILE or ENFILE if the daemon has no
        descriptor left for it (it then cannot pin).
        """
        if tgid in self._pidfds:
            return
        if self._spare is not None and self._spare[0] == tgid:
            fd, self._spare = self._spare[1], None
            self._add(tgid, fd)
            return
        try:
            fd = os.pidfd_open(tgid)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                log.warning("cannot watch process %d: %s", tgid, e.strerror)
                raise FsError(e.errno, f"cannot watch process {tgid}: {e.strerror}") from None
            raise FsError(errno.ESRCH, f"process {tgid} is gone: {e.strerror}") from None
        self._add(tgid, fd)

    def _add(self, tgid: int, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._pidfds[tgid] = fd
        self._tgids[fd] = tgid

    def owner_gone(self, tgid: int) -> None:
        """*tgid* holds no pin any more: stop watching it (the pin table's listener)."""
        fd = self._pidfds.pop(tgid, None)
        if fd is not None:
            del self._tgids[fd]
            self._epoll.unregister(fd)
            os.close(fd)

    async def run(self) -> None:
        """Report exits until cancelled (a task of the daemon's nursery).

        One task for all processes: the event loop waits on the epoll set of every
        pidfd, which is readable while any of them is.  Events are handled right
        after the poll, with no await in between, so none can name a descriptor
        closed and reused meanwhile.
        """
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            self._handle_exits()

    def _handle_exits(self) -> None:
        """Release the pins of every watched process that has exited (no await)."""
        for fd, _ in self._epoll.poll(0):
            tgid = self._tgids.get(fd)
            if tgid is None:
                continue
            self.owner_gone(tgid)
            try:
                self._on_exit(tgid)
            except Exception:  # a bug: its pins may stay, the daemon serves on
                log.exception("releasing the pins of process %d failed", tgid)


def _field(status: bytes, name: bytes) -> bytes:
    """The value of the line ``NAME:\tvalue`` of a /proc status file (ValueError if none)."""
    start = status.find(b"\n" + name + b":")
    if start < 0:
        raise ValueError(f"no {name!r} in the status")
    start += len(name) + 2
    end = status.find(b"\n", start)
    return status[start : end if end >= 0 else len(status)].strip()


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
