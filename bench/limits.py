"""Limits: how far vrangefs goes, what each step costs, and how it fails past the end.

Usage (as root, from the repository root):

    .venv/bin/python bench/limits.py [--parts sparse,units,files,names,xattrs]
        [--sparse-sizes 1T,64T,max] [--units 1000000] [--files 100000] [--xattrs 10000]
        [--big-xattrs 1000] [--memory-cap 1G] [--json OUT] [--wait-quiet SECONDS]

Each part gets a fresh mount (``--memory-cap``); every step runs in a forked child with a
timeout, so a hung mount ends the benchmark with an error instead of blocking it; the
daemon's VmRSS is read from /proc around the steps (never through a request).

sparse  For each size S (``max``: 2**63 - 1 bytes): ``ftruncate`` a new file to S
        (st_blocks and df's used bytes must not change), write one byte at S - 1 and read
        it back (after POSIX_FADV_DONTNEED, so the read reaches the daemon), mark the whole
        file volatile, list it, one ``stats`` request, purge all (the last page is then
        purged: reading it gives EIO), unmark.
units   N one-page units on the even pages of a sparse file of 2N + 2 pages, made with N
        setxattr calls (the time of each tenth of them shows whether marks slow down as the
        tree grows); the daemon's memory a unit; a ``stats`` request; listing them (E2BIG
        past 64 KiB); 1,000 mark/unmark round trips on odd pages; purge all; unmark all.
files   N empty files in one directory: create (O_CREAT|O_EXCL, close), ``ls -f | wc -l``,
        ``stat`` each (after drop_caches, so each one reaches the daemon), unlink each.
names   NAME_MAX (255 ok, 256 ENAMETOOLONG), PATH_MAX (a 4095-byte path ok, 4096
        ENAMETOOLONG) and nesting 40 directories of 250 bytes deeper through relative paths.
xattrs  N ordinary xattrs (``user.xNNNNNN``, 64-byte values) on one file: set, list (E2BIG
        once the names pass 64 KiB), get each; then M values of 64 KiB on another file:
        the daemon's memory grows by their size while df's used bytes do not (xattrs are
        not file data and are not counted against the memory cap).

Output: one table, a row a step: what, how many, seconds, microseconds an item, the
daemon's RSS change, and the result (ok, or the errno it failed with where that is the
expected answer). ``--json`` writes every raw number.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from vrange_util import (
    NONVOLATILE,
    PAGE,
    PURGE,
    STATS,
    VOLATILE,
    BenchError,
    Session,
    add_wait_quiet,
    config_of,
    in_child,
    parse_size,
    rss_bytes,
    run_session,
    stats,
    write_json,
)

MiB = 1 << 20
MAX_SIZE = 2**63 - 1  # the largest file size (and range end) there is
PARTS = ("sparse", "units", "files", "names", "xattrs")
HEAD = ["part", "step", "items", "seconds", "us/item", "RSS delta MiB", "result"]

Row = dict[str, Any]
T = TypeVar("T")


def row(
    part: str,
    step: str,
    items: int = 1,
    seconds: float | None = None,
    rss_delta: int | None = None,
    result: str = "ok",
) -> Row:
    return {
        "part": part,
        "step": step,
        "items": items,
        "seconds": seconds,
        "us_per_item": None if seconds is None else seconds / max(items, 1) * 1e6,
        "rss_delta_MiB": None if rss_delta is None else rss_delta / MiB,
        "result": result,
    }


def human(size: int) -> str:
    """1099511627776 -> '1 TiB'."""
    if size == MAX_SIZE:
        return "2**63-1 B"
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} B"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def each(fn: Callable[[T], object], items: Iterable[T]) -> Callable[[], None]:
    """A function that calls *fn* on each item, for :func:`timed`."""

    def run() -> None:
        for item in items:
            fn(item)

    return run


def errno_name(fn: Callable[[], object]) -> str:
    """'ok', or the errno name *fn* failed with."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def used_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def expect(what: str, got: object, want: object) -> None:
    if got != want:
        raise BenchError(f"{what}: got {got!r}, expected {want!r}")


# -- sparse --------------------------------------------------------------------------------
def sparse_part(mnt: Path, pid: int, size: int) -> list[Row]:
    part = f"sparse {human(size)}"
    rows = []
    path = mnt / f"sparse-{size}"
    used, rss = used_bytes(mnt), rss_bytes(pid)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        secs, _ = timed(lambda: os.ftruncate(fd, size))
        st = os.fstat(fd)
        expect("st_blocks after ftruncate", st.st_blocks, 0)
        expect("df used after ftruncate", used_bytes(mnt), used)
        rows.append(row(part, "ftruncate (st_blocks 0, df unchanged)", 1, secs))

        def last_byte() -> None:
            os.pwrite(fd, b"Z", size - 1)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            expect("byte read back", os.pread(fd, 1, size - 1), b"Z")

        secs, _ = timed(last_byte)
        expect("df used after one byte", used_bytes(mnt), used + PAGE)
        rows.append(row(part, "write byte at end, read back", 1, secs))
        for step, name in (
            ("mark whole file volatile", VOLATILE),
            ("mark it non-volatile", NONVOLATILE),
            ("mark it volatile again", VOLATILE),
        ):
            secs, _ = timed(functools.partial(os.setxattr, fd, name, b"0,0"))
            rows.append(row(part, step, 1, secs))
        secs, listing = timed(lambda: os.getxattr(fd, VOLATILE))
        expect("volatile listing", listing, b"0,%d\n" % size)
        rows.append(row(part, "list volatile (1 unit)", 1, secs))
        secs, _ = timed(lambda: os.getxattr(mnt, STATS))
        rows.append(row(part, "one stats request", 1, secs))
        secs, _ = timed(lambda: os.setxattr(mnt, PURGE, b"all"))
        result = errno_name(lambda: os.pread(fd, 1, size - 1))
        expect("reading the purged last page", result, "EIO")
        rows.append(row(part, "purge all (1 unit)", 1, secs, result="ok, then read: EIO"))
        secs, _ = timed(lambda: os.setxattr(fd, NONVOLATILE, b"0,0"))
        rows.append(row(part, "unmark whole file", 1, secs, rss_bytes(pid) - rss))
    finally:
        os.close(fd)
        path.unlink()
    return rows


# -- units ---------------------------------------------------------------------------------
def units_part(mnt: Path, pid: int, units: int) -> list[Row]:
    part = f"units {units:,}"
    rows = []
    path = mnt / "units"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, (2 * units + 2) * PAGE)
        rss = rss_bytes(pid)
        tenth = max(units // 10, 1)
        tenths = []
        start = time.perf_counter()
        block = start
        for i in range(units):
            os.setxattr(fd, VOLATILE, b"%d,4096" % (2 * i * PAGE))
            if (i + 1) % tenth == 0:
                now = time.perf_counter()
                tenths.append(now - block)
                block = now
        secs = time.perf_counter() - start
        grown = rss_bytes(pid) - rss
        rows.append(
            row(
                part,
                f"create by setxattr ({grown / units:.0f} B of RSS a unit)",
                units,
                secs,
                grown,
            )
        )
        rows.append(row(part, "  first tenth of the marks", tenth, tenths[0]))
        rows.append(row(part, "  last tenth of the marks", tenth, tenths[-1]))
        secs, _ = timed(lambda: os.getxattr(mnt, STATS))
        rows.append(row(part, "one stats request", 1, secs))
        result = errno_name(lambda: os.getxattr(fd, VOLATILE))
        rows.append(row(part, "list volatile", 1, None, result=result))
        rounds = 1000

        def round_trips() -> None:
            for i in range(rounds):
                odd = b"%d,4096" % ((2 * (i * 7919 % units) + 1) * PAGE)
                os.setxattr(fd, VOLATILE, odd)
                os.setxattr(fd, NONVOLATILE, odd)

        secs, _ = timed(round_trips)
        rows.append(row(part, "mark+unmark round trip (odd page)", rounds, secs))
        events = stats(mnt)["purge_events"]
        secs, _ = timed(lambda: os.setxattr(mnt, PURGE, b"all"))
        expect("units purged", stats(mnt)["purge_events"] - events, units)
        rows.append(row(part, "purge all", units, secs))
        secs, _ = timed(lambda: os.setxattr(fd, NONVOLATILE, b"0,0"))
        expect("volatile after unmark all", os.getxattr(fd, VOLATILE), b"")
        rows.append(row(part, "unmark all (one request)", units, secs, rss_bytes(pid) - rss))
    finally:
        os.close(fd)
        path.unlink()
    return rows


# -- files ---------------------------------------------------------------------------------
def files_part(mnt: Path, pid: int, files: int) -> list[Row]:
    part = f"files {files:,}"
    rows = []
    d = mnt / "many"
    d.mkdir()
    names = [f"f{i:07d}" for i in range(files)]
    rss = rss_bytes(pid)

    def create() -> None:
        for name in names:
            os.close(os.open(d / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    secs, _ = timed(create)
    rows.append(row(part, "create (O_CREAT|O_EXCL, close)", files, secs, rss_bytes(pid) - rss))
    secs, out = timed(
        lambda: (
            subprocess.run(
                f"ls -f '{d}' | wc -l", shell=True, capture_output=True, text=True, check=True
            ).stdout
        )
    )
    listed = int(str(out))
    if listed not in (files, files + 2):
        raise BenchError(f"ls -f listed {listed} entries, not {files} (+ . and ..)")
    rows.append(row(part, f"ls -f | wc -l ({listed})", files, secs))
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    secs, _ = timed(each(lambda name: os.stat(d / name), names))
    rows.append(row(part, "stat each (cold: after drop_caches)", files, secs))
    secs, _ = timed(each(lambda name: os.stat(d / name), names))
    rows.append(row(part, "stat each (warm)", files, secs))

    def unlink() -> None:
        for name in names:
            os.unlink(d / name)

    secs, _ = timed(unlink)
    d.rmdir()
    rows.append(row(part, "unlink each", files, secs, rss_bytes(pid) - rss))
    return rows


# -- names and paths -----------------------------------------------------------------------
def names_part(mnt: Path, pid: int) -> list[Row]:
    part = "names"
    rows = []
    d = mnt / "names"
    d.mkdir()
    for length in (255, 256):
        result = errno_name(functools.partial(Path.write_bytes, d / ("n" * length), b""))
        rows.append(row(part, f"create a {length}-byte name", 1, None, result=result))
    component = "d" * 250
    path = str(d)
    start = time.perf_counter()
    levels = 0
    while len(path) + 1 + len(component) <= 4095:
        path = f"{path}/{component}"
        os.mkdir(path)
        levels += 1
    last = f"{path}/" + "e" * (4095 - len(path) - 1)
    os.mkdir(last)
    secs = time.perf_counter() - start
    rows.append(row(part, f"mkdir to a 4095-byte path ({levels + 1} levels)", levels + 1, secs))
    result = errno_name(lambda: os.mkdir(last + "x"))
    rows.append(row(part, "mkdir a 4096-byte path", 1, None, result=result))

    def deeper() -> None:  # this part runs in a child of its own: chdir is harmless
        os.chdir(path)
        for _ in range(40):
            os.mkdir(component)
            os.chdir(component)
        Path("leaf").write_bytes(b"deep")
        expect("the deepest file", Path("leaf").read_bytes(), b"deep")
        os.chdir("/")

    secs, _ = timed(deeper)
    depth = len(path) + 40 * (len(component) + 1)
    rows.append(row(part, f"40 levels deeper by chdir ({depth:,}-byte path)", 40, secs))
    secs, _ = timed(functools.partial(shutil.rmtree, d))
    rows.append(row(part, "remove all (rmtree: directory fds)", levels + 41, secs))
    return rows


# -- extended attributes -------------------------------------------------------------------
def xattrs_part(mnt: Path, pid: int, count: int, big: int) -> list[Row]:
    part = "xattrs"
    rows = []
    f = mnt / "xattrs"
    f.write_bytes(b"x")
    names = [f"user.x{i:06d}" for i in range(count)]
    value = b"v" * 64
    rss = rss_bytes(pid)
    secs, _ = timed(each(lambda n: os.setxattr(f, n, value), names))
    rows.append(row(part, f"set {count:,} (64-byte values)", count, secs, rss_bytes(pid) - rss))
    listing = sum(len(n) + 1 for n in names)
    result = errno_name(lambda: os.listxattr(f))
    rows.append(row(part, f"listxattr ({listing:,} bytes of names)", 1, None, result=result))
    secs, _ = timed(each(lambda n: os.getxattr(f, n), names))
    rows.append(row(part, "get each", count, secs))
    secs, _ = timed(each(lambda n: os.removexattr(f, n), names))
    rows.append(row(part, "remove each", count, secs))

    g = mnt / "big-xattrs"
    g.write_bytes(b"x")
    used, rss = used_bytes(mnt), rss_bytes(pid)
    blob = bytes(range(256)) * 256
    secs, _ = timed(each(lambda i: os.setxattr(g, f"user.big{i:06d}", blob), range(big)))
    grown = rss_bytes(pid) - rss
    rows.append(
        row(
            part,
            f"set {big:,} x 64 KiB (df used +{(used_bytes(mnt) - used) // MiB} MiB)",
            big,
            secs,
            grown,
            result="ok (outside the cap)",
        )
    )
    g.unlink()
    f.unlink()
    return rows


# -- the benchmark -------------------------------------------------------------------------
def run_part(session: Session, opts: argparse.Namespace, part: str) -> list[Row]:
    rows: list[Row] = []
    with session.vrangefs(opts.memory_cap) as (mnt, pid):
        rss = rss_bytes(pid) / MiB
        rows.append(row(part, f"(daemon RSS at mount: {rss:.1f} MiB)", 0, result=""))
        if part == "sparse":
            for size in opts.sparse_sizes:
                rows += in_child(sparse_part, mnt, pid, size, timeout=300, what=part)
        elif part == "units":
            rows += in_child(
                units_part, mnt, pid, opts.units, timeout=120 + opts.units / 200, what=part
            )
        elif part == "files":
            rows += in_child(
                files_part, mnt, pid, opts.files, timeout=120 + opts.files / 100, what=part
            )
        elif part == "names":
            rows += in_child(names_part, mnt, pid, timeout=120, what=part)
        else:
            rows += in_child(
                xattrs_part, mnt, pid, opts.xattrs, opts.big_xattrs, timeout=300, what=part
            )
    return rows


def show(rows: list[Row]) -> str:
    """The table: text columns left-aligned, numbers right-aligned."""

    def num(value: float | None, digits: int) -> str:
        if value is None:
            return "-"
        return f"{value:,.{digits}f}" if value < 1000 else f"{value:,.0f}"

    cells = [HEAD] + [
        [
            r["part"],
            r["step"],
            f"{r['items']:,}" if r["items"] else "",
            num(r["seconds"], 3),
            num(r["us_per_item"], 1),
            num(r["rss_delta_MiB"], 1),
            r["result"],
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
    left = {0, 1, len(HEAD) - 1}
    lines = []
    for n, cell in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cell, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    parser.add_argument(
        "--sparse-sizes", default="1T,64T,max", help="sparse file sizes; max: 2**63 - 1"
    )
    parser.add_argument("--units", type=int, default=1_000_000, help="units in one file")
    parser.add_argument("--files", type=int, default=100_000, help="files in one directory")
    parser.add_argument("--xattrs", type=int, default=10_000, help="small xattrs on one file")
    parser.add_argument("--big-xattrs", type=int, default=1000, help="64 KiB xattrs")
    parser.add_argument("--memory-cap", default="1G", help="vrangefs --memory-cap (1G)")
    parser.add_argument("--json", type=Path, help="write every raw number here")
    add_wait_quiet(parser)
    opts = parser.parse_args(argv)
    opts.parts = [p for p in opts.parts.split(",") if p]
    unknown = set(opts.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    try:
        opts.sparse_sizes = [
            MAX_SIZE if s == "max" else parse_size(s) for s in opts.sparse_sizes.split(",")
        ]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--sparse-sizes: {exc}")
    if min(opts.units, opts.files, opts.xattrs, opts.big_xattrs) < 1:
        parser.error("counts must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    rows: list[Row] = []

    def body(session: Session) -> None:
        for part in opts.parts:
            print(f"{part} ...", flush=True)
            start = time.perf_counter()
            rows.extend(run_part(session, opts, part))
            print(f"  {part}: {time.perf_counter() - start:.0f} s", flush=True)

    meta = run_session("limits.py", body, opts.wait_quiet)
    if meta is None:
        return 2
    loads = os.getloadavg()
    text = show(rows) if rows else ""
    print(f"load average at the end: {loads[0]:.2f} {loads[1]:.2f} {loads[2]:.2f}", flush=True)
    if opts.json:
        write_json(
            opts.json,
            {"config": config_of(opts), "rows": rows, "table": text, "loadavg": loads, **meta},
        )
    return 1 if meta["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
