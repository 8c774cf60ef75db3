"""``vrangefs umount``: take a mount down, also when its daemon cannot answer.

Nothing here waits on the daemon without a deadline: a request to a daemon that is stopped,
deadlocked or a zombie would never return.

1. The mount is found in the mount table, never by ``stat`` (which can send a request).
2. The daemon is found without a request: the process that has /dev/fuse open on the
   mount's FUSE connection (its number is the minor device number of the mount, and
   ``/proc/PID/fdinfo`` names the connection of each /dev/fuse descriptor).
3. A stopped or exited daemon cannot answer.  A running one is asked for its statistics by
   a child process that is given :data:`PROBE_TIMEOUT` seconds.
4. A daemon that answers gets the ordinary unmount (``fusermount3 -u``); a busy mount is
   then an error, as with umount(8), and ``vrangefs umount`` waits for the daemon to exit.
5. Otherwise the mount is unmounted, lazily if it is busy.  Processes still waiting on it
   would wait forever, so the FUSE connection is then aborted through
   ``/sys/fs/fuse/connections/N/abort`` (fusectl is mounted there first if it is not).
   What was done and what was lost is said in plain words.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import Enum

from vrangefs import mountinfo, protocol
from vrangefs.config import UserError

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
"""Seconds a running daemon has to answer before it counts as hung."""
COMMAND_TIMEOUT = 10.0
"""Seconds fusermount3 (or umount, mount) may take; none of them asks the daemon."""
EXIT_TIMEOUT = 10.0
"""Seconds to wait for a daemon that answered to exit after its unmount."""
HUNG_EXIT_TIMEOUT = 2.0
"""...and for a hung one, after its connection is gone."""
CONNECTIONS = "/sys/fs/fuse/connections"


class Health(Enum):
    ANSWERS = "answers"
    GONE = "gone"  # exited: the kernel already failed every request
    ZOMBIE = "zombie"  # exited, but a thread is stuck in the kernel holding the connection
    STOPPED = "stopped"  # SIGSTOP, or a debugger
    HUNG = "hung"  # running, but no answer within PROBE_TIMEOUT


@dataclass
class Daemon:
    """What is known about the daemon of a mount, found without asking it."""

    pids: list[int] = field(default_factory=list)
    health: Health = Health.ANSWERS
    probe: int | None = None
    """A probe that did not return in time (killed; reaped once the mount is gone)."""

    def describe(self, mountpoint: str) -> str:
        """``the daemon of /mnt/cache (pid 123)``."""
        pids = f" (pid {', '.join(map(str, self.pids))})" if self.pids else ""
        return f"the daemon of {mountpoint}{pids}"


def process_state(pid: int | str) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T, t, Z, ...); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    """True while *pid* runs; an exited process its parent has not reaped yet counts as gone."""
    return process_state(pid) not in (None, "Z", "X")


def _fd_dirs(pid: str) -> list[str]:
    """/proc/PID/fd, and for a zombie the fd directories of its threads still alive."""
    dirs = [f"/proc/{pid}"]
    if process_state(pid) == "Z":
        with contextlib.suppress(OSError):
            dirs += [f"/proc/{pid}/task/{tid}" for tid in os.listdir(f"/proc/{pid}/task")]
    return dirs


def _connection_of(task_dir: str, fd: str) -> int | None:
    """The FUSE connection a /dev/fuse descriptor serves; -1 if the kernel does not say."""
    try:
        with open(f"{task_dir}/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "fuse_connection":
                    return int(value)
    except (OSError, ValueError):
        return None
    return -1


def connection_holders(connection: int) -> list[int] | None:
    """Pids with /dev/fuse open on FUSE connection *connection*, found without asking it.

    None when that cannot be known: the kernel does not name the connection in fdinfo
    (before Linux 6.x), or some process could not be looked at (another user's, as
    non-root) and no holder was found.
    """
    found: set[int] = set()
    uncertain = False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for task_dir in _fd_dirs(pid):
            try:
                fds = os.listdir(f"{task_dir}/fd")
            except PermissionError:
                uncertain = True
                continue
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"{task_dir}/fd/{fd}") != "/dev/fuse":
                        continue
                except OSError:
                    continue
                number = _connection_of(task_dir, fd)
                if number == connection:
                    found.add(int(pid))
                elif number == -1:
                    uncertain = True
    if not found and uncertain:
        return None
    return sorted(found)


def probe(mountpoint: str) -> tuple[Health, int | None, int | None]:
    """Ask the daemon for its statistics from a child process, for PROBE_TIMEOUT seconds.

    A child, not a thread: a request the daemon has already read but never answers keeps
    its sender in an uninterruptible wait until the connection ends, and a process with
    such a thread could not even exit.  Returns the health, the pid from the statistics
    if it answered with one, and the pid of the probe if it had to be killed (reap it
    once the connection is gone: :func:`_reap`).
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # the child: ask, report, exit
        try:
            os.close(read_fd)
            try:
                reply = b"ok " + os.getxattr(mountpoint, protocol.STATS)
            except OSError as e:
                reply = b"errno %d" % (e.errno or 0)
            os.write(write_fd, reply)
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        data = b""
        deadline = time.monotonic() + PROBE_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([read_fd], [], [], remaining)[0]:
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                os.waitpid(child, 0)
                return _answer(data)
            data += chunk
    finally:
        os.close(read_fd)
    os.kill(child, signal.SIGKILL)
    return Health.HUNG, None, child


def _answer(reply: bytes) -> tuple[Health, int | None, None]:
    if reply == b"errno %d" % errno.ENOTCONN:
        return Health.GONE, None, None
    if not reply.startswith(b"ok "):
        return Health.ANSWERS, None, None  # it answered, if only with an error
    try:
        pid = protocol.parse_stats(reply[len(b"ok ") :]).get("pid")
    except ValueError:
        pid = None
    return Health.ANSWERS, pid if isinstance(pid, int) else None, None


def _reap(pid: int, timeout: float) -> None:
    """Reap a killed probe once it is gone; leave it to init after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
        return


def assess(entry: mountinfo.MountEntry) -> Daemon:
    """Find the daemon of a mount and whether it can answer, without waiting on it."""
    connection = entry.fuse_connection
    holders = connection_holders(connection) if connection is not None else None
    if holders is not None and not holders:
        return Daemon([], Health.GONE)
    if holders:
        states = [process_state(pid) for pid in holders]
        if all(state in (None, "Z", "X") for state in states):
            return Daemon(holders, Health.ZOMBIE)
        if any(state in ("T", "t") for state in states):
            return Daemon(holders, Health.STOPPED)
    health, stats_pid, stuck = probe(entry.mountpoint)
    pids = holders or ([stats_pid] if stats_pid is not None else [])
    return Daemon(pids, health, stuck)


def fusermount(
    mountpoint: str, lazy: bool = False, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``fusermount3 -u [-z]`` (or umount [-l] where there is no fusermount)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] if tool else ["umount"]
    if lazy:
        cmd.append("-z" if tool else "-l")
    cmd.append(mountpoint)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 1, "", f"no answer within {timeout:.0f}s")


def _message(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}"


def fusectl_mounted() -> bool:
    return any(e.fstype == "fusectl" and e.mountpoint == CONNECTIONS for e in mountinfo.entries())


def abort_connection(connection: int) -> str:
    """Abort a FUSE connection: every request waiting on it fails at once.

    Returns what happened, in words; raises UserError if it could not be done.
    """
    if not fusectl_mounted():
        result = subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", CONNECTIONS],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT,
        )
        if result.returncode != 0:
            raise UserError(
                f"cannot abort FUSE connection {connection}: fusectl is not mounted on "
                f"{CONNECTIONS} and mounting it failed ({_message(result)}); as root: "
                f"mount -t fusectl fusectl {CONNECTIONS} && "
                f"echo 1 > {CONNECTIONS}/{connection}/abort"
            )
    directory = f"{CONNECTIONS}/{connection}"
    if not os.path.isdir(directory):
        return "its FUSE connection had already ended"
    try:
        with open(f"{directory}/waiting") as f:
            waiting = int(f.read())
    except (OSError, ValueError):
        waiting = -1
    try:
        with open(f"{directory}/abort", "w") as f:
            f.write("1")
    except FileNotFoundError:
        return "its FUSE connection had already ended"
    except OSError as e:
        raise UserError(
            f"cannot abort FUSE connection {connection} ({directory}/abort: {e.strerror})"
        ) from None
    if waiting > 0:
        return (
            f"aborted its FUSE connection ({directory}/abort): {waiting} waiting request(s) failed"
        )
    return f"aborted its FUSE connection ({directory}/abort)"


def _wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait up to *timeout* seconds for *pids* to exit; return those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if running(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    entry = mountinfo.find(mountpoint)
    if entry is None:
        raise UserError(f"{mountpoint} is not mounted")
    mountpoint = entry.mountpoint
    daemon = assess(entry)
    try:
        if daemon.health is Health.ANSWERS:
            return _unmount_answering(mountpoint, daemon)
        return _unmount_silent(mountpoint, entry, daemon)
    finally:
        if daemon.probe is not None:  # its request ended with the connection
            _reap(daemon.probe, HUNG_EXIT_TIMEOUT)


def _unmount_answering(mountpoint: str, daemon: Daemon) -> int:
    result = fusermount(mountpoint)
    if result.returncode != 0:
        raise UserError(f"cannot unmount {mountpoint}: {_message(result)}")
    left = _wait_for_exit(daemon.pids, EXIT_TIMEOUT)
    for pid in left:
        log.warning("daemon %d still running %.0fs after unmount", pid, EXIT_TIMEOUT)
    return 0


def _unmount_silent(mountpoint: str, entry: mountinfo.MountEntry, daemon: Daemon) -> int:
    """Unmount a mount whose daemon cannot answer; say what was done and lost."""
    if daemon.health is Health.GONE:
        result = fusermount(mountpoint, lazy=True)
        if result.returncode != 0:
            raise UserError(f"cannot unmount {mountpoint}: {_message(result)}")
        print(
            f"vrangefs: {mountpoint} was a dead mount (its daemon had died); cleaned up."
            " Data held in it is lost.",
            file=sys.stderr,
        )
        return 0
    why = {
        Health.ZOMBIE: "has exited, but a thread of it is stuck in the kernel",
        Health.STOPPED: "is stopped (SIGSTOP or a debugger)",
        Health.HUNG: f"does not answer (no reply within {PROBE_TIMEOUT:.0f}s)",
    }[daemon.health]
    done = []
    result = fusermount(mountpoint)
    if result.returncode == 0:
        done.append(f"unmounted {mountpoint}")
    else:  # busy: processes use it, some perhaps waiting on the daemon
        lazy = fusermount(mountpoint, lazy=True)
        if lazy.returncode != 0:
            raise UserError(
                f"cannot unmount {mountpoint} ({daemon.describe(mountpoint)} {why}): "
                f"{_message(lazy)}"
            )
        done.append(f"detached {mountpoint} (lazy unmount: it was busy)")
        connection = entry.fuse_connection
        if connection is not None:
            try:
                done.append(abort_connection(connection))
            except UserError as e:
                print(f"vrangefs: {mountpoint}: {'; '.join(done)}", file=sys.stderr)
                raise UserError(f"{e}; processes waiting on it stay blocked") from None
    lost = f"The data held in {mountpoint} is lost."
    left = daemon.pids
    if daemon.health is not Health.STOPPED:
        left = _wait_for_exit(daemon.pids, HUNG_EXIT_TIMEOUT)
    if daemon.health is Health.STOPPED and left:
        after = " It exits once continued (kill -CONT " + " ".join(map(str, left)) + ") or killed."
    elif left:
        after = " It is still running: kill it (kill " + " ".join(map(str, left)) + ")."
    else:
        after = " It has exited."
    print(
        f"vrangefs: {daemon.describe(mountpoint)} {why}; {', '.join(done)}. {lost}{after}",
        file=sys.stderr,
    )
    return 0
