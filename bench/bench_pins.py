"""Pins: what they cost.

Three measurements, printed as one JSON object (and written to --out if given):

- ``roundtrip``: pin + unpin pairs per second from one process on a real mount
  (``setxattr user.vrange.pin`` then ``unpin`` of one page), with 10 and with N other live
  pins (N = --live, default 100,000) held by the same process, on the same file and on
  other files; next to the rate of plain ``user.vrange.volatile`` marks (one request each)
  in the same run, as the baseline of a setxattr round trip; and the daemon's RSS per pin.
- ``exit``: seconds from ``kill -9`` of M processes (--procs, default 200) that each hold a
  pin until all of them are dead (``waitid`` without reaping) and until the daemon lists no
  pin left (``user.vrange.pins``, polled in a loop).
- ``reclaim``: in-process (no FUSE), the time purge-all takes with U pinned units and one
  unpinned unit (U = --units, default 100,000), against the same with no pinned unit: parked
  units leave the purge order, so the two should be alike.

Run as root on a machine with FUSE::

    .venv/bin/python bench/bench_pins.py [--live 100000] [--procs 200] [--units 100000] [--runs N]

With ``--runs N`` the round trips are measured on N fresh mounts, one after the other, and
``roundtrip`` holds the median of each figure (``roundtrip_runs`` every run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import int_stats, read_stats
from vrangefs.volume import Caller, Volume

PIN = "user.vrange.pin"
UNPIN = "user.vrange.unpin"
VOLATILE = "user.vrange.volatile"


def _mount(where: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vrangefs",
            "mount",
            str(where),
            "--memory-cap",
            "256M",
            "-o",
            "pin_limit=4T",
            "--metadata-cap",  # --live pins and --units units on purpose: speed is measured
            "16G",
        ],
        check=True,
    )


def _umount(where: Path) -> None:
    subprocess.run([sys.executable, "-m", "vrangefs", "umount", str(where)], check=True)


def _rate(path: Path, seconds: float = 2.0, name: str = PIN) -> float:
    """Pin + unpin pairs per second (with *name* VOLATILE: single marks per second)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(100):
                if name == VOLATILE:
                    os.setxattr(fd, VOLATILE, b"0,4096")
                else:
                    os.setxattr(fd, PIN, b"0,4096")
                    os.setxattr(fd, UNPIN, b"0,4096")
            n += 100
        return n / elapsed
    finally:
        os.close(fd)


def roundtrip(mnt: Path, live: int) -> dict[str, float]:
    f = mnt / "f"
    f.write_bytes(b"x" * PAGE_SIZE)
    others = [mnt / f"o{i}" for i in range(16)]
    for o in others:
        o.write_bytes(b"")
    out: dict[str, float] = {"volatile_marks_per_s": _rate(f, name=VOLATILE)}
    out["pairs_no_live_pin_per_s"] = _rate(f)
    # 10 live pins: pages 1..10 of the file itself.
    for i in range(1, 11):
        os.setxattr(f, PIN, b"%d,4096" % (i * PAGE_SIZE))
    rss = int_stats(read_stats(mnt))["daemon_rss_bytes"]
    out["live_10_per_s"] = _rate(f)
    # N live pins on the same file (pages past its end: pins are not clipped).
    fd = os.open(f, os.O_RDONLY)
    start = time.perf_counter()
    for i in range(11, live + 1):
        os.setxattr(fd, PIN, b"%d,4096" % (i * PAGE_SIZE))
    out["setup_pins_per_s"] = (live - 10) / (time.perf_counter() - start)
    os.close(fd)
    out[f"live_{live}_same_file_per_s"] = _rate(f)
    out["ratio_same_file"] = out["live_10_per_s"] / out[f"live_{live}_same_file_per_s"]
    # ... and with the extra pins on other files instead.
    g = mnt / "g"
    g.write_bytes(b"y" * PAGE_SIZE)
    out[f"live_{live}_other_files_per_s"] = _rate(g)
    out["ratio_other_files"] = out["live_10_per_s"] / out[f"live_{live}_other_files_per_s"]
    stats = int_stats(read_stats(mnt))
    out["rss_per_pin_bytes"] = (stats["daemon_rss_bytes"] - rss) / (live - 10)
    out["pins"] = stats["pins"]
    return out


def _holder(path: Path, ready_w: int) -> None:
    os.setxattr(path, PIN, b"0,0")
    os.write(ready_w, b"x")
    signal.pause()


def exits(mnt: Path, procs: int) -> dict[str, float]:
    f = mnt / "h"
    f.write_bytes(b"z" * 16 * PAGE_SIZE)
    os.setxattr(f, VOLATILE, b"0,0")
    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(procs):
        pid = os.fork()
        if pid == 0:
            try:
                _holder(f, ready_w)
            finally:
                os._exit(0)
        pids.append(pid)
    for _ in range(procs):
        os.read(ready_r, 1)
    before = int_stats(read_stats(mnt))
    start = time.perf_counter()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.perf_counter() - start
    alive, dead, gone = set(pids), 0.0, 0.0
    while not (dead and gone):
        for pid in list(alive):
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                alive.discard(pid)
        if not alive and not dead:
            dead = time.perf_counter() - start
        if not gone and not os.getxattr(f, "user.vrange.pins"):
            gone = time.perf_counter() - start
    for pid in pids:
        os.waitpid(pid, 0)
    return {
        "processes": procs,
        "pins_before": before["pins"],
        "seconds_to_send_kills": killed,
        "seconds_until_all_dead": dead,
        "seconds_until_no_pin_left": gone,
    }


def reclaim(units: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for pinned in (False, True):
        vol = Volume(
            PageStore((units + 16) * PAGE_SIZE), pin_limit=units * PAGE_SIZE, metadata_cap=1 << 34
        )
        f = vol.create(ROOT_INO, b"f", 0o644, Caller(0, 0)).ino
        vol.write(f, 0, b"p" * (units * PAGE_SIZE))
        for i in range(units):
            vol.mark_volatile(f, i * PAGE_SIZE, PAGE_SIZE)
        if pinned:
            start = time.perf_counter()
            vol.pin(f, 0, units * PAGE_SIZE, 1, 1)
            out["pin_seconds"] = time.perf_counter() - start
        g = vol.create(ROOT_INO, b"g", 0o644, Caller(0, 0)).ino
        vol.write(g, 0, b"g" * PAGE_SIZE)
        vol.mark_volatile(g, 0, 0)
        start = time.perf_counter()
        purged = vol.reclaim.purge_all()
        key = "pinned" if pinned else "unpinned"
        out[f"purge_all_seconds_{units}_{key}"] = time.perf_counter() - start
        out[f"units_purged_{key}"] = purged
        if pinned:
            start = time.perf_counter()
            vol.unpin(f, 0, units * PAGE_SIZE, 1)
            out["unpin_seconds"] = time.perf_counter() - start
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--live", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=200)
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument(
        "--runs", type=int, default=1, help="roundtrip on this many fresh mounts: medians"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {}
    runs: list[dict[str, float]] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            mnt = Path(tmp) / "mnt"
            mnt.mkdir()
            _mount(mnt)
            try:  # processes forked before reclaim() grows this one: they die fast
                if run == 0:
                    result["exit"] = exits(mnt, args.procs)
                runs.append(roundtrip(mnt, args.live))
            finally:
                _umount(mnt)
    result["roundtrip"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if args.runs > 1:
        result["roundtrip_runs"] = runs
    result["reclaim"] = reclaim(args.units)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
