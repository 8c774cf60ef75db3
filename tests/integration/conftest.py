"""Real mounts for integration tests.

Every mount is made by the real ``vrangefs mount`` command in its own process
and is unmounted when its fixture ends, whether the test passed or not
(``vrangefs umount``, falling back to ``fusermount3 -u -z``).  After the unmount
the fixture checks that the daemon exited with status 0 and logged no error.

The daemon's exit status is knowable because this process makes itself a
*child subreaper*: when ``vrangefs mount`` returns, its daemon is re-parented to
us and we can ``waitpid`` it.  Where that fails (the daemon is not our child)
the fixture still waits for it to exit.  The daemon's pid comes from the
``pid=`` line of ``user.vrange.stats``, else from the ``daemon pid N`` message
of ``vrangefs mount``, else from the process table.

Without /dev/fuse or fusermount3 the integration tests are skipped, except
under CI (the ``CI`` environment variable), where they fail instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_until
from vrangefs import mountinfo, unmount
from vrangefs.protocol import int_stats, read_stats

_VENV_CLI = Path(sys.executable).with_name("vrangefs")
VRANGEFS: list[str] = [str(_VENV_CLI)] if _VENV_CLI.exists() else [sys.executable, "-m", "vrangefs"]
PR_SET_CHILD_SUBREAPER = 36
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
_LOG_PROBLEM = re.compile(r" (ERROR|CRITICAL): |Traceback \(most recent call last\)")


# -- environment ------------------------------------------------------------------
def fuse_missing() -> str | None:
    """Why FUSE cannot be used here, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


@pytest.fixture(scope="session", autouse=True)
def _fuse_required() -> None:
    reason = fuse_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"integration tests need FUSE, and CI is set: {reason}")
    pytest.skip(f"FUSE unavailable: {reason}")


def become_subreaper() -> None:
    """Adopt orphaned descendants (the daemons) so that their exit status is ours to read."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


# -- mount table ----------------------------------------------------------------------
def mount_entry(path: str | Path) -> tuple[str, str] | None:
    """(fstype, source) of the mount at *path*, or None; dead FUSE mounts count."""
    entry = mountinfo.find(path)
    return (entry.fstype, entry.source) if entry is not None else None


def is_mounted(path: str | Path) -> bool:
    return mountinfo.is_mounted(path)


def serving_pids(path: str | Path) -> list[int]:
    """Pids whose command line is ``... vrangefs mount PATH ...`` (like ``pgrep -f``).

    No mount is touched: another test's daemon may be hung, and resolving its mount
    point (``realpath`` stats it) would hang this test too.  A relative PATH is taken
    from the process's working directory.
    """
    target = os.path.realpath(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-2]):
            if arg.endswith("vrangefs") and argv[i + 1] == "mount":
                point = argv[i + 2]
                if not os.path.isabs(point):
                    with contextlib.suppress(OSError):
                        point = os.path.join(os.readlink(f"/proc/{entry}/cwd"), point)
                if os.path.normpath(point) == target:
                    found.append(int(entry))
                break
    return found


def abort_connection(path: str | Path) -> None:
    """Last resort for a mount that stopped answering: abort its FUSE connection.

    Its requests then fail at once, so that the teardown can unmount it.  (fusectl is
    mounted on /sys/fs/fuse/connections first if need be.)
    """
    entry = mountinfo.find(path)
    if entry is not None and entry.fuse_connection is not None:
        unmount.abort_connection(entry.fuse_connection)


def mount_stats(path: str | Path) -> dict[str, int]:
    """The integer statistics of the mount at *path* (empty if unavailable)."""
    try:
        return int_stats(read_stats(path))
    except (OSError, ValueError):
        return {}


def stats_pid(path: str | Path) -> int | None:
    """The ``pid=`` line of the mount's ``user.vrange.stats``, if the daemon has one."""
    return mount_stats(path).get("pid")


def find_daemon_pid(path: str | Path, mount_stderr: str = "") -> int | None:
    pid = stats_pid(path)
    if pid is not None:
        return pid
    match = re.search(r"daemon pid (\d+)", mount_stderr)
    if match:
        return int(match[1])
    pids = serving_pids(path)
    return pids[0] if len(pids) == 1 else None


# -- processes --------------------------------------------------------------------------
def _is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@dataclass
class Daemon:
    """A daemon process we may or may not be able to reap."""

    pid: int | None
    popen: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    reaped: bool = False

    def poll(self) -> bool:
        """True once the process has exited; reaps it (and records its status) if ours."""
        if self.reaped or self.pid is None:
            return True
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return False
            self.returncode, self.reaped = code, True
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not our child: its status is not ours to know
            if _is_zombie_or_gone(self.pid):
                self.reaped = True
            return self.reaped
        if pid == 0:
            return False
        self.returncode, self.reaped = os.waitstatus_to_exitcode(status), True
        return True


@dataclass
class Mount:
    """One live (or once live) vrangefs mount."""

    path: Path
    daemon: Daemon
    log: Path | None
    check_log: bool = True
    expect_status: int = 0

    @property
    def pid(self) -> int | None:
        return self.daemon.pid

    def used_bytes(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def size_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize


def run_cli(
    args: Sequence[str], timeout: float = MOUNT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VRANGEFS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class Mounter:
    """Makes mounts and guarantees they are gone, and their daemons exited 0, at close()."""

    def __init__(self, log_dir: Path) -> None:
        become_subreaper()
        self.log_dir = log_dir
        # Mount points live where every user can reach them (pytest's tmp dirs are 0700),
        # so that tests can act as another user.
        self.base = Path(tempfile.mkdtemp(prefix="vrangefs-test-", dir="/tmp"))
        self.base.chmod(0o755)
        self.mounts: list[Mount] = []
        self._count = 0

    def mountpoint(self, name: str | None = None) -> Path:
        self._count += 1
        path = self.base / (name or f"mnt{self._count}")
        path.mkdir()
        return path

    def log_path(self) -> Path:
        return self.log_dir / f"daemon{self._count}-{len(self.mounts)}.log"

    def mount(
        self,
        memory_cap: str = "64M",
        *,
        options: Sequence[str] = (),
        args: Sequence[str] = (),
        path: Path | None = None,
    ) -> Mount:
        """``vrangefs mount`` in the background; fails the test unless it mounted."""
        path = path or self.mountpoint()
        log = self.log_path()
        cmd = ["mount", str(path), "--memory-cap", memory_cap, "--log-file", str(log)]
        for opt in options:
            cmd += ["-o", opt]
        result = run_cli([*cmd, *args])
        mount = self.adopt(path, result.stderr, log)
        assert result.returncode == 0, f"vrangefs mount failed: {result.stderr}"
        assert is_mounted(path), f"{path} not mounted after vrangefs mount returned"
        return mount

    def adopt(self, path: Path, mount_stderr: str = "", log: Path | None = None) -> Mount:
        """Take charge of a mount made by the test itself (so it is cleaned up)."""
        pid = find_daemon_pid(path, mount_stderr) if is_mounted(path) else None
        mount = Mount(path, Daemon(pid), log)
        self.mounts.append(mount)
        return mount

    def foreground(self, args: Sequence[str] = (), path: Path | None = None) -> Mount:
        """``vrangefs mount --foreground`` as our child; returns once mounted."""
        path = path or self.mountpoint()
        log = self.log_path()
        cmd = [*VRANGEFS, "mount", str(path), "--foreground", "--log-file", str(log), *args]
        with open(self.log_dir / f"stderr{self._count}.txt", "wb") as stderr:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=stderr)
        mount = Mount(path, Daemon(proc.pid, popen=proc), log)
        self.mounts.append(mount)

        def mounted_or_dead() -> bool:
            return is_mounted(path) or proc.poll() is not None

        wait_until(mounted_or_dead, MOUNT_TIMEOUT, f"{path} mounted")
        assert proc.poll() is None, f"foreground daemon exited early: {proc.returncode}"
        wait_until(lambda: os.path.ismount(path), MOUNT_TIMEOUT, f"{path} answers")
        return mount

    def run_reaping(self, args: Sequence[str], mount: Mount) -> subprocess.CompletedProcess[str]:
        """Run a command (e.g. an unmount) while reaping *mount*'s daemon if it exits.

        As the daemon's subreaper we must reap it while a command such as
        ``vrangefs umount`` waits for it to exit: unreaped, it is a zombie
        that still looks alive to ``kill(pid, 0)``.
        """
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def done() -> bool:
                mount.daemon.poll()
                return proc.poll() is not None

            wait_until(done, MOUNT_TIMEOUT, f"{' '.join(args)} finishes")
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(list(args), proc.returncode, out, err)

    def unmount(self, mount: Mount) -> subprocess.CompletedProcess[str] | None:
        """Unmount (if still mounted) and wait for the daemon to exit; records its status.

        Returns how ``vrangefs umount`` ended, or None if nothing was mounted.
        """
        path = mount.path
        result = None
        if is_mounted(path):
            result = self.run_reaping([*VRANGEFS, "umount", str(path)], mount)
        if is_mounted(path):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
        try:
            wait_until(mount.daemon.poll, EXIT_TIMEOUT, f"daemon {mount.pid} exits")
        except AssertionError:
            if mount.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(mount.pid, signal.SIGKILL)
                wait_until(mount.daemon.poll, EXIT_TIMEOUT, f"daemon {mount.pid} dies")
            raise
        return result

    def problems(self, mount: Mount) -> list[str]:
        out = []
        if is_mounted(mount.path):
            out.append(f"{mount.path} is still mounted")
        if mount.daemon.returncode not in (mount.expect_status, None):
            out.append(f"daemon of {mount.path} exited with status {mount.daemon.returncode}")
        if mount.check_log and mount.log is not None and mount.log.exists():
            text = mount.log.read_text(errors="replace")
            if _LOG_PROBLEM.search(text):
                out.append(f"daemon of {mount.path} logged errors:\n{text[-4000:]}")
        return out

    def close(self) -> None:
        """Unmount everything; then fail if anything stayed mounted or exited badly."""
        problems: list[str] = []
        for mount in self.mounts:
            try:
                self.unmount(mount)
            except (AssertionError, OSError, subprocess.SubprocessError) as e:
                problems.append(f"cleaning up {mount.path}: {e}")
            problems += self.problems(mount)
        for path in sorted(self.base.iterdir(), reverse=True):
            if not is_mounted(path):
                with contextlib.suppress(OSError):
                    path.rmdir()
        with contextlib.suppress(OSError):
            self.base.rmdir()
        assert not problems, "\n".join(problems)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    """A factory for mounts that all end with the test."""
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def fresh(mounter: Mounter) -> Mount:
    """A new 64 MiB mount for this test alone (for exact accounting)."""
    return mounter.mount("64M")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount (256 MiB, allow_other) for a whole module; tests use ``work`` in it."""
    m = Mounter(tmp_path_factory.mktemp("logs"))
    try:
        yield m.mount("256M", options=["allow_other"])
    finally:
        m.close()


@pytest.fixture
def work(shared: Mount) -> Iterator[Path]:
    """A fresh directory on the shared mount, removed afterwards.

    Once it is removed the mount must hold no data again: nothing a test did
    may leak pages (released files free their data, within a deadline, since
    the kernel sends RELEASE after close returns), and, where the daemon
    reports ``inodes`` in its stats, no inode but the root may stay (the
    kernel forgets removed inodes once nothing uses them).
    """
    path = Path(tempfile.mkdtemp(dir=shared.path))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
    wait_until(lambda: shared.used_bytes() == 0, 10, "shared mount back to 0 bytes used")
    if "inodes" in mount_stats(shared.path):

        def only_root_left() -> bool:
            return mount_stats(shared.path).get("inodes") == 1

        wait_until(only_root_left, 10, "the daemon frees every removed inode")


def errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """Call fn(*args, **kwargs) and return the errno it raised (0 if none)."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno or -1
    return 0
