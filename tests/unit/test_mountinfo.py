"""The one parser of /proc/self/mountinfo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vrangefs import mountinfo
from vrangefs.mountinfo import MountEntry


def test_parse_line_with_optional_fields_and_escapes() -> None:
    line = (
        "36 35 0:42 / /tmp/with\\040space\\134x rw,nosuid,relatime shared:7 master:1 - "
        "fuse.vrangefs vrangefs rw,user_id=0,group_id=0,default_permissions,allow_other\n"
    )
    entry = mountinfo.parse_line(line)
    assert entry == MountEntry(
        mount_id=36,
        parent_id=35,
        major=0,
        minor=42,
        root="/",
        mountpoint="/tmp/with space\\x",
        options="rw,nosuid,relatime",
        fstype="fuse.vrangefs",
        source="vrangefs",
        super_options="rw,user_id=0,group_id=0,default_permissions,allow_other",
    )
    assert entry.device == "0:42"
    assert entry.fuse_connection == 42
    assert entry.is_device(os.makedev(0, 42))


def test_fuse_connection_only_for_fuse() -> None:
    tmpfs = mountinfo.parse_line("25 1 0:22 / /dev/shm rw - tmpfs tmpfs rw")
    assert tmpfs.fuse_connection is None
    assert tmpfs.super_options == "rw"
    fuse = mountinfo.parse_line("25 1 0:50 / /mnt rw - fuse sshfs#x rw")
    assert fuse.fuse_connection == 50
    fuseblk = mountinfo.parse_line("25 1 8:1 / /mnt rw - fuseblk /dev/sda1 rw")
    assert fuseblk.fuse_connection is None  # a block device's number, not a connection


@pytest.mark.parametrize("line", ["", "garbage", "1 2 3 4 5 6 7", "x 1 0:1 / /m rw - t s o"])
def test_parse_line_rejects(line: str) -> None:
    with pytest.raises(ValueError, match="not a mountinfo line"):
        mountinfo.parse_line(line)


def test_the_live_table() -> None:
    table = mountinfo.entries()
    assert table
    root = mountinfo.find("/")
    assert root is not None
    assert root.mountpoint == "/"
    proc = mountinfo.find("/proc")
    assert proc is not None
    assert proc.fstype == "proc"
    assert proc in table
    assert mountinfo.of_device(os.stat("/proc").st_dev) == proc


def test_find_follows_symbolic_links(tmp_path: Path) -> None:
    (tmp_path / "to-proc").symlink_to("/proc")
    (tmp_path / "chain").symlink_to(tmp_path / "to-proc")
    (tmp_path / "relative").symlink_to("../" + tmp_path.name + "/chain")
    for name in ("to-proc", "chain", "relative"):
        entry = mountinfo.find(tmp_path / name)
        assert entry is not None
        assert entry.mountpoint == "/proc"
    (tmp_path / "dir").mkdir()
    assert mountinfo.find(tmp_path / "dir") is None
    assert not mountinfo.is_mounted(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert mountinfo.find(tmp_path / "loop") is None
