"""Timed system-call loops, run by bench_fs.py as child processes.

Usage (one JSON object on stdout; any failure is an exception and a non-zero exit):

    python bench/probes.py randread FILE --file-size BYTES --count N --seed S [--direct]
    python bench/probes.py smallfiles DIR --count N    (then stat each removed name twice)
    python bench/probes.py writes FILE --count N

Each loop runs in its own process so that the benchmark can bound it with a
timeout (a process blocked in a FUSE request still dies to SIGKILL), and the
process doing the I/O is never the one serving the mount.  Only the loop itself
is timed: interpreter start-up, opening and set-up are not.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import time

BLOCK = 4096


def randread(path: str, file_size: int, count: int, seed: int, direct: bool) -> dict[str, float]:
    """*count* preads of 4 KiB at random 4 KiB-aligned offsets of *path*."""
    blocks = file_size // BLOCK
    if blocks < 1:
        raise ValueError(f"file size {file_size} is smaller than one block")
    rng = random.Random(seed)
    offsets = [rng.randrange(blocks) * BLOCK for _ in range(count)]
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        start = time.perf_counter()
        for off in offsets:
            got = os.preadv(fd, [buf], off)
            if got != BLOCK:
                raise OSError(f"pread at {off} returned {got} bytes, expected {BLOCK}")
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"seconds": seconds, "ops": count}


def _missing(path: str) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        return
    raise OSError(f"{path} is still there")


def smallfiles(directory: str, count: int) -> dict[str, float]:
    """Create+write 4 KiB+close, then stat (twice), then unlink *count* files; then stat
    each removed name twice (the second time a kernel that caches misses answers alone)."""
    paths = [os.path.join(directory, f"small-{i:07d}") for i in range(count)]
    data = b"\xa5" * BLOCK
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, flags, 0o644)
        try:
            if os.write(fd, data) != BLOCK:
                raise OSError(f"short write to {path}")
        finally:
            os.close(fd)
    created = time.perf_counter()
    for path in paths:
        if os.stat(path).st_size != BLOCK:
            raise OSError(f"{path}: size {os.stat(path).st_size}, expected {BLOCK}")
    statted = time.perf_counter()
    for path in paths:
        os.stat(path)
    statted_again = time.perf_counter()
    for path in paths:
        os.unlink(path)
    unlinked = time.perf_counter()
    for path in paths:
        _missing(path)
    missed = time.perf_counter()
    for path in paths:
        _missing(path)
    missed_again = time.perf_counter()
    return {
        "ops": count,
        "create_seconds": created - start,
        "stat_seconds": statted - created,
        "stat_again_seconds": statted_again - statted,
        "unlink_seconds": unlinked - statted_again,
        "missing_seconds": missed - unlinked,
        "missing_again_seconds": missed_again - missed,
    }


def writes(path: str, count: int) -> dict[str, float]:
    """*count* write(2)s of 4 KiB, appending to one new file."""
    data = b"\x5a" * BLOCK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(count):
            if os.write(fd, data) != BLOCK:
                raise OSError(f"short write to {path}")
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"seconds": seconds, "ops": count}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="timed system-call loops for bench_fs.py")
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("randread")
    p.add_argument("path")
    p.add_argument("--file-size", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--direct", action="store_true", help="open with O_DIRECT")
    p = sub.add_parser("smallfiles")
    p.add_argument("path")
    p.add_argument("--count", type=int, required=True)
    p = sub.add_parser("writes")
    p.add_argument("path")
    p.add_argument("--count", type=int, required=True)
    opts = parser.parse_args(args)
    if opts.probe == "randread":
        result = randread(opts.path, opts.file_size, opts.count, opts.seed, opts.direct)
    elif opts.probe == "smallfiles":
        result = smallfiles(opts.path, opts.count)
    else:
        result = writes(opts.path, opts.count)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
