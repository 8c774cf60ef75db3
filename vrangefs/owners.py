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
opened before its first pin is recorded and waited on by the event loop
(``trio.lowlevel.wait_readable``, one small task per process).  The kernel
makes a pidfd readable as soon as its process has exited, however it exits
(``exit``, a signal, ``kill -9``, the OOM killer), before anyone reaps it; the
watcher then has the process's pins dropped at once.  Nothing polls the
process table.  A process that holds no pin any more is no longer watched: the
pin table reports it (:meth:`ProcessWatcher.owner_gone`) and its pidfd is
closed, so the daemon holds one descriptor per process that holds pins.

This is the adapter's side of pins, next to :mod:`vrangefs.invalidation`:
the core (:mod:`vrangefs.pins`) only counts and releases.
"""

from __future__ import annotations

import errno
import logging
import os
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


class _Watch:
    """One watched process: its pidfd, and whether a task waits on it."""

    __slots__ = ("fd", "waited")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.waited = False


class ProcessWatcher:
    """Finds out who calls; calls *on_exit(tgid)* once a watched process has exited."""

    def __init__(self, on_exit: Callable[[int], object], proc: str = "/proc") -> None:
        self._on_exit = on_exit
        self._proc = proc
        self._watches: dict[int, _Watch] = {}
        self._nursery: trio.Nursery | None = None
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

    # -- watching ---------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of processes watched."""
        return len(self._watches)

    def watch(self, tgid: int) -> None:
        """Watch *tgid* until it exits or holds no pin (idempotent).

        ESRCH if it is gone already; EMFILE or ENFILE if the daemon has no
        descriptor left for it (it then cannot pin).
        """
        if tgid in self._watches:
            return
        try:
            fd = os.pidfd_open(tgid)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                log.warning("cannot watch process %d: %s", tgid, e.strerror)
                raise FsError(e.errno, f"cannot watch process {tgid}: {e.strerror}") from None
            raise FsError(errno.ESRCH, f"process {tgid} is gone: {e.strerror}") from None
        watch = self._watches[tgid] = _Watch(fd)
        self._start(tgid, watch)

    def owner_gone(self, tgid: int) -> None:
        """*tgid* holds no pin any more: stop watching it (the pin table's listener)."""
        watch = self._watches.pop(tgid, None)
        if watch is None:
            return
        if watch.waited:
            trio.lowlevel.notify_closing(watch.fd)  # its task ends
        os.close(watch.fd)

    async def run(self) -> None:
        """Host the watching tasks until cancelled (a task of the daemon's nursery)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for tgid, watch in list(self._watches.items()):
                    self._start(tgid, watch)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for watch in self._watches.values():
                watch.waited = False  # their tasks are gone: a new run starts them again

    def _start(self, tgid: int, watch: _Watch) -> None:
        if self._nursery is not None and not watch.waited:
            watch.waited = True
            self._nursery.start_soon(self._wait, tgid, watch)

    async def _wait(self, tgid: int, watch: _Watch) -> None:
        if self._watches.get(tgid) is not watch:
            return  # unwatched before this task ran: its fd is closed (and may be reused)
        try:
            await trio.lowlevel.wait_readable(watch.fd)
        except trio.ClosedResourceError:
            return  # no longer watched
        if self._watches.get(tgid) is not watch:
            return  # unwatched after it became readable: its fd is closed already
        del self._watches[tgid]
        os.close(watch.fd)
        try:
            self._on_exit(tgid)
        except Exception:  # a bug: its pins may stay, the daemon serves on
            log.exception("releasing the pins of process %d failed", tgid)


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
