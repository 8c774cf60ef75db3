"""``vrangefs umount`` of a mount whose daemon cannot answer: never a hang (issue 15, item 4).

A daemon that is stopped (SIGSTOP), killed (SIGKILL), or alive but not serving requests (its
cgroup frozen) is unmounted by ``vrangefs umount`` within DEADLINE seconds: the mount is
gone, one line says what was done and what was lost, and a process that was waiting on the
mount is released (its request fails) instead of waiting forever.  Every test lets its
daemon go again in a ``finally`` (SIGCONT, thaw), so the fixture unmounts and reaps it even
when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter, errno_of, is_mounted, run_cli

DEADLINE = 15.0
_STAT = (
    "import os, sys\ntry:\n    os.stat(sys.argv[1])\nexcept OSError as e:\n    sys.exit(e.errno)\n"
)


def _blocked_in_fuse(pid: int) -> bool:
    """True while *pid* waits for a FUSE daemon's answer."""
    for name in ("wchan", "stack"):
        with contextlib.suppress(OSError):
            if "request_wait_answer" in Path(f"/proc/{pid}/{name}").read_text():
                return True
    return False


@contextlib.contextmanager
def waiting_process(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process blocked in a lookup on the mount (a name never seen, so it reaches the daemon)."""
    proc = subprocess.Popen([sys.executable, "-c", _STAT, str(path / f"never-{uuid.uuid4()}")])
    try:
        wait_until(lambda: _blocked_in_fuse(proc.pid), 10, "a process waits on the mount")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DEADLINE)


def umount(mount: Mount) -> tuple[subprocess.CompletedProcess[str], str]:
    """``vrangefs umount``, which must return within DEADLINE with one line; (result, line)."""
    start = time.monotonic()
    try:
        result = run_cli(["umount", str(mount.path)], timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vrangefs umount still running after {DEADLINE:.0f}s")
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert took < DEADLINE
    assert not is_mounted(mount.path)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result, lines[0]


def test_stopped_daemon(mounter: Mounter) -> None:
    mount = mounter.mount("8M")
    assert mount.pid is not None
    (mount.path / "f").write_bytes(b"data")
    os.kill(mount.pid, signal.SIGSTOP)
    try:
        _, line = umount(mount)
        assert line == (
            f"vrangefs: the daemon of {mount.path} (pid {mount.pid}) is stopped (SIGSTOP or "
            f"a debugger); unmounted {mount.path}. The data held in {mount.path} is lost. "
            f"It exits once continued (kill -CONT {mount.pid}) or killed."
        )
    finally:
        os.kill(mount.pid, signal.SIGCONT)
    wait_until(mount.daemon.poll, 10, "the continued daemon exits")


def test_stopped_daemon_with_a_process_waiting_on_it(mounter: Mounter) -> None:
    mount = mounter.mount("8M")
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGSTOP)
    try:
        with waiting_process(mount.path) as waiter:
            _, line = umount(mount)
            assert waiter.wait(timeout=10) in (errno.ECONNABORTED, errno.ENOTCONN)
        assert line.startswith(
            f"vrangefs: the daemon of {mount.path} (pid {mount.pid}) is stopped (SIGSTOP or "
            f"a debugger); detached {mount.path} (lazy unmount: it was busy), aborted its FUSE "
            "connection (/sys/fs/fuse/connections/"
        )
        assert "waiting request(s) failed" in line
        assert f"The data held in {mount.path} is lost." in line
    finally:
        os.kill(mount.pid, signal.SIGCONT)
    wait_until(mount.daemon.poll, 10, "the continued daemon exits")


def test_killed_daemon_with_a_file_open(mounter: Mounter) -> None:
    mount = mounter.mount("8M")
    mount.expect_status = -signal.SIGKILL
    assert mount.pid is not None
    fd = os.open(mount.path / "open", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.kill(mount.pid, signal.SIGKILL)
        wait_until(mount.daemon.poll, 10, "the daemon is dead")
        assert errno_of(os.write, fd, b"x") == errno.ENOTCONN
        _, line = umount(mount)
        assert line == (
            f"vrangefs: {mount.path} was a dead mount (its daemon had died); cleaned up. "
            "Data held in it is lost."
        )
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- alive, but not serving ---------------------------------------------------------------------
class Freezer:
    """A cgroup whose processes can be frozen (v2 cgroup.freeze, or the v1 freezer)."""

    def __init__(self) -> None:
        name = f"vrangefs-test-{uuid.uuid4().hex[:8]}"
        v2 = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/freezer")
        if (v2 / "cgroup.controllers").exists():
            self.parent, self.v2 = v2, True
        elif (v1 / "freezer.state").exists() or (v1 / "cgroup.procs").exists():
            self.parent, self.v2 = v1, False
        else:
            pytest.skip("no cgroup freezer here")
        self.path = self.parent / name
        try:
            self.path.mkdir()
        except OSError as e:
            pytest.skip(f"cannot make a cgroup ({e.strerror})")
        self.pids: list[int] = []

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))
        self.pids.append(pid)

    def freeze(self, frozen: bool) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def close(self) -> None:
        self.freeze(False)
        for pid in self.pids:
            with contextlib.suppress(OSError):
                (self.parent / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            self.path.rmdir()


def test_daemon_that_does_not_answer(mounter: Mounter) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to freeze a cgroup")
    mount = mounter.mount("8M")
    assert mount.pid is not None
    freezer = Freezer()
    try:
        freezer.add(mount.pid)
        freezer.freeze(True)
        with waiting_process(mount.path) as waiter:
            _, line = umount(mount)
            assert waiter.wait(timeout=10) in (errno.ECONNABORTED, errno.ENOTCONN)
        assert line.startswith(
            f"vrangefs: the daemon of {mount.path} (pid {mount.pid}) does not answer (no reply "
            f"within 2s); detached {mount.path} (lazy unmount: it was busy), aborted its FUSE "
            "connection"
        )
        assert f"The data held in {mount.path} is lost." in line
    finally:
        freezer.close()
    wait_until(mount.daemon.poll, 10, "the thawed daemon exits")
