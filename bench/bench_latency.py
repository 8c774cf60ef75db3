"""Latency of small requests while another process runs a big operation.

Issue 12 asks that no request hold the daemon for long: while one process runs a
big operation, another's small requests must see p99 <= 20 ms and max <= 100 ms.
This measures that. For each big operation a prober process loops over three
small requests that reach the daemon:

- ``stats``: getxattr ``user.vrange.stats`` on the mount root;
- ``create``: create, close and unlink a file in a directory of its own;
- ``read``: a 4 KiB ``O_DIRECT`` pread of a file (every one is a READ to the daemon).

Each big operation is set up first (not measured), then run in its own process
while the prober runs; only probes that start while the operation runs count.

    .venv/bin/python bench/bench_latency.py                 # about 3 minutes
    .venv/bin/python bench/bench_latency.py --scale 5        # the issue's sizes, about 15 min
    .venv/bin/python bench/bench_latency.py --only unmark,purge --json out.json

Operations (default sizes; ``--scale`` multiplies them):

- ``unmark``: one ``user.vrange.nonvolatile 0,0`` over 200,000 one-page units;
- ``purge``: purge-all of 200,000 one-page units that hold data (800 MB);
- ``truncate``: truncate to 0 of a 1 TiB sparse file with 20,000 pages scattered through it;
- ``otrunc``: ``open(O_TRUNC)`` of the same sparse file (the kernel sends it as an OPEN);
- ``readdir``: ``os.listdir`` of a directory of 20,000 entries;
- ``evict``: a 256 MiB write into a 256 MiB cap full of 65,536 one-page volatile units;
- ``exit``: SIGKILL of a process holding 100,000 one-page pins, until the stats show none.
- ``bigunit``: a 16 MiB write at the cap that purges one volatile unit of 256 MiB;
- ``bigfile``: the same, evicting a closed 256 MiB file of a cache directory.
- ``manyunits``: the same, evicting a closed file of a cache directory that holds 100,000
  one-page volatile units (with data).
- ``sparsefile``: the same, evicting a closed 1 TiB sparse file of a cache directory with
  20,000 pages scattered through it (a page-table chunk each).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vrange_util import (
    PURGE,
    Session,
    add_wait_quiet,
    config_of,
    fmt,
    in_child,
    print_table,
    run_session,
    write_json,
)

PAGE = 4096
MiB = 1 << 20
TARGET_P99_S = 0.020
TARGET_MAX_S = 0.100
NONVOLATILE = "user.vrange.nonvolatile"
VOLATILE = "user.vrange.volatile"
STATS = "user.vrange.stats"
PROBE_FILE_PAGES = 4096  # 16 MiB read by the prober


# -- the prober (a child process: python bench_latency.py --probe MOUNTPOINT) ---------------
def probe_loop(mountpoint: Path) -> None:
    """Probe until SIGTERM; print one line per probe: kind start_monotonic seconds."""
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(1)
    buf = mmap.mmap(-1, PAGE)
    fd = os.open(mountpoint / "probe" / "data", os.O_RDONLY | os.O_DIRECT)
    scratch = mountpoint / "probe" / "scratch"
    out = sys.stdout
    n = 0
    while not stop:
        n += 1
        t = time.monotonic()
        os.getxattr(mountpoint, STATS)
        out.write(f"stats {t:.6f} {time.monotonic() - t:.6f}\n")
        t = time.monotonic()
        os.close(os.open(scratch / f"f{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.unlink(scratch / f"f{n}")
        out.write(f"create {t:.6f} {time.monotonic() - t:.6f}\n")
        t = time.monotonic()
        os.preadv(fd, [buf], rng.randrange(PROBE_FILE_PAGES) * PAGE)
        out.write(f"read {t:.6f} {time.monotonic() - t:.6f}\n")
        out.flush()
        time.sleep(0.002)  # the prober's pace: about 300 probes a second
    os.close(fd)


# -- set-ups and operations (run in forked children) ----------------------------------------
def mark_units(path: Path, units: int, with_data: bool) -> None:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if with_data:
            chunk = b"\x5a" * (256 * PAGE)
            for off in range(0, units * PAGE, len(chunk)):
                os.pwrite(fd, chunk[: min(len(chunk), units * PAGE - off)], off)
            stride = 1
        else:
            os.ftruncate(fd, 2 * units * PAGE)
            stride = 2
        for i in range(units):
            os.setxattr(fd, VOLATILE, b"%d,%d" % (stride * i * PAGE, PAGE))
    finally:
        os.close(fd)


def scatter(path: Path, pages: int) -> None:
    rng = random.Random(2)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, 1 << 40)
        page = b"\x33" * PAGE
        for _ in range(pages):
            os.pwrite(fd, page, rng.randrange((1 << 40) // PAGE) * PAGE)
    finally:
        os.close(fd)


PINNER = """
import os, sys, time
path, count, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_RDONLY)
for i in range(count):
    os.setxattr(fd, "user.vrange.pin", b"%d,%d" % (i * 4096, 4096))
open(ready, "w").write(str(os.getpid()))
time.sleep(3600)
"""


def start_pinner(path: Path, pins: int) -> None:
    """Leave a process holding *pins* one-page pins on *path* (its pid in pinner.pid)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, pins * PAGE)
    finally:
        os.close(fd)
    ready = path.with_name("pinner.pid")
    child = subprocess.Popen(
        [sys.executable, "-c", PINNER, str(path), str(pins), str(ready)],
        start_new_session=True,
    )
    while not ready.exists():
        if child.poll() is not None:
            raise RuntimeError(f"the pinner exited with {child.returncode}")
        time.sleep(0.1)


def kill_pinner(path: Path) -> None:
    """SIGKILL the pinner and return once the daemon has released all its pins."""
    os.kill(int(path.with_name("pinner.pid").read_text()), signal.SIGKILL)
    mountpoint = path.parent
    deadline = time.monotonic() + 600
    while b"\npins=0\n" not in b"\n" + os.getxattr(mountpoint, STATS):
        if time.monotonic() > deadline:
            raise RuntimeError("the pins of a killed process were not released in 600 s")
        time.sleep(0.001)


def make_entries(directory: Path, count: int) -> None:
    directory.mkdir()
    for i in range(count):
        os.mknod(directory / f"entry-{i:07d}")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(start, seconds) of fn(), on the system-wide monotonic clock."""
    start = time.monotonic()
    fn()
    return start, time.monotonic() - start


def scenarios(scale: float) -> dict[str, tuple[str, Callable[[Path], None], Callable[[Path], Any]]]:
    """name -> (memory cap, set-up, operation)."""
    units = int(200_000 * scale)
    scattered = int(20_000 * scale)
    entries = int(20_000 * scale)
    pins = int(100_000 * scale)
    big_mib = int(256 * scale)
    cached_units = int(100_000 * scale)
    return {
        "unmark": (
            "1G",
            lambda m: mark_units(m / "units", units, with_data=False),
            lambda m: os.setxattr(m / "units", NONVOLATILE, b"0,0"),
        ),
        "purge": (
            f"{max(2048, units * PAGE // MiB + 512)}M",
            lambda m: mark_units(m / "units", units, with_data=True),
            lambda m: os.setxattr(m, PURGE, b"all"),
        ),
        "truncate": (
            "1G",
            lambda m: scatter(m / "sparse", scattered),
            lambda m: os.truncate(m / "sparse", 0),
        ),
        "otrunc": (
            "1G",
            lambda m: scatter(m / "sparse", scattered),
            lambda m: os.close(os.open(m / "sparse", os.O_WRONLY | os.O_TRUNC)),
        ),
        "readdir": (
            "1G",
            lambda m: make_entries(m / "dir", entries),
            lambda m: os.listdir(m / "dir"),
        ),
        "exit": (
            f"{max(1024, 2 * pins * PAGE // MiB + 256)}M",  # a user may pin half the cap
            lambda m: start_pinner(m / "pinned", pins),
            lambda m: kill_pinner(m / "pinned"),
        ),
        "evict": (
            "272M",  # 256 MiB of units + the prober's 16 MiB
            lambda m: mark_units(m / "units", 65536, with_data=True),
            lambda m: (m / "new").write_bytes(b"n" * (256 * MiB)),
        ),
        "bigunit": at_the_cap(big_mib, lambda m: one_big_unit(m / "big", big_mib)),
        "bigfile": at_the_cap(big_mib, lambda m: fill(cache_dir(m) / "big", big_mib)),
        "manyunits": at_the_cap(
            cached_units * PAGE // MiB,
            lambda m: mark_units(cache_dir(m) / "many", cached_units, with_data=True),
        ),
        "sparsefile": at_the_cap(
            scattered * PAGE // MiB, lambda m: scatter(cache_dir(m) / "sparse", scattered)
        ),
    }


def at_the_cap(
    mib: int, setup: Callable[[Path], None]
) -> tuple[str, Callable[[Path], None], Callable[[Path], Any]]:
    """A scenario whose set-up makes *mib* MiB of data in a cap of that, the prober's 16 MiB
    and 8 MiB to spare: the operation, a 16 MiB write, purges or evicts what it made."""
    return f"{mib + 24}M", setup, lambda m: (m / "new").write_bytes(b"n" * (16 * MiB))


def fill(path: Path, mib: int) -> None:
    chunk = b"\x5a" * MiB
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(chunk)


def one_big_unit(path: Path, mib: int) -> None:
    """A file of *mib* MiB marked volatile as one unit: a write at the cap purges it."""
    fill(path, mib)
    os.setxattr(path, VOLATILE, b"0,0")


def cache_dir(mountpoint: Path) -> Path:
    """A cache directory in the mount: its closed files are evicted by a write at the cap."""
    directory = mountpoint / "cache"
    directory.mkdir()
    os.setxattr(directory, "user.vrange.cache_dir", b"1")
    return directory


# -- one scenario ---------------------------------------------------------------------------
def run_one(
    session: Session, name: str, cap: str, setup: Callable[[Path], None], op: Callable[[Path], Any]
) -> dict[str, Any]:
    with session.vrangefs(cap) as (mnt, _pid):
        (mnt / "probe" / "scratch").mkdir(parents=True)
        (mnt / "probe" / "data").write_bytes(os.urandom(PROBE_FILE_PAGES * PAGE))
        t = time.monotonic()
        in_child(setup, mnt, timeout=1800, what=f"{name}: set-up")
        setup_s = time.monotonic() - t
        prober = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(mnt)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)  # let the prober settle before the operation starts
            start, seconds = in_child(timed, lambda: op(mnt), timeout=1800, what=name)
            time.sleep(0.2)
        finally:
            prober.send_signal(signal.SIGTERM)
            out, _ = prober.communicate(timeout=60)
        if prober.returncode != 0:
            raise RuntimeError(f"{name}: prober exited with {prober.returncode}")
    during: dict[str, list[float]] = {"stats": [], "create": [], "read": []}
    for line in out.splitlines():
        kind, t0, took = line.split()
        if start <= float(t0) <= start + seconds:
            during[kind].append(float(took))
    return {"setup_s": setup_s, "op_s": seconds, "probes": during}


def summarize(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for kind, values in result["probes"].items():
        if not values:
            rows.append([kind, "0", "-", "-", "-", "no probe ran during the operation"])
            continue
        ordered = sorted(values)
        p50 = ordered[len(ordered) // 2]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        worst = ordered[-1]
        ok = p99 <= TARGET_P99_S and worst <= TARGET_MAX_S
        rows.append(
            [
                kind,
                str(len(ordered)),
                f"{p50 * 1e3:.1f}",
                f"{p99 * 1e3:.1f}",
                f"{worst * 1e3:.1f}",
                "ok" if ok else "OVER",
            ]
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the sizes")
    parser.add_argument("--only", help="comma-separated subset of the operations")
    parser.add_argument("--json", type=Path, help="write every latency here")
    add_wait_quiet(parser)
    opts = parser.parse_args()
    if opts.probe:
        probe_loop(Path(opts.probe))
        return 0
    chosen = scenarios(opts.scale)
    if opts.only:
        chosen = {k: v for k, v in chosen.items() if k in opts.only.split(",")}
    results: dict[str, Any] = {}

    def body(session: Session) -> None:
        for name, (cap, setup, op) in chosen.items():
            print(f"{name}: setting up ...", flush=True)
            results[name] = run_one(session, name, cap, setup, op)
            r = results[name]
            print(f"{name}: set-up {fmt(r['setup_s'])} s, operation {r['op_s']:.3f} s")
            print_table(
                ["probe", "n", "p50 ms", "p99 ms", "max ms", "p99<=20, max<=100"], summarize(r)
            )

    run = run_session("bench_latency", body, opts.wait_quiet)
    if run is None:
        return 1
    if opts.json:
        write_json(opts.json, {"config": config_of(opts), "results": results, **run})
    return 1 if run["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
