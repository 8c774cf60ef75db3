"""Cache directories: what evicting costs, on real mounts.

Three measurements, each repeated --runs times with the setups alternated, reported as
medians (every run is kept in the JSON too):

- ``evict``: the daemon's CPU time per eviction.  A mount with --memory-cap CAP (default
  64M) and --cache-dir gets an ordinary directory ``plain`` (``vrangefs cachedir --off``).
  A file of CAP bytes is written there and removed twice (the page store's memory is then
  touched and warm); the second write is the *baseline*.  Then CAP/8 KiB one-page files
  are made in the cache directory (the root), the daemon is let go quiet, and the same
  write of CAP bytes is made again: it evicts them all.  The daemon's utime+stime
  (/proc/PID/stat, all its threads: the unlinker that tells inotify included) from before
  that write until it is quiet again, minus the baseline write's, divided by the evictions
  counted in its statistics, is the figure; the raw quotient is reported too.
- ``open_close``: open(O_RDONLY)+close pairs per second on F files (default 100,000, one
  page each) of one directory, random order, on two mounts alike but for that directory
  being a cache directory or not (cap large enough that nothing is evicted); tmpfs in the
  same run as a reference.  Wall time of the loop and the daemon's CPU per pair.
- ``write``: 1 GiB (--size) of 1 MiB files (open, one write, close) into a cache directory
  under a 64 MiB cap, against the same writes under a cap where nothing is evicted
  (--size + 1 GiB).  The first pass over fresh mounts makes the machine touch new memory
  (slow and erratic, and 16x more of it for the large cap), so each run writes the set
  twice and the figure compares the *second pass*: under the small cap it evicts as
  much as the first; under the large cap it overwrites files (O_TRUNC: freed pages reused).
  First passes are reported apart.  tmpfs (size --size + 1 GiB) as a reference.

Run as root on a machine with FUSE, from the repository root::

    .venv/bin/python bench/bench_cachedir.py [--runs 5] [--files 100000] [--size 1G] \\
        [--out bench/results/cachedir.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vrangefs.protocol import CACHE_DIR, int_stats, read_stats

MiB = 1 << 20
PAGE = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")


UMOUNT_FAILURES: list[str] = []  # what `vrangefs umount` said when it had to be retried


def vrangefs(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vrangefs", *argv], check=check, capture_output=True, text=True
    )


@contextmanager
def mounted(where: Path, cap: str, *options: str) -> Iterator[int]:
    """A vrangefs mount at *where*; yields the daemon's pid.  An unmount that fails (once
    seen: EBUSY right after a pass of writes) is retried for up to 10 s and recorded."""
    vrangefs("mount", str(where), "--memory-cap", cap, *options)
    try:
        yield int(read_stats(where)["pid"])
    finally:
        for _ in range(20):
            proc = vrangefs("umount", str(where), check=False)
            if proc.returncode == 0:
                break
            UMOUNT_FAILURES.append(f"{time.ctime()}: {proc.stderr.strip()}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"cannot unmount {where}: {UMOUNT_FAILURES[-1]}")


@contextmanager
def tmpfs(where: Path, size: int) -> Iterator[None]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def quiet_cpu(pid: int, still: float = 0.5, step: float = 0.1, limit: float = 60.0) -> float:
    """The daemon's CPU seconds once it has used none for *still* seconds."""
    deadline = time.monotonic() + limit
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            break
    return last


def write_file(path: Path, nbytes: int, chunk: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // len(chunk)):
            os.write(fd, chunk)
    finally:
        os.close(fd)


# -- (a) daemon time per eviction -------------------------------------------------------
def evict_run(mnt: Path, cap: int) -> dict[str, float]:
    chunk = b"w" * MiB
    with mounted(mnt, str(cap), "--cache-dir") as pid:
        plain = mnt / "plain"
        plain.mkdir()
        vrangefs("cachedir", "--off", str(plain))
        big = plain / "big"
        baseline = 0.0
        for _ in range(2):  # the second write is the baseline, on warm memory
            before = quiet_cpu(pid)
            write_file(big, cap, chunk)
            baseline = quiet_cpu(pid) - before
            big.unlink()
        files = cap // PAGE // 2  # (the inode limit is the cap in pages: leave room)
        page = b"c" * PAGE
        for i in range(files):
            (mnt / f"f{i:06d}").write_bytes(page)
        stats0 = int_stats(read_stats(mnt))
        before = quiet_cpu(pid)
        start = time.perf_counter()
        write_file(big, cap, chunk)
        wall = time.perf_counter() - start
        total = quiet_cpu(pid) - before
        stats1 = int_stats(read_stats(mnt))
        evicted = stats1["evicted_files"] - stats0["evicted_files"]
        left = sum(1 for _ in os.scandir(mnt)) - 1  # but plain
        assert evicted > 0 and left == stats1["cache_dir_files"], (evicted, left)
    return {
        "files": files,
        "evicted": evicted,
        "baseline_write_cpu_s": baseline,
        "evicting_write_cpu_s": total,
        "evicting_write_wall_s": wall,
        "ms_per_eviction": (total - baseline) / evicted * 1e3,
        "ms_per_eviction_raw": total / evicted * 1e3,
    }


# -- (b) open/close with many files in a cache directory --------------------------------
def make_files(d: Path, n: int) -> list[Path]:
    page = b"o" * PAGE
    paths = [d / f"f{i:06d}" for i in range(n)]
    for p in paths:
        p.write_bytes(page)
    return paths


def open_close(paths: list[Path], pairs: int, pid: int | None, seed: int) -> dict[str, float]:
    order = random.Random(seed).choices(paths, k=pairs)
    # Look every name up first: the kernel keeps a name for 60 s (entry timeout) and then
    # asks the daemon again, so without this the mount filled first paid a LOOKUP per open
    # (that was the whole of a 1.4x "cache directory" difference, inverted by filling the
    # other mount first).
    for p in set(order):
        os.stat(p)
    before = quiet_cpu(pid) if pid is not None else 0.0
    start = time.perf_counter()
    for p in order:
        os.close(os.open(p, os.O_RDONLY))
    wall = time.perf_counter() - start
    out = {"pairs_per_s": pairs / wall, "us_per_pair": wall / pairs * 1e6}
    if pid is not None:
        out["daemon_cpu_us_per_pair"] = (quiet_cpu(pid) - before) / pairs * 1e6
    return out


def open_close_runs(base: Path, files: int, pairs: int, runs: int) -> dict[str, Any]:
    """Three mounts side by side (cache directory, ordinary directory, tmpfs), measured in
    turn, alternating which goes first."""
    cap = str(max(4 << 30, files * PAGE * 4))
    mnts = {name: base / name for name in ("cache", "plain", "tmpfs")}
    for m in mnts.values():
        m.mkdir()
    out: dict[str, list[dict[str, float]]] = {name: [] for name in mnts}
    with (
        mounted(mnts["cache"], cap) as cache_pid,
        mounted(mnts["plain"], cap) as plain_pid,
        tmpfs(mnts["tmpfs"], files * PAGE * 2),
    ):
        pids: dict[str, int | None] = {"cache": cache_pid, "plain": plain_pid, "tmpfs": None}
        paths = {}
        for name, m in mnts.items():
            d = m / "d"
            d.mkdir()
            if name == "cache":
                os.setxattr(d, CACHE_DIR, b"1")
            paths[name] = make_files(d, files)
        stats = int_stats(read_stats(mnts["cache"]))
        assert stats["cache_dir_files"] == files, stats["cache_dir_files"]
        names = list(mnts)
        for run in range(runs):
            for name in names if run % 2 == 0 else names[::-1]:
                out[name].append(open_close(paths[name], pairs, pids[name], seed=run))
        evicted = int_stats(read_stats(mnts["cache"]))["evicted_files"]
        assert evicted == 0, evicted
    med = {name: _medians(rows) for name, rows in out.items()}
    return {
        "files": files,
        "pairs_per_run": pairs,
        "runs": out,
        "median": med,
        "cache_vs_plain_time": med["cache"]["us_per_pair"] / med["plain"]["us_per_pair"],
        "cache_vs_plain_daemon_cpu": med["cache"]["daemon_cpu_us_per_pair"]
        / med["plain"]["daemon_cpu_us_per_pair"],
    }


# -- (c) 1 GiB of 1 MiB files under a 64 MiB cap ----------------------------------------
def write_pass(d: Path, size: int) -> float:
    chunk = b"x" * MiB
    start = time.perf_counter()
    for i in range(size // MiB):
        write_file(d / f"f{i:05d}", MiB, chunk)
    return time.perf_counter() - start


def write_run(mnt: Path, setup: str, size: int) -> dict[str, float]:
    """Two passes of *size* bytes of 1 MiB files into a directory of a fresh mount."""
    if setup == "tmpfs":
        with tmpfs(mnt, size + (1 << 30)):
            first, second = write_pass(mnt, size), write_pass(mnt, size)
        return {"first_pass_MiB_s": size / MiB / first, "second_pass_MiB_s": size / MiB / second}
    cap = "64M" if setup == "cap64M" else str(size + (1 << 30))
    with mounted(mnt, cap, "--cache-dir"):
        first, second = write_pass(mnt, size), write_pass(mnt, size)
        stats = int_stats(read_stats(mnt))
    return {
        "first_pass_MiB_s": size / MiB / first,
        "second_pass_MiB_s": size / MiB / second,
        "evicted_files": stats["evicted_files"],
        "max_resident_ok": int(stats["resident_bytes"] <= stats["memory_cap"]),
    }


def write_runs(base: Path, size: int, runs: int) -> dict[str, Any]:
    setups = ["cap64M", "large_cap", "tmpfs"]
    out: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    mnt = base / "w"
    mnt.mkdir()
    for run in range(runs):
        for setup in setups if run % 2 == 0 else setups[::-1]:
            out[setup].append(write_run(mnt, setup, size))
    med = {s: _medians(rows) for s, rows in out.items()}
    return {
        "size": size,
        "runs": out,
        "median": med,
        "cap64M_vs_large_second_pass": med["cap64M"]["second_pass_MiB_s"]
        / med["large_cap"]["second_pass_MiB_s"],
        "cap64M_vs_large_first_pass": med["cap64M"]["first_pass_MiB_s"]
        / med["large_cap"]["first_pass_MiB_s"],
    }


# -- driver -----------------------------------------------------------------------------
def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--evict-cap", default="64M")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=20_000, help="open/close pairs per run")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--only", default="evict,open_close,write")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args(args)
    only = set(opts.only.split(","))
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(args or sys.argv[1:])]),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "git": subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    steps: dict[str, Callable[[Path], Any]] = {
        "evict": lambda base: _evict_runs(base, parse_size(opts.evict_cap), opts.runs),
        "open_close": lambda base: open_close_runs(base, opts.files, opts.pairs, opts.runs),
        "write": lambda base: write_runs(base, parse_size(opts.size), opts.runs),
    }
    for name, step in steps.items():
        if name in only:
            with tempfile.TemporaryDirectory(prefix="bench-cachedir-") as tmp:
                result[name] = step(Path(tmp))
            print(json.dumps({name: result[name].get("median", result[name])}), flush=True)
            result["umount_retries"] = UMOUNT_FAILURES
            if opts.out:  # after each part, so that a later failure loses nothing
                opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _evict_runs(base: Path, cap: int, runs: int) -> dict[str, Any]:
    mnt = base / "e"
    mnt.mkdir()
    rows = [evict_run(mnt, cap) for _ in range(runs)]
    return {"cap": cap, "runs": rows, "median": _medians(rows)}


if __name__ == "__main__":
    sys.exit(main())
