"""Purging on memory pressure, made for real: the daemon runs in a small memory cgroup.

The test creates a memory cgroup (v1 or v2, whichever this machine has) with a
limit far below the mount's cap, starts the daemon inside it, and fills the
mount with volatile files.  The cap is never reached; only the cgroup's
headroom shrinks, and the daemon must purge the least recently marked files
until it is above ``--min-free`` again.  Where no memory cgroup can be made
(no permission, no controller), ``--min-free`` above what the machine has
available makes the same thing happen.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import VRANGEFS, Mounter
from vrangefs.protocol import int_stats, read_stats

MiB = 1 << 20
FILE_SIZE = 16 * MiB
CGROUP_LIMIT = 160 * MiB
MIN_FREE = 48 * MiB


def _stats(path: Path) -> dict[str, int]:
    return int_stats(read_stats(path))


@pytest.fixture
def cgroup_procs() -> Iterator[Path | None]:
    """A fresh memory cgroup limited to CGROUP_LIMIT (its procs file), or None if none can be made.

    Tests take it before ``mounter``, so it is torn down after the mounts are gone.
    """
    limit = CGROUP_LIMIT
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    name = f"vrangefs-test-{uuid.uuid4().hex[:8]}"
    if v2.exists() and "memory" in v2.read_text().split():
        base = Path("/sys/fs/cgroup") / name
        limit_file, procs = "memory.max", "cgroup.procs"
    elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        base = Path("/sys/fs/cgroup/memory") / name
        limit_file, procs = "memory.limit_in_bytes", "cgroup.procs"
    else:
        yield None
        return
    try:
        base.mkdir()
        (base / limit_file).write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            base.rmdir()
        yield None
        return
    try:
        yield base / procs
    finally:
        # The cgroup can go once its processes (the daemon) have exited.
        def removed() -> bool:
            try:
                base.rmdir()
            except OSError as e:
                return e.errno == errno.ENOENT
            return True

        wait_until(removed, 20, f"cgroup {base} removed")


def _under_pressure(procs: Path | None) -> tuple[list[str], int]:
    """Mount options that put the daemon under memory pressure, and how many FILE_SIZE files
    to write: 8 (128 MiB) in the 160 MiB cgroup, or, without one, 3 with ``--min-free``
    above what the machine has available."""
    if procs is not None:
        return ["--memory-cap", "1G", "--min-free", str(MIN_FREE)], 8
    avail = int(_meminfo()["MemAvailable"])
    return ["--memory-cap", "1G", "--min-free", str(avail + 512 * MiB)], 3


def _mount_in(procs: Path | None, mounter: Mounter, args: list[str]) -> Path:
    path = mounter.mountpoint()
    log = mounter.log_path()
    cmd = [*VRANGEFS, "mount", str(path), "--log-file", str(log), *args]
    if procs is not None:
        shell = f'echo $$ > "{procs}" && exec "$@"'
        cmd = ["sh", "-c", shell, "sh", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    mounter.adopt(path, result.stderr, log)
    assert result.returncode == 0, result.stderr
    return path


@pytest.mark.timeout(90)
def test_pressure_purges_oldest_units_and_no_stale_reads(
    cgroup_procs: Path | None, mounter: Mounter
) -> None:
    procs = cgroup_procs
    args, count = _under_pressure(procs)
    path = _mount_in(procs, mounter, [*args, "--pressure-interval", "0.1"])
    keep = path / "keep.bin"
    keep_data = os.urandom(2 * MiB)
    keep.write_bytes(keep_data)

    # A reader opens the first file and reads it (into the page cache) before any purge.
    first = path / "cache0.bin"
    first.write_bytes(b"\x01" * FILE_SIZE)
    os.setxattr(first, "user.vrange.volatile", b"0,0")
    fd = os.open(first, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == b"\x01" * 4096
        files = [first, *_fill_from(path, 1, count)]

        wait_until(lambda: _stats(path)["purge_events_pressure"] > 0, 30, "a purge on pressure")
        stats = _stats(path)
        assert stats["purge_events_cap"] == 0, "the cap was never reached"
        assert stats["purged_bytes_pressure"] >= FILE_SIZE

        # Oldest marks go first: the first file is purged as a whole unit...
        assert os.getxattr(first, "user.vrange.purged") == f"0,{FILE_SIZE}\n".encode()
        if procs is not None:
            # ...and purging stops once the cgroup has headroom again: the newest survives.
            assert os.getxattr(files[-1], "user.vrange.purged") == b""

        # No stale read through the fd opened and read before the purge.
        def read_fails() -> bool:
            try:
                os.pread(fd, 4096, 0)
            except OSError as e:
                assert e.errno == errno.EIO
                return True
            return False

        wait_until(read_fails, 10, "EIO from a file read before the purge")
        # Non-volatile data is never purged.
        assert keep.read_bytes() == keep_data
    finally:
        os.close(fd)


def _fill_from(path: Path, start: int, count: int) -> list[Path]:
    files = []
    for i in range(start, count):
        f = path / f"cache{i}.bin"
        f.write_bytes(bytes([i + 1]) * FILE_SIZE)
        os.setxattr(f, "user.vrange.volatile", b"0,0")
        files.append(f)
    return files


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


@pytest.mark.timeout(60)
def test_pressure_purge_off_keeps_volatile_data(mounter: Mounter) -> None:
    avail = _meminfo()["MemAvailable"]
    path = _mount_in(
        None,
        mounter,
        [
            "--memory-cap",
            "64M",
            "--pressure-purge",
            "off",
            "--min-free",
            str(avail * 2),
            "--pressure-interval",
            "0.05",
        ],
    )
    f = path / "v.bin"
    f.write_bytes(b"v" * MiB)
    os.setxattr(f, "user.vrange.volatile", b"0,0")
    # With pressure purging off nothing purges; a purge-all afterwards proves the unit was
    # purgeable all along, so its survival was the option's doing.
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), MiB, prot=mmap.PROT_READ) as m:
        assert m[:4] == b"vvvv"
    stats = _stats(path)
    assert stats["purge_events"] == 0
    os.setxattr(path, "user.vrange.purge", b"all")
    assert _stats(path)["purge_events_explicit"] == 1


@pytest.mark.timeout(90)
def test_pressure_evicts_cache_directory_files_oldest_first(
    cgroup_procs: Path | None, mounter: Mounter
) -> None:
    procs = cgroup_procs
    args, count = _under_pressure(procs)
    path = _mount_in(procs, mounter, [*args, "--cache-dir", "--pressure-interval", "0.1"])
    plain = path / "plain"
    plain.mkdir()
    os.setxattr(plain, "user.vrange.cache_dir", b"0")
    keep_data = os.urandom(2 * MiB)
    (plain / "keep.bin").write_bytes(keep_data)
    files = []
    for i in range(count):
        f = path / f"cache{i}.bin"
        f.write_bytes(bytes([i + 1]) * FILE_SIZE)
        files.append(f)

    wait_until(lambda: _stats(path)["evicted_files_pressure"] > 0, 30, "an eviction on pressure")
    stats = _stats(path)
    assert stats["evicted_files_cap"] == 0, "the cap was never reached"
    assert stats["evicted_bytes_pressure"] >= FILE_SIZE
    assert not files[0].exists(), "the least recently opened file goes first"
    if procs is not None:
        assert files[-1].read_bytes() == bytes([count]) * FILE_SIZE  # eviction stopped
    assert (plain / "keep.bin").read_bytes() == keep_data
