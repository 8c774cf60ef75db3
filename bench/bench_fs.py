"""Benchmark vrangefs against kernel tmpfs and the pyfuse3 ceiling (bench/ceiling.py).

Usage (as root: it mounts tmpfs and writes /proc/sys/vm/drop_caches):

    .venv/bin/python bench/bench_fs.py [--runs 3] [--size 1G] [--files 10000]
        [--only vrangefs,tmpfs,ceiling] [--ceiling-direct-io] [--ceiling-mt]
        [--wait-quiet SECONDS] [--json OUT]

Every filesystem is mounted under one temporary directory for the whole
session, the runs are interleaved (run 1 on each filesystem, then run 2, ...)
so that drift on the machine spreads over all of them, and everything is
unmounted at the end, also after an error, Ctrl-C or SIGTERM.  A filesystem
that fails a step is reported, unmounted and left out of the later runs; the
exit status is then 1.  See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from loadwatch import LoadWatch, add_wait_quiet, busy, wait_quiet

from vrangefs import mountinfo
from vrangefs.protocol import parse_stats

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000

FILESYSTEMS = ("tmpfs", "floor", "ceiling", "ceiling-mt", "ceiling-dio", "vrangefs")
CEILING_MT_TASKS = 2**31 - 1  # as vrangefs/mount.py: no cap on request tasks
RSS_SLACK = 50 * MiB  # allowed daemon overhead over the stored bytes, and drift after a delete
RSS_FACTOR = 1.05  # allowed daemon RSS per stored byte
RSS_SETTLE_SECONDS = 10.0  # how long to wait for RSS to drop after a delete

# (key, label) in table order; the key is also the JSON field of each run.
METRICS: list[tuple[str, str]] = [
    ("write_MBps", "seq write bs=1M (MB/s)"),
    ("overwrite_MBps", "seq overwrite bs=1M (MB/s)"),
    ("read_cold_MBps", "seq read cold bs=1M (MB/s)"),
    ("read_hot_MBps", "seq read hot bs=1M (MB/s)"),
    ("rand4k_direct_per_s", "rand 4K read O_DIRECT (/s)"),
    ("rand4k_cold_per_s", "rand 4K read buffered cold (/s)"),
    ("create_per_s", "create+write 4K+close (/s)"),
    ("stat_per_s", "stat (/s)"),
    ("stat_again_per_s", "stat again (/s)"),
    ("unlink_per_s", "unlink (/s)"),
    ("missing_per_s", "stat of a removed name (/s)"),
    ("missing_again_per_s", "same, again (/s)"),
    ("write4k_per_s", "write(2) 4K loop, one file (/s)"),
    ("rss_start_MiB", "daemon RSS at start (MiB)"),
    ("rss_after_write_MiB", "daemon RSS after write (MiB)"),
    ("rss_growth_MiB_per_GiB", "RSS growth per stored GiB (MiB)"),
    ("rss_after_delete_MiB", "daemon RSS after delete (MiB)"),
]


class BenchError(Exception):
    """A step failed; the message says which and why."""


def window_key(kb: int) -> str:
    return f"read_cold_{kb}k_MBps"


def parse_size(text: str) -> int:
    """'1G', '256M', '512K' or a plain byte count; binary units."""
    match = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]
    return int(match.group(1)) << shift


def run(argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run a command; a non-zero exit or a timeout is a BenchError with its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
    except OSError as exc:
        raise BenchError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise BenchError(
            f"{what}: exit status {proc.returncode}: {' '.join(argv)}\n{proc.stderr.strip()}"
        )
    return proc


def drop_caches() -> None:
    """sync, then drop page cache, dentries and inodes; fail loudly if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise BenchError(f"cannot drop caches (need root): {exc}") from exc


def rss_bytes(pid: int) -> int:
    """VmRSS of *pid* from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise BenchError(f"cannot read RSS of daemon pid {pid}: {exc}") from exc
    raise BenchError(f"no VmRSS line for pid {pid} (kernel thread or zombie?)")


def wait_for_mount(path: Path, proc: subprocess.Popen[bytes] | None, deadline: float) -> None:
    """Poll until *path* is a mount point; fail early if *proc* dies."""
    while not os.path.ismount(path):
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"daemon for {path} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} not mounted after waiting")
        time.sleep(0.02)


def mounted(path: Path) -> bool:
    """True if *path* is a mount point, dead FUSE mounts included (os.path.ismount says False)."""
    return mountinfo.is_mounted(path)


def force_unmount(path: Path) -> None:
    """Last resort: lazy unmount, ignoring errors."""
    if mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- filesystems under test ---------------------------------------------------


class Target:
    """A mounted filesystem; subclasses mount in __init__ and undo it in unmount()."""

    name = ""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint

    def daemon_pid(self) -> int | None:
        return None

    def stats(self) -> dict[str, int | str]:
        return {}

    def _window(self) -> Path | None:
        entry = mountinfo.find(self.mountpoint)
        if entry is None or entry.major != 0:
            return None
        path = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
        return path if path.exists() else None

    def read_ahead_kb(self) -> int | None:
        """The mount's readahead window (sysfs), or None where it has none of its own."""
        path = self._window()
        try:
            return None if path is None else int(path.read_text())
        except (OSError, ValueError):
            return None

    def set_read_ahead_kb(self, kb: int) -> None:
        """Set the mount's readahead window, if it has one (tmpfs has none)."""
        path = self._window()
        if path is not None:
            try:
                path.write_text(f"{kb}\n")
            except OSError as exc:
                raise BenchError(f"cannot set the readahead window: {exc}") from exc

    def unmount(self) -> None:
        raise NotImplementedError


class Tmpfs(Target):
    name = "tmpfs"

    def __init__(self, mountpoint: Path, size: int) -> None:
        super().__init__(mountpoint)
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], 30, "mount")

    def unmount(self) -> None:
        run(["umount", str(self.mountpoint)], 60, "umount tmpfs")


class Ceiling(Target):
    """bench/ceiling.py as a child process in its own session (Ctrl-C is ours to relay);
    with *floor*, that program (bench/floor.c, built) instead."""

    def __init__(
        self,
        mountpoint: Path,
        direct_io: bool,
        log_path: Path,
        max_tasks: int | None = None,
        floor: Path | None = None,
    ) -> None:
        super().__init__(mountpoint)
        self.name = "ceiling-dio" if direct_io else "ceiling-mt" if max_tasks else "ceiling"
        self.log_path = log_path
        argv = [sys.executable, str(BENCH_DIR / "ceiling.py"), str(mountpoint)]
        if direct_io:
            argv.append("--direct-io")
        if max_tasks:
            argv.append(f"--max-tasks={max_tasks}")
        if floor is not None:
            self.name = "floor"
            argv = [str(floor), str(mountpoint)]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        try:
            wait_for_mount(mountpoint, self.proc, time.monotonic() + 15)
        except BenchError as exc:
            self._stop()
            raise BenchError(f"{exc}\n{self._log_tail()}") from exc
        except BaseException:
            self._stop()
            raise

    def daemon_pid(self) -> int:
        return self.proc.pid

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def _stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            force_unmount(self.mountpoint)
            self.proc.kill()
            self.proc.wait(timeout=15)
            return None

    def unmount(self) -> None:
        status = self._stop()
        if status != 0:
            raise BenchError(
                f"{self.name} daemon ended with status {status} (None: killed)\n{self._log_tail()}"
            )
        if mounted(self.mountpoint):
            force_unmount(self.mountpoint)
            raise BenchError(f"{self.name} daemon exited but {self.mountpoint} was still mounted")


def vrangefs_command() -> list[str] | None:
    """How to run the vrangefs CLI, or None if it does not exist yet."""
    if not (REPO / "vrangefs" / "cli.py").exists():
        return None
    script = REPO / ".venv" / "bin" / "vrangefs"
    if script.exists():
        return [str(script)]
    code = "import sys; from vrangefs.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code]


class Vrangefs(Target):
    name = "vrangefs"

    def __init__(self, mountpoint: Path, command: list[str], memory_cap: str) -> None:
        super().__init__(mountpoint)
        self.command = command
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p
        )
        argv = [*command, "mount", str(mountpoint), "--memory-cap", memory_cap]
        self._cli(argv, "vrangefs mount")
        wait_for_mount(mountpoint, None, time.monotonic() + 15)
        self.pid = self._find_pid()

    def _cli(self, argv: list[str], what: str) -> None:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, env=self.env, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{what}: timed out after 60 s: {' '.join(argv)}") from exc
        if proc.returncode != 0:
            raise BenchError(f"{what}: exit status {proc.returncode}\n{proc.stderr.strip()}")

    def stats(self) -> dict[str, int | str]:
        proc = run(
            ["getfattr", "-n", "user.vrange.stats", "--only-values", str(self.mountpoint)],
            30,
            "getfattr user.vrange.stats",
        )
        try:
            return parse_stats(proc.stdout.encode())
        except ValueError as exc:
            raise BenchError(f"getfattr user.vrange.stats: {exc}") from exc

    def _find_pid(self) -> int | None:
        try:
            pid_text = self.stats().get("pid")
            if pid_text is not None:
                return int(pid_text)
            print("  vrangefs: no pid= in user.vrange.stats; searching /proc", flush=True)
        except (BenchError, ValueError) as exc:
            print(f"  vrangefs: stats unreadable ({exc}); searching /proc", flush=True)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = [a.decode(errors="replace") for a in args]
            if any("vrangefs" in a for a in text) and str(self.mountpoint) in text:
                found.append(int(entry.name))
        if len(found) == 1:
            return found[0]
        print(f"  vrangefs: daemon pid not found (candidates {found}); no RSS", flush=True)
        return None

    def daemon_pid(self) -> int | None:
        return self.pid

    def unmount(self) -> None:
        try:
            self._cli([*self.command, "umount", str(self.mountpoint)], "vrangefs umount")
        finally:
            force_unmount(self.mountpoint)
        deadline = time.monotonic() + 15
        while self.pid is not None and pid_alive(self.pid):
            if time.monotonic() > deadline:
                raise BenchError(f"vrangefs daemon {self.pid} still running 15 s after umount")
            time.sleep(0.05)


# -- measurements -------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dd(argv: list[str], expect_bytes: int, timeout: float, what: str) -> None:
    """Run dd and check from its summary that it moved exactly *expect_bytes*."""
    proc = run(["dd", *argv], timeout, what)
    match = re.search(r"^(\d+) bytes", proc.stderr, re.MULTILINE)
    if match is None or int(match.group(1)) != expect_bytes:
        raise BenchError(f"{what}: expected {expect_bytes} bytes, dd said:\n{proc.stderr.strip()}")


def probe(args: list[str], timeout: float, what: str) -> dict[str, float]:
    proc = run([sys.executable, str(BENCH_DIR / "probes.py"), *args], timeout, what)
    try:
        result: dict[str, float] = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{what}: unreadable probe output {proc.stdout!r}") from exc
    return result


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.size: int = opts.size
        self.files: int = opts.files
        self.random_reads: int = opts.random_reads
        self.trap_writes: int = opts.trap_writes
        # Generous bounds: 20 MB/s for bulk data, 200 ops/s for loops.
        self.dd_timeout = 60 + self.size / (20 * MB)
        self.loop_timeout = 120 + max(self.files * 5, self.random_reads, self.trap_writes) / 200
        self.watch: LoadWatch | None = None
        self.read_windows: list[int] = opts.read_windows

    def measure(self, target: Target, run_index: int) -> dict[str, Any]:
        """One run of every figure on *target*; leaves no files behind."""
        res: dict[str, Any] = {"run": run_index + 1}
        if self.watch is not None:
            res.update(self.watch.mark())
        ra = target.read_ahead_kb()
        if ra is not None:
            res["read_ahead_kb"] = ra
        mnt = target.mountpoint
        big = mnt / "seq.bin"
        count = self.size // MiB
        pid = target.daemon_pid()

        rss_start = rss_bytes(pid) if pid else None
        t = timed(
            lambda: dd(
                [f"of={big}", "if=/dev/zero", "bs=1M", f"count={count}", "conv=fsync"],
                self.size,
                self.dd_timeout,
                "sequential write",
            )
        )
        res["write_MBps"] = self.size / t / MB
        if pid and rss_start is not None:
            rss_write = rss_bytes(pid)
            res["rss_start_MiB"] = rss_start / MiB
            res["rss_after_write_MiB"] = rss_write / MiB
            res["rss_growth_MiB_per_GiB"] = (rss_write - rss_start) / MiB / (self.size / GiB)
            res["rss_write_ok"] = rss_write <= RSS_FACTOR * self.size + RSS_SLACK
        if target.name == "vrangefs":
            try:
                res["stats_after_write"] = target.stats()
            except BenchError as exc:
                res["stats_after_write"] = {"error": str(exc)}

        # The same bytes again over the file just written: no memory to fault in, on
        # tmpfs nor in a daemon, so this is the write path's own cost (fresh writes pay
        # first touch of memory, slow and erratic on a VM).
        over = [f"of={big}", "if=/dev/zero", "bs=1M", f"count={count}", "conv=notrunc,fsync"]
        t = timed(lambda: dd(over, self.size, self.dd_timeout, "sequential overwrite"))
        res["overwrite_MBps"] = self.size / t / MB

        read = [f"if={big}", "of=/dev/null", "bs=1M"]
        drop_caches()
        t = timed(lambda: dd(read, self.size, self.dd_timeout, "sequential read (cold)"))
        res["read_cold_MBps"] = self.size / t / MB
        t = timed(lambda: dd(read, self.size, self.dd_timeout, "sequential read (hot)"))
        res["read_hot_MBps"] = self.size / t / MB
        window = target.read_ahead_kb()
        try:
            for kb in self.read_windows:
                target.set_read_ahead_kb(kb)
                drop_caches()
                what = f"sequential read (cold, {kb} KiB window)"
                t = timed(functools.partial(dd, read, self.size, self.dd_timeout, what))
                res[window_key(kb)] = self.size / t / MB
        finally:
            if window is not None:
                target.set_read_ahead_kb(window)

        rand = [
            "randread",
            str(big),
            f"--file-size={self.size}",
            f"--count={self.random_reads}",
            f"--seed={run_index}",
        ]
        out = probe([*rand, "--direct"], self.loop_timeout, "random reads (O_DIRECT)")
        res["rand4k_direct_per_s"] = out["ops"] / out["seconds"]
        drop_caches()
        out = probe(rand, self.loop_timeout, "random reads (buffered, cold)")
        res["rand4k_cold_per_s"] = out["ops"] / out["seconds"]

        run(["rm", str(big)], 60, "unlink big file")
        if pid and rss_start is not None:
            rss_del = rss_bytes(pid)
            deadline = time.monotonic() + RSS_SETTLE_SECONDS
            while rss_del - rss_start > RSS_SLACK and time.monotonic() < deadline:
                time.sleep(0.1)
                rss_del = rss_bytes(pid)
            res["rss_after_delete_MiB"] = rss_del / MiB
            res["rss_delete_ok"] = rss_del - rss_start <= RSS_SLACK

        out = probe(
            ["smallfiles", str(mnt), f"--count={self.files}"], self.loop_timeout, "small files"
        )
        res["create_per_s"] = out["ops"] / out["create_seconds"]
        res["stat_per_s"] = out["ops"] / out["stat_seconds"]
        res["stat_again_per_s"] = out["ops"] / out["stat_again_seconds"]
        res["unlink_per_s"] = out["ops"] / out["unlink_seconds"]
        res["missing_per_s"] = out["ops"] / out["missing_seconds"]
        res["missing_again_per_s"] = out["ops"] / out["missing_again_seconds"]

        trap = mnt / "writes4k.bin"
        out = probe(
            ["writes", str(trap), f"--count={self.trap_writes}"], self.loop_timeout, "4K writes"
        )
        res["write4k_per_s"] = out["ops"] / out["seconds"]
        run(["rm", str(trap)], 60, "unlink 4K-writes file")
        return res


# -- report -------------------------------------------------------------------


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for fs, rows in runs.items():
        out[fs] = {}
        for key, _label in METRICS:
            values = [row[key] for row in rows if key in row]
            if values:
                out[fs][key] = statistics.median(values)
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(med: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    names = [fs for fs in FILESYSTEMS if fs in med]
    pairs = (("vrangefs", "tmpfs"), ("vrangefs", "ceiling"), ("vrangefs", "ceiling-mt"))
    ratios = [(a, b) for a, b in pairs if a in med and b in med]
    if "vrangefs" not in med and "ceiling" in med and "tmpfs" in med:
        ratios.append(("ceiling", "tmpfs"))
    # What a pyfuse3 filesystem can reach of tmpfs, and what one in C can (bench/floor.c).
    ratios += [(a, "tmpfs") for a in ("ceiling-mt", "floor") if a in med and "tmpfs" in med]
    head = ["figure (median)", *(f"{fs} [{counts[fs]}]" for fs in names)]
    head += [f"{a}/{b}" for a, b in ratios]
    rows = [head]
    for key, label in METRICS:
        if not any(key in med[fs] for fs in names):
            continue
        row = [label, *(fmt(med[fs].get(key)) for fs in names)]
        for a, b in ratios:
            va, vb = med[a].get(key), med[b].get(key)
            speed = not key.startswith("rss_")  # a ratio of two daemons' RSS means nothing
            row.append(f"{va / vb:.2f}" if speed and va is not None and vb else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict[str, str]:
    env = {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
    }
    for package in ("pyfuse3", "trio"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[package] = metadata.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        env["git"] = head.stdout.strip()
    return env


# -- session ------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Hold off Ctrl-C and SIGTERM while unmounting, so cleanup is not cut short."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark vrangefs against tmpfs and the pyfuse3 ceiling."
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("1G"),
        help="sequential file size, whole MiB (default 1G)",
    )
    parser.add_argument("--files", type=int, default=10000, help="small files (default 10000)")
    parser.add_argument(
        "--random-reads",
        type=int,
        default=20000,
        help="random 4 KiB reads per mode (default 20000)",
    )
    parser.add_argument(
        "--trap-writes",
        type=int,
        default=100000,
        help="4 KiB write(2)s in the security.capability test (default 100000)",
    )
    parser.add_argument(
        "--only",
        default="vrangefs,tmpfs,ceiling",
        help=f"comma-separated subset of {','.join(FILESYSTEMS)}",
    )
    parser.add_argument(
        "--ceiling-direct-io",
        action="store_true",
        help="also run the ceiling in direct_io mode (ceiling-dio)",
    )
    parser.add_argument(
        "--ceiling-mt",
        action="store_true",
        help="also run the ceiling with no cap on request tasks, as vrangefs (ceiling-mt)",
    )
    parser.add_argument("--memory-cap", default="2G", help="vrangefs --memory-cap (default 2G)")
    parser.add_argument(
        "--read-windows",
        default="",
        metavar="KB[,KB...]",
        help="also read cold with each of these readahead windows (KiB) on every FUSE mount",
    )
    add_wait_quiet(parser)
    parser.add_argument("--json", type=Path, help="write every raw number here")
    opts = parser.parse_args(args)
    opts.only = [fs.strip() for fs in opts.only.split(",") if fs.strip()]
    if opts.ceiling_direct_io and "ceiling-dio" not in opts.only:
        opts.only.append("ceiling-dio")
    if opts.ceiling_mt and "ceiling-mt" not in opts.only:
        opts.only.append("ceiling-mt")
    try:
        opts.read_windows = [int(kb) for kb in opts.read_windows.split(",") if kb.strip()]
    except ValueError:
        parser.error("--read-windows takes whole KiB, comma-separated")
    if any(kb < 4 for kb in opts.read_windows):
        parser.error("--read-windows: each window is at least 4 KiB")
    at = next(i for i, (key, _) in enumerate(METRICS) if key == "read_cold_MBps") + 1
    for n, kb in enumerate(opts.read_windows):
        METRICS.insert(at + n, (window_key(kb), f"  ... with a {kb} KiB window (MB/s)"))
    unknown = set(opts.only) - set(FILESYSTEMS)
    if unknown:
        parser.error(f"unknown filesystem(s) {sorted(unknown)}; known: {FILESYSTEMS}")
    if opts.size < MiB or opts.size % MiB:
        parser.error("--size must be a positive whole number of MiB")
    if min(opts.runs, opts.files, opts.random_reads, opts.trap_writes) < 1:
        parser.error("counts must be at least 1")
    return opts


def mount(fs: str, mountpoint: Path, opts: argparse.Namespace, workdir: Path) -> Target:
    if fs == "tmpfs":
        size = opts.size + opts.trap_writes * 4096 + opts.files * 8192 + 256 * MiB
        return Tmpfs(mountpoint, size)
    if fs in ("ceiling", "ceiling-mt", "ceiling-dio"):
        tasks = CEILING_MT_TASKS if fs == "ceiling-mt" else None
        return Ceiling(mountpoint, fs == "ceiling-dio", workdir / f"{fs}.log", tasks)
    if fs == "floor":
        return Ceiling(mountpoint, False, workdir / "floor.log", floor=build_floor(workdir))
    command = vrangefs_command()
    assert command is not None
    return Vrangefs(mountpoint, command, opts.memory_cap)


def build_floor(workdir: Path) -> Path:
    """Compile bench/floor.c (libfuse3's headers and pkg-config needed) into *workdir*."""
    binary = workdir / "floor.bin"  # workdir / "floor" is its mount point
    if not binary.exists():
        flags = run(["pkg-config", "--cflags", "--libs", "fuse3"], 30, "pkg-config fuse3")
        argv = ["cc", "-O2", "-Wall", "-o", str(binary), str(BENCH_DIR / "floor.c")]
        run([*argv, *flags.stdout.split()], 120, "cc bench/floor.c")
    return binary


def main(args: list[str] | None = None) -> int:
    opts = parse_args(args)
    if os.geteuid() != 0:
        print("bench_fs.py must run as root (mount -t tmpfs, drop_caches)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    others = busy()
    if others and opts.wait_quiet > 0:
        print(f"waiting up to {opts.wait_quiet:.0f} s for other tests or benchmarks to end")
        others = wait_quiet(opts.wait_quiet)
    if others:
        print("WARNING: other heavy processes run; numbers are taken under load:", flush=True)
        print("\n".join(f"  {line[:120]}" for line in others), flush=True)
    bench = Bench(opts)
    skipped: dict[str, str] = {}
    failures: dict[str, str] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    wanted = [fs for fs in FILESYSTEMS if fs in opts.only]
    if "vrangefs" in wanted and vrangefs_command() is None:
        skipped["vrangefs"] = "vrangefs/cli.py does not exist yet"
        print("skipping vrangefs: vrangefs/cli.py does not exist yet", flush=True)
        wanted.remove("vrangefs")
    print(
        f"size {opts.size // MiB} MiB, {opts.files} small files, {opts.random_reads} random "
        f"reads, {opts.trap_writes} 4K writes, {opts.runs} run(s): {', '.join(wanted)}",
        flush=True,
    )

    workdir = Path(tempfile.mkdtemp(prefix="vrangefs-bench-"))
    targets: dict[str, Target] = {}
    interrupted = False
    watch = bench.watch = LoadWatch()
    watch.start()
    try:
        for fs in wanted:
            mountpoint = workdir / fs
            mountpoint.mkdir()
            try:
                targets[fs] = mount(fs, mountpoint, opts, workdir)
            except BaseException as exc:
                force_unmount(mountpoint)
                if not isinstance(exc, BenchError):
                    raise
                failures[fs] = f"mount: {exc}"
                print(f"FAILED to mount {fs}: {exc}", flush=True)
        for run_index in range(opts.runs):
            for fs in list(targets):
                print(f"run {run_index + 1}/{opts.runs} {fs} ...", end=" ", flush=True)
                try:
                    res = bench.measure(targets[fs], run_index)
                except BenchError as exc:
                    failures[fs] = f"run {run_index + 1}: {exc}"
                    print(f"FAILED: {exc}", flush=True)
                    with no_interrupts():
                        unmount_all({fs: targets.pop(fs)}, failures)
                    continue
                runs.setdefault(fs, []).append(res)
                print(
                    ", ".join(
                        f"{k}={fmt(res[k])}"
                        for k, _ in METRICS
                        if k in res and not k.startswith("rss_")
                    ),
                    flush=True,
                )
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: unmounting", flush=True)
    finally:
        watch.stop()
        with no_interrupts():
            unmount_all(targets, failures)
            cleanup_workdir(workdir)

    report(opts, runs, failures, skipped, interrupted, watch)
    return 1 if failures or interrupted else 0


def unmount_all(targets: dict[str, Target], failures: dict[str, str]) -> None:
    for fs, target in targets.items():
        try:
            target.unmount()
        except BenchError as exc:
            failures[fs] = failures.get(fs, "") + f"\nunmount: {exc}"
            print(f"FAILED to unmount {fs} cleanly: {exc}", flush=True)
            force_unmount(target.mountpoint)
    targets.clear()


def cleanup_workdir(workdir: Path) -> None:
    """Remove the mount points and logs; never recurse into anything still mounted."""
    still = [str(p) for p in workdir.iterdir() if mounted(p)]
    if still:
        print(f"WARNING: still mounted, leaving {workdir}: {still}", flush=True)
        return
    for path in workdir.iterdir():
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    workdir.rmdir()


def report(
    opts: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    failures: dict[str, str],
    skipped: dict[str, str],
    interrupted: bool,
    watch: LoadWatch,
) -> None:
    med = medians(runs)
    if med:
        print()
        print(table(med, {fs: len(rows) for fs, rows in runs.items()}))
        for fs, rows in runs.items():
            checks = [(r.get("rss_write_ok"), r.get("rss_delete_ok")) for r in rows]
            if fs == "vrangefs" and checks:
                w = sum(1 for c in checks if c[0])
                d = sum(1 for c in checks if c[1])
                print(
                    f"{fs}: RSS after write <= {RSS_FACTOR} x stored + 50 MiB in {w}/{len(rows)} "
                    f"runs; back within 50 MiB after delete in {d}/{len(rows)} runs"
                )
    for fs, rows in runs.items():
        modes = sorted({r["read_ahead_kb"] for r in rows if "read_ahead_kb" in r})
        if modes:
            print(f"{fs}: readahead window {', '.join(map(str, modes))} KiB")
    load = watch.loadavg
    if load:
        print(
            f"load average (1 min) during the session: {min(load):.1f} to {max(load):.1f}, "
            f"median {statistics.median(load):.1f}"
        )
    if watch.seen:
        print(f"NOTE: {len(watch.seen)} other heavy process(es) ran during the benchmark, e.g.:")
        print("\n".join(f"  {line[:120]}" for line in list(watch.seen)[:5]), flush=True)
    for fs, why in skipped.items():
        print(f"skipped {fs}: {why}")
    for fs, why in failures.items():
        print(f"FAILED {fs}: {why.strip()}")
    if opts.json:
        doc = {
            "config": {
                "runs": opts.runs,
                "size": opts.size,
                "files": opts.files,
                "random_reads": opts.random_reads,
                "trap_writes": opts.trap_writes,
                "memory_cap": opts.memory_cap,
                "filesystems": opts.only,
                "interrupted": interrupted,
                "wait_quiet": opts.wait_quiet,
                "read_windows": opts.read_windows,
            },
            "load": {"loadavg_1min": watch.loadavg, "others_seen": list(watch.seen)},
            "environment": environment(),
            "runs": runs,
            "medians": med,
            "failures": failures,
            "skipped": skipped,
        }
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(f"raw numbers: {opts.json}")


if __name__ == "__main__":
    sys.exit(main())
