"""Eviction: the cost of purging, of choosing victims, and memory while streaming past the cap.

Usage (as root, from the repository root):

    .venv/bin/python bench/bench_evict.py [--parts a,b,c] [--runs 3] [--json OUT]
        [--purge-size 1G] [--victim-units 1000,1000000] [--stream-total 4G]
        [--stream-cap 256M] [--stream-out bench/results/evict-4g]

(a) purge: SIZE of data (written, so resident) held as SIZE/4096 one-page units, and as one
    unit; time of ``os.setxattr(MOUNT, "user.vrange.purge", b"all")`` (it returns once the
    kernel's cache of every purged inode is invalidated).  Seconds and GB/s (10^9 B/s).
(b) choosing victims at the cap, with N one-page units: a mount whose cap is N + 1 pages
    (``--low-watermark 50%``) is filled with one file of N pages, each page marked volatile
    (N units, in page order).  A round then writes the free room into a new file (first one
    page alone: the baseline write), then one more 4 KiB write: that one finds the mount full
    and purges whole units, oldest first, down to the low watermark (at most 64 MiB beyond
    need: ``RECLAIM_EXTRA_PAGES``).  Per purged unit = (purging write - baseline write) /
    units it purged (``purge_events_cap`` before and after).  Rounds go on while enough units
    are left; then an explicit purge of the rest, divided by its units.  The same is done
    in-process on vrangefs' model (``Volume.write`` / ``Volume.purge_all``, no FUSE).
(c) streaming: ``--stream-total`` written through a ``--stream-cap`` mount as 4 MiB files,
    each marked volatile after it is written; every 16th file, the previous file is checked
    intact (non-volatile, nothing purged, bytes right, volatile again) and the file 2 x cap back
    is checked purged (reads fail with EIO).  A thread samples ``resident_bytes`` (stats) and the
    daemon's VmRSS every 100 ms: resident must stay <= cap, RSS <= 1.2 x cap + 50 MiB.  The
    samples and a plot go to ``--stream-out`` (.json, .png).

Sequential read/write speed against tmpfs is bench_fs.py's job (see bench/README.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vrange_util import (
    NONVOLATILE,
    PAGE,
    PURGE,
    VOLATILE,
    BenchError,
    Session,
    add_wait_quiet,
    config_of,
    fmt,
    in_child,
    median,
    parse_size,
    print_table,
    rss_bytes,
    run_session,
    setxattr_loop,
    stats,
    write_json,
)

MiB = 1 << 20
GB = 1e9
PURGED = "user.vrange.purged"
CHUNK = MiB
VICTIM_RATIO_TARGET = 3.0
RSS_FACTOR, RSS_SLACK = 1.2, 50 * MiB


def fill(path: str, pages: int, byte: int = 0x5A) -> None:
    """Write *pages* pages of *byte* to a new file *path* in 1 MiB writes."""
    buf = bytes([byte]) * CHUNK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = pages * PAGE
        while left:
            n = os.write(fd, memoryview(buf)[: min(left, CHUNK)])
            left -= n
    finally:
        os.close(fd)


def setup_units(path: str, pages: int, one_unit: bool) -> float:
    """Write *pages* pages to *path* and mark them volatile (one unit, or one per page)."""
    fill(path, pages)
    if one_unit:
        os.setxattr(path, VOLATILE, b"0,0")
        return 0.0
    return setxattr_loop(path, [(VOLATILE, b"%d,%d" % (i * PAGE, PAGE)) for i in range(pages)])


def timed_purge_all(mountpoint: str) -> float:
    start = time.perf_counter()
    os.setxattr(mountpoint, PURGE, b"all")
    return time.perf_counter() - start


# -- (a) explicit purge ---------------------------------------------------------


def part_a(session: Session, opts: argparse.Namespace, run: int) -> dict[str, Any]:
    size: int = opts.purge_size
    pages = size // PAGE
    cap = str(size + 64 * MiB)
    res: dict[str, Any] = {}
    for label, one_unit in (("one", True), ("pages", False)):
        with session.vrangefs(cap, "--pressure-purge", "off") as (mnt, _pid):
            path = str(mnt / "data")
            setup = in_child(
                setup_units, path, pages, one_unit, timeout=300 + pages / 200, what="(a) set-up"
            )
            before = stats(mnt)
            units = 1 if one_unit else pages
            if before["volatile_units"] != units or before["resident_bytes"] != size:
                raise BenchError(f"(a) set-up left {before}")
            secs = in_child(timed_purge_all, str(mnt), timeout=300, what="(a) purge all")
            after = stats(mnt)
            if after["resident_bytes"] != 0 or after["purge_events_explicit"] != units:
                raise BenchError(f"(a) purge all left {after}")
            res[f"purge_s[{label}]"] = secs
            res[f"purge_GBps[{label}]"] = size / secs / GB
            res[f"purge_us_per_unit[{label}]"] = secs / units * 1e6
            res[f"setup_s[{label}]"] = setup
    print(f"  (a) run {run + 1}: " + ", ".join(f"{k}={fmt(v)}" for k, v in res.items()), flush=True)
    return res


# -- (b) choosing victims ---------------------------------------------------------


def pwrite_page(fd: int, page: int) -> float:
    buf = b"\xa5" * PAGE
    start = time.perf_counter()
    if os.pwrite(fd, buf, page * PAGE) != PAGE:
        raise OSError("short write")
    return time.perf_counter() - start


def victim_rounds(mountpoint: str, units: int, max_rounds: int) -> dict[str, Any]:
    """Rounds of (fill the free room, one purging write) on a full mount; then purge all."""
    mnt = Path(mountpoint)
    rounds: list[dict[str, float]] = []
    for r in range(max_rounds):
        st = stats(mnt)
        free = (st["memory_cap"] - st["resident_bytes"]) // PAGE
        per_round = min(units - st["low_watermark_bytes"] // PAGE, 16384) + 1
        if st["volatile_units"] < 2 * per_round and r > 0:
            break
        fd = os.open(mnt / f"round-{r}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if free < 1:
                raise BenchError(f"round {r}: no free page for the baseline write")
            base = pwrite_page(fd, 0)  # fits: no purge
            if free > 1:
                os.pwrite(fd, b"\x5a" * ((free - 1) * PAGE), PAGE)
            before = stats(mnt)["purge_events_cap"]
            if before != st["purge_events_cap"]:
                raise BenchError(f"filling the free room purged {before - st['purge_events_cap']}")
            t = pwrite_page(fd, free)
        finally:
            os.close(fd)
        purged = stats(mnt)["purge_events_cap"] - before
        if purged < 1:
            raise BenchError(f"round {r}: the write past the cap purged nothing")
        rounds.append({"write_s": t, "base_s": base, "units": purged})
    left = stats(mnt)["volatile_units"]
    explicit = timed_purge_all(mountpoint) if left else 0.0
    return {"rounds": rounds, "explicit_s": explicit, "explicit_units": left}


def model_victims(units: int, max_rounds: int) -> dict[str, Any]:
    """The same on vrangefs' in-process model: Volume.write past the cap, Volume.purge_all."""
    from vrangefs.inodes import ROOT_INO  # noqa: PLC0415  (daemon code, only here)
    from vrangefs.pagestore import PageStore  # noqa: PLC0415
    from vrangefs.protocol import PurgeCause  # noqa: PLC0415
    from vrangefs.volume import Caller, Volume  # noqa: PLC0415

    volume = Volume(PageStore((units + 1) * PAGE), low_watermark=0.5)
    ino = volume.create(ROOT_INO, b"u", 0o644, Caller(0, 0)).ino
    chunk = b"\x5a" * CHUNK
    for off in range(0, units * PAGE, CHUNK):
        volume.write(ino, off, chunk[: min(CHUNK, units * PAGE - off)])
    for i in range(units):
        volume.mark_volatile(ino, i * PAGE, PAGE)
    page = b"\xa5" * PAGE
    rounds: list[dict[str, float]] = []
    reclaim = volume.reclaim

    def cap_units() -> int:
        return reclaim.statistics().purge_events[PurgeCause.CAP]

    for r in range(max_rounds):
        free = volume.store.free_pages
        per_round = min(units - reclaim.low_pages, 16384) + 1
        if len(reclaim.order) < 2 * per_round and r > 0:
            break
        w = volume.create(ROOT_INO, b"round-%d" % r, 0o644, Caller(0, 0)).ino
        start = time.perf_counter()
        volume.write(w, 0, page)
        base = time.perf_counter() - start
        if free > 1:
            volume.write(w, PAGE, b"\x5a" * ((free - 1) * PAGE))
        before = cap_units()
        start = time.perf_counter()
        volume.write(w, free * PAGE, page)
        rounds.append(
            {"write_s": time.perf_counter() - start, "base_s": base, "units": cap_units() - before}
        )
    left = len(reclaim.order)
    start = time.perf_counter()
    reclaim.purge_all()
    return {"rounds": rounds, "explicit_s": time.perf_counter() - start, "explicit_units": left}


def summarize_victims(out: dict[str, Any]) -> dict[str, float]:
    per = [(r["write_s"] - r["base_s"]) / r["units"] * 1e6 for r in out["rounds"]]
    res = {
        "at_cap_us": median(per),
        "at_cap_units_per_round": median([r["units"] for r in out["rounds"]]),
        "rounds": float(len(per)),
    }
    if out["explicit_units"]:
        res["explicit_us"] = out["explicit_s"] / out["explicit_units"] * 1e6
    return res


def part_b(session: Session, opts: argparse.Namespace, run: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for n in opts.victim_units:
        with session.vrangefs(
            str((n + 1) * PAGE), "--pressure-purge", "off", "--low-watermark", "50%"
        ) as (mnt, _pid):
            res[f"setup_s[{n}]"] = in_child(
                setup_units, str(mnt / "units"), n, False, timeout=300 + n / 200, what="(b) set-up"
            )
            st = stats(mnt)
            if st["volatile_units"] != n or st["resident_bytes"] != n * PAGE:
                raise BenchError(f"(b) set-up of {n} units left {st}")
            out = in_child(
                victim_rounds, str(mnt), n, opts.victim_rounds, timeout=600, what="(b) rounds"
            )
        res[f"raw[{n}]"] = out
        for key, value in summarize_victims(out).items():
            res[f"{key}[{n}]"] = value
        model = in_child(
            model_victims, n, opts.victim_rounds, timeout=300 + n / 500, what="(b) model"
        )
        res[f"model_raw[{n}]"] = model
        for key, value in summarize_victims(model).items():
            res[f"model_{key}[{n}]"] = value
    shown = {k: v for k, v in res.items() if isinstance(v, float)}
    print(f"  (b) run {run + 1}: " + ", ".join(f"{k}={fmt(v)}" for k, v in shown.items()))
    return res


# -- (c) streaming through the cap ----------------------------------------------------


def sampler(mnt: Path, pid: int, interval: float, stop: threading.Event, out: list[Any]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        t = time.monotonic() - t0
        try:
            st = stats(mnt)
            out.append(
                [t, st["resident_bytes"], rss_bytes(pid), st["purge_events"], st["volatile_units"]]
            )
        except (OSError, BenchError) as exc:
            out.append([t, None, None, None, str(exc)])
        stop.wait(interval)


def stream(
    mountpoint: str, pid: int, total: int, file_size: int, lag: int, interval: float
) -> dict[str, Any]:
    """Write *total* bytes as volatile files of *file_size*, with checks, sampling all along.

    Every 16th file, the one before is checked intact and the one *lag* files back purged.
    """
    mnt = Path(mountpoint)
    samples: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(target=sampler, args=(mnt, pid, interval, stop, samples))
    checks = {"intact_ok": 0, "intact_bad": [], "purged_ok": 0, "purged_bad": []}
    count = total // file_size
    thread.start()
    start = time.perf_counter()
    try:
        for i in range(count):
            path = mnt / f"f{i:05d}"
            chunk = bytes([1 + i % 251]) * min(CHUNK, file_size)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for off in range(0, file_size, len(chunk)):
                    os.pwrite(fd, chunk, off)
                os.setxattr(fd, VOLATILE, b"0,0")
            finally:
                os.close(fd)
            if i % 16 == 15:
                check_intact(mnt, i - 1, file_size, checks)
                if i >= lag:
                    check_purged(mnt, i - lag, checks)
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        thread.join()
    return {"samples": samples, "seconds": seconds, "files": count, "checks": checks}


def check_intact(mnt: Path, i: int, file_size: int, checks: dict[str, Any]) -> None:
    path = mnt / f"f{i:05d}"
    os.setxattr(path, NONVOLATILE, b"0,0")
    lost = os.getxattr(path, PURGED)
    data = path.read_bytes()
    os.setxattr(path, VOLATILE, b"0,0")
    if not lost and data == bytes([1 + i % 251]) * file_size:
        checks["intact_ok"] += 1
    else:
        checks["intact_bad"].append(f"f{i:05d}: purged={lost!r}, {len(data)} bytes")


def check_purged(mnt: Path, i: int, checks: dict[str, Any]) -> None:
    path = mnt / f"f{i:05d}"
    lost = os.getxattr(path, PURGED)
    try:
        with open(path, "rb") as f:
            f.read(PAGE)
        read_error = 0
    except OSError as exc:
        read_error = exc.errno or -1
    if lost and read_error == errno.EIO:
        checks["purged_ok"] += 1
    else:
        checks["purged_bad"].append(f"f{i:05d}: purged={lost!r}, read errno {read_error}")


def part_c(session: Session, opts: argparse.Namespace) -> dict[str, Any]:
    cap: int = opts.stream_cap
    with session.vrangefs(str(cap)) as (mnt, pid):
        rss_start = rss_bytes(pid)
        out = in_child(
            stream,
            str(mnt),
            pid,
            opts.stream_total,
            opts.stream_file_size,
            max(2 * cap // opts.stream_file_size, 2),
            opts.stream_interval,
            timeout=600 + opts.stream_total / (5 * MiB),
            what="(c) streaming",
        )
        final = stats(mnt)
    good = [s for s in out["samples"] if s[1] is not None]
    if not good:
        raise BenchError(f"(c) no sample could be read: {out['samples'][:3]}")
    rss_limit = RSS_FACTOR * cap + RSS_SLACK
    res = {
        "cap": cap,
        "rss_limit": rss_limit,
        "rss_start": rss_start,
        "total": opts.stream_total,
        "seconds": out["seconds"],
        "write_GBps": opts.stream_total / out["seconds"] / GB,
        "samples_taken": len(out["samples"]),
        "samples_failed": len(out["samples"]) - len(good),
        "max_resident": max(s[1] for s in good),
        "max_rss": max(s[2] for s in good),
        "final_stats": final,
        "checks": out["checks"],
        "samples": out["samples"],
    }
    res["resident_ok"] = res["max_resident"] <= cap
    res["rss_ok"] = res["max_rss"] <= rss_limit
    plot(res, opts.stream_out.with_suffix(".png"))
    return res


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only (c) needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    good = [s for s in res["samples"] if s[1] is not None]
    t = [s[0] for s in good]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s[1] / MiB for s in good], label="resident data (stats)")
    ax.plot(t, [s[2] / MiB for s in good], label="daemon RSS (VmRSS)")
    ax.axhline(res["cap"] / MiB, color="black", linestyle="--", label="memory cap")
    ax.axhline(res["rss_limit"] / MiB, color="red", linestyle=":", label="RSS limit 1.2 x cap + 50")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"vrangefs: {res['total'] / MiB:,.0f} MiB of volatile files through a "
        f"{res['cap'] / MiB:.0f} MiB cap ({res['write_GBps']:.2f} GB/s)"
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}", flush=True)


# -- report -------------------------------------------------------------------------


def med_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), float | int)]
    return median(values) if values else None


def report_a(runs: list[dict[str, Any]]) -> str:
    rows = []
    for label, what in (("pages", "one-page units"), ("one", "one unit")):
        rows.append(
            [
                what,
                fmt(med_of(runs, f"purge_s[{label}]")),
                fmt(med_of(runs, f"purge_GBps[{label}]")),
                fmt(med_of(runs, f"purge_us_per_unit[{label}]")),
                fmt(med_of(runs, f"setup_s[{label}]")),
            ]
        )
    head = [f"(a) purge all (median of {len(runs)})", "seconds", "GB/s", "us/unit", "marking s"]
    return print_table(head, rows)


def report_b(runs: list[dict[str, Any]], units: list[int]) -> tuple[str, dict[str, Any]]:
    rows = []
    for what, prefix in (("through FUSE", ""), ("model (no FUSE)", "model_")):
        for key, label in (("at_cap_us", "at the cap"), ("explicit_us", "explicit purge")):
            vals = [med_of(runs, f"{prefix}{key}[{n}]") for n in units]
            ratio = vals[-1] / vals[0] if vals[0] and vals[-1] else None
            rows.append([f"{label}, {what}", *(fmt(v) for v in vals), fmt(ratio)])
    rows.append(
        [
            "units purged per write at the cap",
            *(fmt(med_of(runs, f"at_cap_units_per_round[{n}]")) for n in units),
            "-",
        ]
    )
    rows.append(
        ["marking N units, seconds", *(fmt(med_of(runs, f"setup_s[{n}]")) for n in units), "-"]
    )
    head = [
        f"(b) us per purged unit (median of {len(runs)})",
        *(f"{n:,} units" for n in units),
        "ratio",
    ]
    table = print_table(head, rows)
    lo, hi = med_of(runs, f"at_cap_us[{units[0]}]"), med_of(runs, f"at_cap_us[{units[-1]}]")
    verdict: dict[str, Any] = {}
    if lo and hi:
        verdict = {"ratio": hi / lo, "target": VICTIM_RATIO_TARGET}
        verdict["met"] = hi / lo <= VICTIM_RATIO_TARGET
        print(
            f"per purge at the cap, {units[-1]:,} / {units[0]:,} units = {hi / lo:.2f} "
            f"(target <= {VICTIM_RATIO_TARGET}): {'met' if verdict['met'] else 'NOT met'}"
        )
    return table, verdict


def report_c(res: dict[str, Any]) -> str:
    rows = [
        ["written", f"{res['total'] / MiB:,.0f} MiB in {res['seconds']:.1f} s"],
        ["write rate (GB/s)", fmt(res["write_GBps"])],
        ["memory cap (MiB)", fmt(res["cap"] / MiB)],
        ["max resident (MiB)", fmt(res["max_resident"] / MiB)],
        ["max daemon RSS (MiB)", fmt(res["max_rss"] / MiB)],
        ["RSS limit 1.2 x cap + 50 MiB", fmt(res["rss_limit"] / MiB)],
        ["samples (failed)", f"{res['samples_taken']} ({res['samples_failed']})"],
        ["purge events / units at end", str(res["final_stats"].get("purge_events"))],
        ["pressure purges", str(res["final_stats"].get("purge_events_pressure"))],
        [
            "intact checks ok / bad",
            f"{res['checks']['intact_ok']} / {len(res['checks']['intact_bad'])}",
        ],
        [
            "purged checks ok / bad",
            f"{res['checks']['purged_ok']} / {len(res['checks']['purged_bad'])}",
        ],
        ["resident <= cap throughout", "yes" if res["resident_ok"] else "NO"],
        ["RSS <= limit throughout", "yes" if res["rss_ok"] else "NO"],
    ]
    return print_table(["(c) streaming", "value"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--parts", default="a,b,c", help="any of a,b,c (default all)")
    parser.add_argument("--runs", type=int, default=3, help="runs of (a) and (b); medians")
    parser.add_argument("--json", type=Path, help="every raw number of (a) and (b) here")
    parser.add_argument("--purge-size", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--victim-units", default="1000,1000000")
    parser.add_argument("--victim-rounds", type=int, default=5, help="max rounds per mount")
    parser.add_argument("--stream-total", type=parse_size, default=parse_size("4G"))
    parser.add_argument("--stream-cap", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--stream-file-size", type=parse_size, default=parse_size("4M"))
    parser.add_argument("--stream-interval", type=float, default=0.1, help="seconds")
    parser.add_argument(
        "--stream-out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "evict-4g",
        help="(c) writes OUT.json and OUT.png (default bench/results/evict-4g)",
    )
    add_wait_quiet(parser)
    opts = parser.parse_args(argv)
    opts.parts = set(opts.parts.split(","))
    if not opts.parts <= {"a", "b", "c"}:
        parser.error("--parts: any of a, b, c")
    opts.victim_units = sorted({int(u) for u in opts.victim_units.split(",")})
    if opts.purge_size % PAGE or opts.stream_file_size % PAGE or min(opts.victim_units) < 4:
        parser.error("sizes must be whole pages, unit counts at least 4")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    runs_a: list[dict[str, Any]] = []
    runs_b: list[dict[str, Any]] = []
    streamed: list[dict[str, Any]] = []

    def body(session: Session) -> None:
        for run in range(opts.runs):
            if "a" in opts.parts:
                runs_a.append(part_a(session, opts, run))
            if "b" in opts.parts:
                runs_b.append(part_b(session, opts, run))
        if "c" in opts.parts:
            streamed.append(part_c(session, opts))

    meta = run_session("bench_evict.py", body, opts.wait_quiet)
    if meta is None:
        return 2
    doc: dict[str, Any] = {**meta, "config": config_of(opts)}
    print()
    if runs_a:
        doc["a"] = {"runs": runs_a, "table": report_a(runs_a)}
        print()
    if runs_b:
        table, verdict = report_b(runs_b, opts.victim_units)
        doc["b"] = {"runs": runs_b, "table": table, "targets": verdict}
        print()
    for res_c in streamed:
        table = report_c(res_c)
        write_json(opts.stream_out.with_suffix(".json"), {**doc, "c": {**res_c, "table": table}})
        doc["c"] = {k: v for k, v in res_c.items() if k != "samples"}
        doc["c"]["table"] = table
    print(
        "\n(d) sequential read/write against tmpfs: see bench_fs.py (bench/README.md), "
        "not repeated here."
    )
    if opts.json:
        write_json(opts.json, doc)
    return 1 if meta["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
