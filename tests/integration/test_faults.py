"""Faults: a bug in a handler costs one request, a hung daemon can be inspected,
and SIGTERM in the middle of heavy I/O unmounts without hanging."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mounter, errno_of, is_mounted

MiB = 1 << 20


def test_unexpected_exception_in_a_handler_is_eio_and_the_daemon_serves_on(
    mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRANGEFS_FAULT_INJECTION", "1")
    mount = mounter.mount("16M")
    mount.check_log = False  # this test makes the daemon log a traceback on purpose
    f = mount.path / "f"
    f.write_bytes(b"data" * 1024)

    def direct_read() -> bytes:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.pread(fd, 4096, 0)
        finally:
            os.close(fd)

    for handler, call in (
        ("lookup", lambda: os.stat(f)),
        ("read", direct_read),
        ("mkdir", lambda: os.mkdir(mount.path / "d")),
    ):
        # The kernel caches dentries: drop them so that stat reaches the daemon.
        Path("/proc/sys/vm/drop_caches").write_text("2")
        os.setxattr(mount.path, "user.vrange.fault", handler.encode())
        assert errno_of(call) == errno.EIO, handler
        # The next request of the same kind works: the daemon kept serving.
        Path("/proc/sys/vm/drop_caches").write_text("2")
        assert errno_of(call) == 0, handler
    assert mount.log is not None
    log = mount.log.read_text()
    assert log.count("Traceback (most recent call last)") == 3
    assert "InjectedFault: fault injected into read" in log
    assert (mount.path / "d").is_dir()
    assert f.read_bytes() == b"data" * 1024


def test_fault_xattr_is_unknown_without_the_test_switch(mounter: Mounter) -> None:
    mount = mounter.mount("16M")
    assert errno_of(os.setxattr, mount.path, "user.vrange.fault", b"read") == errno.EINVAL
    assert (mount.path / "x").write_bytes(b"1") == 1


def test_sigusr1_dumps_every_stack_to_the_log(mounter: Mounter) -> None:
    mount = mounter.mount("16M")
    assert mount.pid is not None and mount.log is not None
    os.kill(mount.pid, signal.SIGUSR1)

    def dumped() -> bool:
        assert mount.log is not None
        return "most recent call first" in mount.log.read_text(errors="replace")

    wait_until(dumped, 10, "stack dump in the daemon's log")
    text = mount.log.read_text(errors="replace")
    assert "trio" in text  # the main thread's stack, inside the event loop
    # The daemon goes on serving after the dump.
    (mount.path / "after").write_bytes(b"ok")
    assert (mount.path / "after").read_bytes() == b"ok"


def test_sigterm_during_heavy_io_unmounts_without_hanging(mounter: Mounter) -> None:
    mount = mounter.foreground(["--memory-cap", "512M"])
    writers = [
        subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={mount.path}/big{i}", "bs=1M", "count=400"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    reader = subprocess.Popen(
        ["sh", "-c", f"while :; do cat {mount.path}/big0 >/dev/null 2>&1 || exit 0; done"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: mount.used_bytes() > 32 * MiB, 30, "writes under way")
        assert mount.pid is not None
        os.kill(mount.pid, signal.SIGTERM)
        wait_until(mount.daemon.poll, 30, "daemon exits after SIGTERM")
        assert mount.daemon.returncode == 0
        assert not is_mounted(mount.path)
        for proc in [*writers, reader]:
            proc.wait(timeout=30)  # I/O on the gone mount ends: nothing hangs
    finally:
        for proc in [*writers, reader]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
