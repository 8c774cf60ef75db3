"""Who else loads the machine: other test runs and benchmarks, and the load average.

Shared by every benchmark (bench_fs.py, and through vrange_util.py the volatile-range
ones): numbers taken while another engineer's test suite runs are marked so, and
``--wait-quiet`` first waits for such runs to end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time

PATTERN = "pytest|bench_|bench/"


def busy() -> list[str]:
    """Other heavy processes (test runs, benchmarks) now: `pgrep -af "pytest|bench_|bench/"`.

    Our own process group (this benchmark and the children it forks) and our descendants
    (the ceiling runs in a session of its own) do not count.
    """
    proc = subprocess.run(["pgrep", "-af", PATTERN], capture_output=True, text=True, check=False)
    ours = os.getpgid(0)
    out = []
    for line in proc.stdout.splitlines():
        pid = int(line.split()[0])
        try:
            if os.getpgid(pid) == ours or _descends_from_us(pid):
                continue
        except (ProcessLookupError, PermissionError):
            continue
        out.append(line)
    return out


def _descends_from_us(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def add_wait_quiet(parser: argparse.ArgumentParser) -> None:
    """The --wait-quiet option."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other tests or benchmarks to end",
    )


def wait_quiet(deadline_s: float) -> list[str]:
    """Wait up to *deadline_s* seconds for busy() to be empty; return what still runs."""
    end = time.monotonic() + deadline_s
    others = busy()
    while others and time.monotonic() < end:
        time.sleep(5)
        others = busy()
    return others


class LoadWatch:
    """Samples busy() and the 1-minute load average every *period* seconds in a thread."""

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self.seen: dict[str, None] = {}  # busy() lines, in order first seen
        self.loadavg: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        self.seen.update(dict.fromkeys(busy()))
        self.loadavg.append(os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def mark(self) -> dict[str, float | int]:
        """A sample now, for one run's record: the load average and how many others run."""
        self._sample()
        return {"loadavg_1min": self.loadavg[-1], "others_running": len(busy())}
