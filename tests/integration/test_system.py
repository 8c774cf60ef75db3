"""Fitting the system: mount(8) through mount.vrangefs, fstab, and systemd's notify protocol."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import VRANGEFS, Mounter, is_mounted, mount_entry

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(VRANGEFS[0]).with_name("mount.vrangefs")
MiB = 1 << 20


def _mount_helper_installed() -> bool:
    return HELPER.exists() and Path("/sbin/mount.vrangefs").resolve() == HELPER.resolve()


needs_helper = pytest.mark.skipif(
    not _mount_helper_installed() and not os.environ.get("CI"),
    reason="/sbin/mount.vrangefs is not linked (tools/setup.sh does it)",
)


@needs_helper
def test_mount_t_vrangefs_with_tmpfs_like_options(mounter: Mounter) -> None:
    path = mounter.mountpoint()
    result = subprocess.run(
        [
            "mount",
            "-t",
            "vrangefs",
            "-o",
            "size=32M,mode=0750,uid=65534,gid=65534,noauto,_netdev",
            "vrangefs",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    mounter.adopt(path, result.stderr)
    assert result.returncode == 0, result.stderr
    assert mount_entry(path) == ("fuse.vrangefs", "vrangefs")
    st = os.statvfs(path)
    assert st.f_blocks * st.f_frsize == 32 * MiB
    root = os.stat(path)
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o750, 65534, 65534)
    # umount(8) works on it like on any other mount.
    assert subprocess.run(["umount", str(path)], check=False, timeout=30).returncode == 0
    assert not is_mounted(path)


@needs_helper
def test_fstab_line_mounts_with_mount_dir(mounter: Mounter, tmp_path: Path) -> None:
    path = mounter.mountpoint()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"vrangefs {path} vrangefs size=16M,purged_reads=zeros,nofail 0 0\n")
    result = subprocess.run(
        ["mount", "--fstab", str(fstab), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    mounter.adopt(path, result.stderr)
    assert result.returncode == 0, result.stderr
    assert os.statvfs(path).f_blocks * 4096 == 16 * MiB
    # purged_reads=zeros reached the daemon: a purged page reads as zeros.
    f = path / "f"
    f.write_bytes(b"x" * 8192)
    os.setxattr(f, "user.vrange.volatile", b"0,0")
    os.setxattr(path, "user.vrange.purge", b"all")
    assert f.read_bytes() == bytes(8192)


def test_mount_helper_rejects_bad_options(mounter: Mounter) -> None:
    path = mounter.mountpoint()
    for opts, word in (("size=abc", "abc"), ("mode=999", "mode"), ("uid=me", "uid")):
        result = subprocess.run(
            [str(HELPER), "vrangefs", str(path), "-o", opts],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert word in result.stderr
        assert not is_mounted(path)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for unit in ("vrangefs@.service", "mnt-cache.mount"):
        shutil.copy(REPO / "systemd" / unit, tmp_path / unit)
    for unit in ("vrangefs@mnt-cache.service", "mnt-cache.mount"):
        result = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # verify exits 0 on many problems and only prints them: both must be clean.
        problems = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if unit.split("@")[0] in line or "vrangefs" in line
        ]
        assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_ready_sent_on_notify_socket_once_the_mount_answers(
    mounter: Mounter, tmp_path: Path
) -> None:
    """Run the daemon as the unit does (foreground, NOTIFY_SOCKET set) and watch the socket."""
    path = mounter.mountpoint()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    proc = subprocess.Popen(
        [*VRANGEFS, "mount", str(path), "--foreground", "--memory-cap", "16M"],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        message = sock.recv(4096).decode()
        # READY=1 comes only once the kernel's INIT has been served: the mount is in the
        # table and answers at once.
        mounter.adopt(path)
        assert "READY=1" in message.split("\n")
        assert is_mounted(path)
        (path / "probe").write_bytes(b"ok")
        assert (path / "probe").read_bytes() == b"ok"
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode().split("\n")
        assert proc.wait(timeout=30) == 0
        wait_until(lambda: not is_mounted(path), 10, "unmounted after SIGTERM")
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
