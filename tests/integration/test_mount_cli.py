"""``vrangefs mount`` and ``vrangefs umount``: readiness, background and foreground, errors."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import (
    VRANGEFS,
    Mounter,
    errno_of,
    is_mounted,
    mount_entry,
    run_cli,
    serving_pids,
)
from vrangefs import mountinfo

MiB = 1 << 20


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def alive(pid: int) -> bool:
    """True if *pid* runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, f"exit status 0; stderr: {result.stderr!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got {result.stderr!r}"
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


# -- mounting ----------------------------------------------------------------------------
def test_mount_returns_only_once_mounted_and_runs_in_background(mounter: Mounter) -> None:
    path = mounter.mountpoint()
    log = mounter.log_path()
    result = run_cli(["mount", str(path), "-o", "size=24M", "--log-file", str(log)])
    mount = mounter.adopt(path, result.stderr, log)  # cleaned up whatever happens next
    # Checked the very moment the command returned, with no waiting:
    assert is_mounted(path)
    assert os.path.ismount(path)
    fd = os.open(path / "first", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"ready")
    os.close(fd)
    assert result.returncode == 0, result.stderr
    assert (path / "first").read_bytes() == b"ready"
    assert mount_entry(path) == ("fuse.vrangefs", "vrangefs")
    assert os.statvfs(path).f_blocks * os.statvfs(path).f_frsize == 24 * MiB
    # The command has exited; its daemon serves on in the background.
    assert mount.pid is not None
    assert alive(mount.pid)
    assert serving_pids(path) == [mount.pid]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stays_until_signalled(mounter: Mounter, signum: int) -> None:
    mount = mounter.foreground(["--memory-cap", "16M"])
    proc = mount.daemon.popen
    assert proc is not None
    (mount.path / "f").write_bytes(b"served")
    assert (mount.path / "f").read_bytes() == b"served"
    assert proc.poll() is None  # --foreground: the command itself serves
    proc.send_signal(signum)
    assert proc.wait(timeout=15) == 0
    assert not is_mounted(mount.path)
    assert not os.path.ismount(mount.path)
    assert not (mount.path / "f").exists()  # the mount point is the empty directory again


def test_sigterm_unmounts_even_while_a_file_is_open(mounter: Mounter) -> None:
    mount = mounter.foreground(["--memory-cap", "8M"])
    proc = mount.daemon.popen
    assert proc is not None
    fd = os.open(mount.path / "busy", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x")
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert not is_mounted(mount.path)
        assert errno_of(os.write, fd, b"y") == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):  # FLUSH fails too; the fd is released anyway
            os.close(fd)


def test_umount_stops_the_daemon(mounter: Mounter) -> None:
    mount = mounter.mount("1%")
    expected = mem_total() // 100 // 4096 * 4096
    assert os.statvfs(mount.path).f_blocks * os.statvfs(mount.path).f_frsize == expected
    assert mount.pid is not None
    result = mounter.unmount(mount)
    assert result is not None
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mount.path)
    wait_until(mount.daemon.poll, 10, "daemon exits")
    assert not alive(mount.pid)
    assert mount.daemon.returncode in (0, None)  # None: not ours to know; the fixture checks


def test_umount_returns_when_a_foreground_daemon_exits_unreaped(mounter: Mounter) -> None:
    mount = mounter.foreground(["--memory-cap", "8M"])
    proc = mount.daemon.popen
    assert proc is not None
    # We are the daemon's parent and deliberately do not reap it while umount runs.
    try:
        result = run_cli(["umount", str(mount.path)], timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("vrangefs umount still waiting 3 s after the daemon exited")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("tool", [["fusermount3", "-u"], ["umount"]])
def test_plain_unmount_tools_end_the_daemon_cleanly(mounter: Mounter, tool: list[str]) -> None:
    mount = mounter.mount("8M")
    (mount.path / "f").write_bytes(b"x")
    result = mounter.run_reaping([*tool, str(mount.path)], mount)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mount.path)
    wait_until(mount.daemon.poll, 10, "daemon exits")
    assert mount.daemon.returncode == 0


def test_umount_of_a_path_that_is_not_mounted(mounter: Mounter) -> None:
    path = mounter.mountpoint()
    assert_one_line_error(run_cli(["umount", str(path)]), str(path), "not mounted")


def test_dead_mount_is_reported_and_cleaned_up(mounter: Mounter) -> None:
    mount = mounter.foreground(["--memory-cap", "8M"])
    mount.expect_status = -signal.SIGKILL
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGKILL)
    wait_until(mount.daemon.poll, 10, "daemon killed")
    assert errno_of(os.listdir, mount.path) == errno.ENOTCONN
    again = run_cli(["mount", str(mount.path)])
    # "dead mount" or "already a mount point" (stat may be answered from the kernel's
    # cache); either way it names the path and how to clean it up.
    assert_one_line_error(again, str(mount.path), f"vrangefs umount {mount.path}")
    result = run_cli(["umount", str(mount.path)])
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mount.path)


# -- errors ----------------------------------------------------------------------------------
def assert_nothing_mounted(path: Path) -> None:
    assert not is_mounted(path)
    assert serving_pids(path) == []


def test_missing_mountpoint(mounter: Mounter) -> None:
    path = mounter.base / "does-not-exist"
    result = run_cli(["mount", str(path), "--memory-cap", "8M"])
    assert_one_line_error(result, str(path))
    assert "exist" in result.stderr
    assert not path.exists()
    assert_nothing_mounted(path)


def test_regular_file_as_mountpoint(mounter: Mounter) -> None:
    path = mounter.base / "a-file"
    path.write_bytes(b"not a dir")
    try:
        result = run_cli(["mount", str(path), "--memory-cap", "8M"])
        assert_one_line_error(result, str(path), "not a directory")
        assert_nothing_mounted(path)
        assert path.read_bytes() == b"not a dir"
    finally:
        path.unlink()


def test_already_mounted_path(mounter: Mounter) -> None:
    mount = mounter.mount("8M")
    (mount.path / "keep").write_bytes(b"still here")
    result = run_cli(["mount", str(mount.path), "--memory-cap", "8M"])
    assert_one_line_error(result, str(mount.path), "already")
    assert serving_pids(mount.path) == [mount.pid]  # no second daemon
    assert (mount.path / "keep").read_bytes() == b"still here"
    assert sum(1 for e in mountinfo.entries() if e.mountpoint == str(mount.path)) == 1


@pytest.mark.parametrize("size", ["abc", "0", "-5", "150%", "12X", ""])
def test_bad_memory_cap(mounter: Mounter, size: str) -> None:
    path = mounter.mountpoint()
    result = run_cli(["mount", str(path), f"--memory-cap={size}"])
    assert_one_line_error(result, "memory-cap", repr(size))
    assert_nothing_mounted(path)


def test_bad_size_option(mounter: Mounter) -> None:
    path = mounter.mountpoint()
    result = run_cli(["mount", str(path), "-o", "size=lots"])
    assert_one_line_error(result, "lots")
    assert_nothing_mounted(path)


def test_missing_dev_fuse(mounter: Mounter) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs over /dev in a private namespace")
    path = mounter.mountpoint()
    script = 'mount -t tmpfs none /dev && exec "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    result = subprocess.run(
        [*cmd, *VRANGEFS, "mount", str(path), "--memory-cap", "8M"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert_one_line_error(result, "/dev/fuse")
    assert_nothing_mounted(path)


def test_debug_log_records_requests(mounter: Mounter) -> None:
    mount = mounter.foreground(["--debug", "--memory-cap", "8M"])
    assert mount.log is not None
    assert errno_of(os.stat, mount.path / "probe-name") == errno.ENOENT

    def lookup_logged() -> bool:
        assert mount.log is not None
        return any(
            "lookup" in line and "probe-name" in line
            for line in mount.log.read_text(errors="replace").splitlines()
        )

    wait_until(lookup_logged, 10, "a lookup of probe-name in the debug log")
