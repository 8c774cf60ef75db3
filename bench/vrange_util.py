"""Helpers shared by bench_vrange.py and bench_evict.py (volatile-range benchmarks).

Mounting and unmounting reuse bench_fs.py's ``Vrangefs`` and ``Ceiling`` classes; this module
adds what those two benchmarks need on top: extra ``vrangefs mount`` options, timed loops in a
child process (so a hung mount ends in a timeout and never blocks the benchmark, which must
unmount), statistics through ``os.getxattr``, a check that the machine is quiet, and a plain
table printer.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench_fs import (
    BenchError,
    Ceiling,
    Target,
    Vrangefs,
    cleanup_workdir,
    environment,
    fmt,
    force_unmount,
    mounted,
    no_interrupts,
    parse_size,
    pid_alive,
    rss_bytes,
    vrangefs_command,
)
from loadwatch import add_wait_quiet, busy, wait_quiet

from vrangefs.protocol import int_stats, read_stats

PAGE = 4096
EXIT_WAIT = 180  # seconds a daemon may take to exit after its unmount
STATS = "user.vrange.stats"
VOLATILE = "user.vrange.volatile"
NONVOLATILE = "user.vrange.nonvolatile"
PURGE = "user.vrange.purge"

__all__ = [
    "NONVOLATILE",
    "PAGE",
    "PURGE",
    "STATS",
    "VOLATILE",
    "BenchError",
    "Session",
    "add_wait_quiet",
    "busy",
    "config_of",
    "fmt",
    "in_child",
    "median",
    "parse_size",
    "preflight",
    "print_table",
    "rss_bytes",
    "run_session",
    "setxattr_loop",
    "stats",
    "write_json",
]


class _VrangefsWith(Vrangefs):
    """bench_fs.Vrangefs, with extra options appended to ``vrangefs mount``."""

    def __init__(self, mountpoint: Path, command: list[str], cap: str, extra: list[str]) -> None:
        self.extra = extra
        super().__init__(mountpoint, command, cap)

    def _cli(self, argv: list[str], what: str) -> None:
        if what == "vrangefs mount":
            argv = [*argv, *self.extra]
        super()._cli(argv, what)

    def unmount(self) -> None:
        """As bench_fs's, but a daemon that is still freeing a million units after its 15 s
        gets EXIT_WAIT seconds more (the mount itself is gone by then)."""
        start = time.monotonic()
        try:
            super().unmount()
        except BenchError:
            if self.pid is None or not pid_alive(self.pid) or mounted(self.mountpoint):
                raise
            while pid_alive(self.pid):
                if time.monotonic() - start > EXIT_WAIT:
                    raise BenchError(
                        f"vrangefs daemon {self.pid} still running {EXIT_WAIT} s after umount"
                    ) from None
                time.sleep(0.2)
            print(f"  note: the daemon took {time.monotonic() - start:.0f} s to exit", flush=True)


@contextlib.contextmanager
def _unmounting(target: Target) -> Iterator[None]:
    """Unmount *target* when the block ends, however it ends, without being interrupted."""
    try:
        yield
    finally:
        with no_interrupts():
            try:
                target.unmount()
            finally:
                force_unmount(target.mountpoint)


class Session:
    """A temporary directory of mount points; everything is unmounted on close."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="vrangefs-bench-"))
        self._count = 0

    def _mountpoint(self, name: str) -> Path:
        self._count += 1
        path = self.workdir / f"{name}{self._count}"
        path.mkdir()
        return path

    @contextlib.contextmanager
    def vrangefs(self, cap: str, *extra: str) -> Iterator[tuple[Path, int]]:
        """Mount vrangefs with ``--memory-cap cap`` and *extra* options; yield (path, pid)."""
        command = vrangefs_command()
        if command is None:
            raise BenchError("vrangefs/cli.py does not exist")
        path = self._mountpoint("vrangefs")
        if not any(arg.startswith("--metadata-cap") for arg in extra):
            # The benchmarks make millions of units and files on purpose: they measure
            # speed, not the metadata budget, which would refuse them.
            extra = (*extra, "--metadata-cap", "16G")
        try:
            target = _VrangefsWith(path, command, cap, list(extra))
        except BaseException:
            force_unmount(path)
            raise
        with _unmounting(target):
            if target.pid is None:
                raise BenchError("cannot find the vrangefs daemon's pid")
            yield path, target.pid

    @contextlib.contextmanager
    def ceiling(self, max_tasks: int | None = None) -> Iterator[Path]:
        """Mount bench/ceiling.py (page-cache mode; ``--max-tasks`` if given); yield its
        mount point."""
        path = self._mountpoint("ceiling")
        target = Ceiling(path, False, self.workdir / f"{path.name}.log", max_tasks)
        with _unmounting(target):
            yield path

    def close(self) -> None:
        with no_interrupts():
            cleanup_workdir(self.workdir)


def stats(mountpoint: Path) -> dict[str, int]:
    """The integer lines of ``user.vrange.stats``."""
    return int_stats(read_stats(mountpoint))


def setxattr_loop(path: str, calls: list[tuple[str, bytes]]) -> float:
    """Make each ``os.setxattr(fd, name, value)`` call on *path*; return seconds."""
    fd = os.open(path, os.O_RDWR)
    try:
        start = time.perf_counter()
        for name, value in calls:
            os.setxattr(fd, name, value)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _child_main(
    conn: multiprocessing.connection.Connection, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # reported to the parent, whatever it is
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def in_child(fn: Callable[..., Any], *args: Any, timeout: float, what: str) -> Any:
    """Run ``fn(*args)`` in a forked child and return its (picklable) result.

    A child blocked in a FUSE request still dies to SIGKILL, so a hung filesystem ends in a
    BenchError after *timeout* seconds instead of blocking the benchmark (which must unmount).
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, fn, args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise BenchError(f"{what}: timed out after {timeout:.0f} s")
        status, value = parent.recv()
    except EOFError as exc:
        raise BenchError(f"{what}: child died (exit status {proc.exitcode})") from exc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        parent.close()
    if status != "ok":
        raise BenchError(f"{what}: {value}")
    return value


def preflight(script: str, wait_quiet_s: float = 0) -> list[str] | None:
    """None (after saying why) unless root; else the heavy processes running now, if any,
    after waiting up to *wait_quiet_s* seconds for them to end."""
    if os.geteuid() != 0:
        print(f"{script} must run as root (it mounts)", file=sys.stderr)
        return None
    load = busy()
    if load and wait_quiet_s > 0:
        print(
            f"waiting up to {wait_quiet_s:.0f} s for other tests or benchmarks to end", flush=True
        )
        load = wait_quiet(wait_quiet_s)
    if load:
        print("WARNING: other heavy processes run; numbers are taken under load:", flush=True)
        print("\n".join(f"  {line}" for line in load), flush=True)
    return load


def run_session(
    script: str, body: Callable[[Session], None], wait_quiet_s: float = 0
) -> dict[str, Any] | None:
    """Run ``body(session)`` and unmount everything after, however it ends.

    First waits up to *wait_quiet_s* seconds for other tests or benchmarks to end.

    Returns None (after saying why) unless root; else ``error`` (None, or why the body
    stopped early: what it measured so far is kept by the body), ``load_before`` and
    ``load_during`` (other heavy processes seen at the start / every 5 s, see :func:`busy`).
    """
    load_before = preflight(script, wait_quiet_s)
    if load_before is None:
        return None
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unmounts too, as Ctrl-C does
    seen: dict[str, None] = dict.fromkeys(load_before)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_load, args=(seen, stop), daemon=True)
    watcher.start()
    session = Session()
    error = None
    try:
        body(session)
    except (BenchError, KeyboardInterrupt) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"FAILED: {error}", flush=True)
    finally:
        session.close()
        stop.set()
        watcher.join()
    if seen:
        print(f"NOTE: {len(seen)} other heavy process(es) ran during the benchmark, e.g.:")
        print("\n".join(f"  {line[:120]}" for line in list(seen)[:5]), flush=True)
    return {"error": error, "load_before": load_before, "load_during": list(seen)}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _watch_load(seen: dict[str, None], stop: threading.Event) -> None:
    """Add what busy() finds to *seen* every 5 s until *stop* is set."""
    while not stop.wait(5):
        seen.update(dict.fromkeys(busy()))


def config_of(opts: Any) -> dict[str, Any]:
    """The options as JSON-able values."""
    return {k: str(v) if isinstance(v, Path | set) else v for k, v in vars(opts).items()}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    cells = [list(head), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for n, row in enumerate(cells):
        first, rest = row[0].ljust(widths[0]), row[1:]
        lines.append(
            "  ".join([first, *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path, doc: dict[str, Any]) -> None:
    doc = {**doc, "environment": environment(), "argv": sys.argv}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"raw numbers: {path}", flush=True)
