"""Volatile-range marking speed and the daemon's memory per purge unit.

Usage (as root, from the repository root):

    .venv/bin/python bench/bench_vrange.py [--runs 3] [--ops 20000] [--units 10,100000]
        [--memory-cap 1G] [--no-ceiling] [--json OUT]

For each unit count N, a sparse file of 2N+2 pages (``ftruncate``: marking needs pages inside
the file size, not resident data) gets N one-page units, on the even pages (adjacent or not,
each mark is its own unit).  A *round trip* is then ``os.setxattr(fd, user.vrange.volatile,
"OFF,4096")`` followed by ``os.setxattr(fd, user.vrange.nonvolatile, "OFF,4096")`` on an odd
page, so the file holds N units before and after each one; the odd pages are visited in a
seeded random order.  Each figure is timed in a child process over ``--ops`` round trips.

References, to show where the time goes:

- the same round trip done in-process on vrangefs' own model (``control.setxattr`` on a
  ``Volume``): the daemon's logic without FUSE, pyfuse3 or trio;
- ``getxattr`` of an absent ``user.`` name on vrangefs and on bench/ceiling.py: one FUSE round
  trip doing (almost) nothing, the floor for any xattr call through pyfuse3;
- ``setxattr`` of an ordinary stored ``user.`` xattr on vrangefs.

Marks (issue 12's figures): *new marks* are the N setxattr calls that create the N units above
(each makes a unit; marks/s = N / their time); *re-marks* mark the same written page over and
over (``--ops`` calls, the pattern of bench_pins' ``volatile_marks_per_s``); *written marks*
make ``--written-units`` adjacent one-page units on a file whose pages all hold data (so each
unit is queued for purging, the dearest kind). The floor of a mark is ``setxattr`` on
bench/ceiling.py, which accepts and forgets any value, with one pyfuse3 task as the ceiling
runs and with many (``ceiling-mt``: pyfuse3 then keeps a spare reader task, as vrangefs must).

Memory: the daemon's VmRSS (its pid from ``user.vrange.stats``) before and after creating the
units of the largest N, divided by N; and the same around the written marks. Every run uses a
fresh mount; tables show medians.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from vrange_util import (
    NONVOLATILE,
    PAGE,
    VOLATILE,
    BenchError,
    Session,
    add_wait_quiet,
    config_of,
    fmt,
    in_child,
    median,
    print_table,
    rss_bytes,
    run_session,
    setxattr_loop,
    stats,
    write_json,
)

TARGET_OPS = 10_000  # setxattr calls per second, one process
TARGET_RATIO = 2.0  # the largest N may be at most this much slower than the smallest
TARGET_MARKS = 14_000  # issue 12: marks per second from one process
TARGET_UNIT_BYTES = 300  # issue 12: daemon memory per volatile unit


def make_units(path: str, units: int) -> float:
    """Create *path* as a sparse file of 2*units+2 pages with *units* units on even pages."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, (2 * units + 2) * PAGE)
    finally:
        os.close(fd)
    return setxattr_loop(path, [(VOLATILE, b"%d,%d" % (2 * i * PAGE, PAGE)) for i in range(units)])


def make_written(path: str, units: int) -> None:
    """Create *path* with *units* pages of data (no units yet)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        block = b"w" * (256 * PAGE)
        for off in range(0, units * PAGE, len(block)):
            os.pwrite(fd, block[: units * PAGE - off], off)
    finally:
        os.close(fd)


def mark_pages(path: str, units: int) -> float:
    """Mark each of the first *units* pages of *path* as its own unit; return seconds."""
    return setxattr_loop(path, [(VOLATILE, b"%d,%d" % (i * PAGE, PAGE)) for i in range(units)])


def odd_offsets(units: int, ops: int, seed: int) -> list[bytes]:
    """*ops* values "OFF,4096" for odd pages 1..2*units-1 (or 1 if units == 0), shuffled."""
    pages = [2 * i + 1 for i in range(max(units, 1))]
    random.Random(seed).shuffle(pages)
    return [f"{pages[k % len(pages)] * PAGE},{PAGE}".encode() for k in range(ops)]


def round_trips(values: list[bytes]) -> list[tuple[str, bytes]]:
    """The setxattr calls that mark each value volatile, then non-volatile."""
    return [(name, value) for value in values for name in (VOLATILE, NONVOLATILE)]


def absent_getxattr(path: str, count: int) -> float:
    """*count* getxattr calls of a name that is not there (ENODATA); return seconds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for _ in range(count):
            try:
                os.getxattr(fd, "user.bench.absent")
            except OSError:
                pass
            else:
                raise BenchError("user.bench.absent exists")
        return time.perf_counter() - start
    finally:
        os.close(fd)


def model_round_trips(units: int, ops: int, seed: int) -> float:
    """The same round trips on vrangefs' in-process model (no FUSE); return seconds."""
    from vrangefs import control, protocol  # noqa: PLC0415  (daemon code, only here)
    from vrangefs.inodes import ROOT_INO  # noqa: PLC0415
    from vrangefs.pagestore import PageStore  # noqa: PLC0415
    from vrangefs.volume import AttrChange, Caller, Volume  # noqa: PLC0415

    volume = Volume(PageStore(1 << 20), metadata_cap=1 << 34)  # units on purpose
    ino = volume.create(ROOT_INO, b"f", 0o644, Caller(0, 0)).ino
    volume.setattr(ino, AttrChange(size=(2 * units + 2) * PAGE))
    for i in range(units):
        control.setxattr(volume, ino, protocol.VOLATILE_B, f"{2 * i * PAGE},{PAGE}".encode())
    values = odd_offsets(units, ops, seed)
    start = time.perf_counter()
    for value in values:
        control.setxattr(volume, ino, protocol.VOLATILE_B, value)
        control.setxattr(volume, ino, protocol.NONVOLATILE_B, value)
    return time.perf_counter() - start


def one_run(session: Session, opts: argparse.Namespace, run: int) -> dict[str, Any]:
    res: dict[str, Any] = {"run": run + 1}
    ops: int = opts.ops
    timeout = 120 + ops / 200
    with session.vrangefs(opts.memory_cap) as (mnt, pid):
        biggest = max(opts.units)
        for n in sorted(opts.units):
            path = str(mnt / f"units-{n}")
            rss_before = rss_bytes(pid)
            res[f"setup_s[{n}]"] = in_child(
                make_units, path, n, timeout=120 + n / 200, what=f"create {n} units"
            )
            rss_after = rss_bytes(pid)
            got = stats(mnt)["volatile_units"]
            if got != sum(u for u in opts.units if u <= n):
                raise BenchError(f"after creating {n} units stats say volatile_units={got}")
            res[f"new_marks_per_s[{n}]"] = n / res[f"setup_s[{n}]"]
            if n == biggest:
                res["rss_before_units_MiB"] = rss_before / (1 << 20)
                res["rss_after_units_MiB"] = rss_after / (1 << 20)
                res["rss_per_unit_B"] = (rss_after - rss_before) / n
        # Interleave the unit counts, twice each, so that drift hits all of them alike.
        for rep in range(2):
            for n in opts.units:
                values = odd_offsets(n, ops, seed=run * 10 + rep)
                secs = in_child(
                    setxattr_loop,
                    str(mnt / f"units-{n}"),
                    round_trips(values),
                    timeout=timeout,
                    what=f"round trips on {n} units",
                )
                res.setdefault(f"rt_per_s_passes[{n}]", []).append(ops / secs)
        for n in opts.units:
            res[f"rt_per_s[{n}]"] = max(res[f"rt_per_s_passes[{n}]"])  # the better pass
            res[f"ops_per_s[{n}]"] = 2 * res[f"rt_per_s[{n}]"]
        probe = str(mnt / f"units-{min(opts.units)}")
        res["absent_getxattr_per_s"] = ops / in_child(
            absent_getxattr, probe, ops, timeout=timeout, what="getxattr (absent)"
        )
        plain = [("user.bench.plain", b"%d" % (i & 7)) for i in range(ops)]
        res["plain_setxattr_per_s"] = ops / in_child(
            setxattr_loop, probe, plain, timeout=timeout, what="setxattr (plain)"
        )
        units_now = stats(mnt)["volatile_units"]
        if units_now != sum(opts.units):
            raise BenchError(f"round trips left volatile_units={units_now}, not {sum(opts.units)}")
        one = str(mnt / "one-page")
        Path(one).write_bytes(b"r" * PAGE)
        res["remarks_per_s"] = ops / in_child(
            setxattr_loop, one, [(VOLATILE, b"0,4096")] * ops, timeout=timeout, what="re-marks"
        )
        if opts.written_units:
            written, count = str(mnt / "written"), opts.written_units
            in_child(make_written, written, count, timeout=120 + count / 1000, what="write")
            queued = stats(mnt)["purgeable_units"]
            rss_before = rss_bytes(pid)
            secs = in_child(mark_pages, written, count, timeout=120 + count / 200, what="marks")
            res["written_marks_per_s"] = count / secs
            res["rss_per_written_unit_B"] = (rss_bytes(pid) - rss_before) / count
            got = stats(mnt)["purgeable_units"] - queued
            if got != count:
                raise BenchError(f"{count} written units, but {got} more purgeable_units")
    if opts.ceiling:
        for many in (False, True):
            with session.ceiling(max_tasks=1 << 30 if many else None) as cmnt:
                probe = str(cmnt / "probe")
                Path(probe).touch()
                tag = "ceiling_mt" if many else "ceiling"
                if not many:
                    res["ceiling_absent_getxattr_per_s"] = ops / in_child(
                        absent_getxattr, probe, ops, timeout=timeout, what="ceiling getxattr"
                    )
                calls = [(VOLATILE, b"0,4096")] * ops
                res[f"{tag}_setxattr_per_s"] = ops / in_child(
                    setxattr_loop, probe, calls, timeout=timeout, what=f"{tag} setxattr"
                )
    for n in opts.units:
        secs = in_child(
            model_round_trips, n, ops, run, timeout=timeout + n / 1000, what=f"model, {n} units"
        )
        res[f"model_ops_per_s[{n}]"] = 2 * ops / secs
    return res


def report(runs: list[dict[str, Any]], opts: argparse.Namespace) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if key in r]
        return median(values) if values else None

    meds = {key: med(key) for key, v in runs[0].items() if isinstance(v, float)}
    rows: list[list[str]] = []
    lo, hi = min(opts.units), max(opts.units)

    def row(label: str, key: str, per_op: bool = False) -> None:
        value = meds.get(key)
        extra = f"{1e6 / value:.1f}" if per_op and value else "-"
        rows.append([label, fmt(value), extra])

    for n in opts.units:
        row(f"new marks/s, making {n:,} units", f"new_marks_per_s[{n}]", per_op=True)
    row("re-marks/s of one written page", "remarks_per_s", per_op=True)
    row(f"marks/s, {opts.written_units:,} written pages", "written_marks_per_s", per_op=True)
    row("setxattr/s, ceiling (empty handler)", "ceiling_setxattr_per_s", per_op=True)
    row("setxattr/s, ceiling-mt (spare reader)", "ceiling_mt_setxattr_per_s", per_op=True)
    for n in opts.units:
        row(f"round trips/s, {n:,} units", f"rt_per_s[{n}]", per_op=True)
        row(f"  setxattr calls/s, {n:,} units", f"ops_per_s[{n}]", per_op=True)
    for n in opts.units:
        row(f"model only (no FUSE) calls/s, {n:,} units", f"model_ops_per_s[{n}]", per_op=True)
    row("getxattr absent name/s, vrangefs", "absent_getxattr_per_s", per_op=True)
    row("getxattr absent name/s, ceiling", "ceiling_absent_getxattr_per_s", per_op=True)
    row("setxattr plain user. xattr/s, vrangefs", "plain_setxattr_per_s", per_op=True)
    row(f"creating {hi:,} units, seconds", f"setup_s[{hi}]")
    row(f"daemon RSS before {hi:,} units (MiB)", "rss_before_units_MiB")
    row(f"daemon RSS after {hi:,} units (MiB)", "rss_after_units_MiB")
    row("daemon RSS per unit (bytes)", "rss_per_unit_B")
    row("daemon RSS per written (queued) unit (bytes)", "rss_per_written_unit_B")
    print()
    table = print_table([f"figure (median of {len(runs)})", "value", "us/call"], rows)

    verdict: dict[str, Any] = {}
    marks = [meds.get(f"new_marks_per_s[{hi}]"), meds.get("remarks_per_s")]
    marks.append(meds.get("written_marks_per_s"))
    unit_bytes = [meds.get("rss_per_unit_B"), meds.get("rss_per_written_unit_B")]
    if all(marks[:2]) and unit_bytes[0]:
        slowest = min(m for m in marks if m)
        dearest = max(b for b in unit_bytes if b)
        verdict["marks_target"] = TARGET_MARKS
        verdict["marks_met"] = slowest >= TARGET_MARKS
        verdict["unit_bytes_target"] = TARGET_UNIT_BYTES
        verdict["unit_bytes_met"] = dearest <= TARGET_UNIT_BYTES
        print(
            f"\nmarks/s >= {TARGET_MARKS:,}: {'met' if verdict['marks_met'] else 'NOT met'} "
            f"(slowest kind {fmt(slowest)}); daemon bytes per unit <= {TARGET_UNIT_BYTES}: "
            f"{'met' if verdict['unit_bytes_met'] else 'NOT met'} (dearest kind {fmt(dearest)})"
        )
    ops_lo, ops_hi = meds.get(f"ops_per_s[{lo}]"), meds.get(f"ops_per_s[{hi}]")
    if ops_lo and ops_hi:
        verdict |= {
            "ops_target": TARGET_OPS,
            "ops_met": min(ops_lo, ops_hi) >= TARGET_OPS,
            "round_trips_met": min(ops_lo, ops_hi) / 2 >= TARGET_OPS,
            "ratio_small_over_large": ops_lo / ops_hi,
            "ratio_met": ops_lo / ops_hi <= TARGET_RATIO,
        }
        print(
            f"\nsetxattr calls/s >= {TARGET_OPS:,}: {'met' if verdict['ops_met'] else 'NOT met'} "
            f"({fmt(ops_lo)} at {lo:,} units, {fmt(ops_hi)} at {hi:,}); round trips/s >= "
            f"{TARGET_OPS:,}: {'met' if verdict['round_trips_met'] else 'NOT met'}"
        )
        print(
            f"{lo:,} units / {hi:,} units = {ops_lo / ops_hi:.2f} (target <= {TARGET_RATIO}): "
            f"{'met' if verdict['ratio_met'] else 'NOT met'}"
        )
    return {"medians": meds, "table": table, "targets": verdict}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="fresh mounts; medians (default 3)")
    parser.add_argument("--ops", type=int, default=20000, help="round trips per figure")
    parser.add_argument("--units", default="10,100000", help="unit counts (default 10,100000)")
    parser.add_argument("--memory-cap", default="1G", help="vrangefs --memory-cap (default 1G)")
    parser.add_argument(
        "--written-units",
        type=int,
        default=50000,
        help="one-page units made on written pages (default 50000: 200 MiB of data; 0: none)",
    )
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false")
    parser.add_argument("--json", type=Path, help="write every raw number here")
    add_wait_quiet(parser)
    opts = parser.parse_args(argv)
    try:
        opts.units = sorted({int(u) for u in opts.units.split(",")})
    except ValueError:
        parser.error(f"--units: expected numbers separated by commas, got {opts.units!r}")
    if min(opts.units) < 1 or opts.runs < 1 or opts.ops < 1:
        parser.error("--runs, --ops and unit counts must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    runs: list[dict[str, Any]] = []

    def body(session: Session) -> None:
        for run in range(opts.runs):
            print(f"run {run + 1}/{opts.runs} ...", flush=True)
            res = one_run(session, opts, run)
            runs.append(res)
            shown = {k: v for k, v in res.items() if isinstance(v, float)}
            print("  " + ", ".join(f"{k}={fmt(v)}" for k, v in shown.items()), flush=True)

    meta = run_session("bench_vrange.py", body, opts.wait_quiet)
    if meta is None:
        return 2
    summary = report(runs, opts) if runs else {}
    if opts.json:
        write_json(opts.json, {"config": config_of(opts), "runs": runs, **summary, **meta})
    return 1 if meta["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
