"""The daemon's RSS and descriptors over long runs of create/write/unlink and mark/unmark.

Issue 12 asks that 100,000 cycles of each leave the daemon's RSS within 5 MiB of where it
started and its open descriptors unchanged (tests/integration/test_leaks.py checks a
shorter run). One mount (``--memory-cap 64M``), as root, from the repository root:

    .venv/bin/python bench/bench_leaks.py [--cycles 100000] [--every 10000] [--json OUT]

After a warm-up of 1,000 cycles of each kind (caches, free lists, first allocations), the
baseline is taken; then ``--cycles`` cycles of create + write 10,000 bytes + unlink (over
7 names in one directory), then as many of mark + unmark of one page of a 64-page file.
VmRSS, descriptors and ``metadata_bytes`` are sampled every ``--every`` cycles; the
table shows them against the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from vrange_util import (
    NONVOLATILE,
    PAGE,
    VOLATILE,
    Session,
    add_wait_quiet,
    config_of,
    in_child,
    print_table,
    rss_bytes,
    run_session,
    stats,
    write_json,
)

MiB = 1 << 20
WARM_UP = 1000
TARGET_GROWTH = 5 * MiB


def create_write_unlink(d: Path, first: int, count: int) -> None:
    data = b"x" * 10_000
    for i in range(first, first + count):
        f = d / f"f{i % 7}"
        f.write_bytes(data)
        f.unlink()


def mark_unmark(f: Path, first: int, count: int) -> None:
    fd = os.open(f, os.O_RDONLY)
    try:
        for i in range(first, first + count):
            value = b"%d,%d" % (i % 64 * PAGE, PAGE)
            os.setxattr(fd, VOLATILE, value)
            os.setxattr(fd, NONVOLATILE, value)
    finally:
        os.close(fd)


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(mnt: Path, pid: int, kind: str, cycles: int, t0: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "cycles": cycles,
        "seconds": time.monotonic() - t0,
        "rss": rss_bytes(pid),
        "fds": descriptors(pid),
        "metadata_bytes": stats(mnt)["metadata_bytes"],
    }


def measure(session: Session, cycles: int, every: int) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    with session.vrangefs("64M") as (mnt, pid):
        d = mnt / "d"
        d.mkdir()
        f = mnt / "marked"
        f.write_bytes(b"m" * (64 * PAGE))
        in_child(create_write_unlink, d, 0, WARM_UP, timeout=600, what="warm-up")
        in_child(mark_unmark, f, 0, WARM_UP, timeout=600, what="warm-up")
        t0 = time.monotonic()
        samples.append(sample(mnt, pid, "baseline", 0, t0))
        for kind, fn, target in (
            ("create/write/unlink", create_write_unlink, d),
            ("mark/unmark", mark_unmark, f),
        ):
            done = 0
            while done < cycles:
                step = min(every, cycles - done)
                in_child(fn, target, WARM_UP + done, step, timeout=1800, what=kind)
                done += step
                samples.append(sample(mnt, pid, kind, done, t0))
                print(_row(samples[0], samples[-1]), flush=True)
    return samples


def _row(base: dict[str, Any], s: dict[str, Any]) -> str:
    return (
        f"{s['kind']:<20} {s['cycles']:>7} cycles: RSS {(s['rss'] - base['rss']) / MiB:+.2f} MiB,"
        f" descriptors {s['fds'] - base['fds']:+d},"
        f" metadata_bytes {s['metadata_bytes'] - base['metadata_bytes']:+d}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    add_wait_quiet(parser)
    opts = parser.parse_args()
    samples: list[dict[str, Any]] = []

    def body(session: Session) -> None:
        samples.extend(measure(session, opts.cycles, opts.every))

    run = run_session("bench_leaks", body, opts.wait_quiet)
    if run is None:
        return 1
    if samples:
        base = samples[0]
        rows = []
        for kind in ("create/write/unlink", "mark/unmark"):
            last = [s for s in samples if s["kind"] == kind]
            if last:
                s = last[-1]
                grown = s["rss"] - base["rss"]
                rows.append(
                    [
                        kind,
                        f"{s['cycles']:,}",
                        f"{grown / MiB:+.2f}",
                        f"{s['fds'] - base['fds']:+d}",
                        "ok" if grown <= TARGET_GROWTH and s["fds"] == base["fds"] else "OVER",
                    ]
                )
        print_table(["after", "cycles", "RSS MiB", "descriptors", "<= 5 MiB, same fds"], rows)
    if opts.json:
        write_json(opts.json, {"config": config_of(opts), "samples": samples, **run})
    return 1 if run["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
