"""The event stream: what an event costs the daemon, and how fast a subscriber reads.

Printed as one JSON object (and written to --out if given):

- ``inprocess``: purge-all of U one-page units (U = --units, default 4000) on a Volume in
  this process (no FUSE), with the event hub as reclaim's observer and 0, 1 or 8
  subscribers that never read (queues sized to take every line): microseconds per unit,
  and the difference per event and per subscriber-line, the pure cost of the observer
  (path lookup, json.dumps, appends).
- ``mounted``: ``setfattr user.vrange.purge`` of U units on a real mount, timed from this
  process (the request returns once purged and the kernel's caches are dropped), with no
  subscriber, with one ``vrangefs events`` whose output goes to a pipe this process
  drains, and with one raw subscriber that never reads; median of --rounds rounds
  (the units are rewritten between rounds, which makes them purgeable again).  For the
  ``vrangefs events`` subscriber also: seconds from the purge request until its last line
  came out, and the lines per second that makes.

Run as root on a machine with FUSE::

    .venv/bin/python bench/bench_events.py [--units 4000] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vrangefs.events import EventHub
from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import int_stats, read_stats
from vrangefs.volume import Caller, Volume

VOLATILE = "user.vrange.volatile"
PURGE = "user.vrange.purge"


def _inprocess_once(units: int, subscribers: int | None) -> float:
    """Seconds of one purge-all of *units* one-page units, with a hub of *subscribers*."""
    vol = Volume(PageStore((units + 16) * PAGE_SIZE))
    d = vol.mkdir(ROOT_INO, b"some-directory", 0o755, Caller(0, 0)).ino
    f = vol.create(d, b"a-file-with-a-name.bin", 0o644, Caller(0, 0)).ino
    vol.write(f, 0, b"p" * (units * PAGE_SIZE))
    for i in range(units):
        vol.mark_volatile(f, i * PAGE_SIZE, PAGE_SIZE)
    if subscribers is not None:
        hub = EventHub(vol.path_of, queue_limit=units + 1)
        vol.reclaim.observer = hub
        for pid in range(subscribers):
            hub.admit(pid, 0)
    start = time.perf_counter()
    vol.reclaim.purge_all()
    return time.perf_counter() - start


def inprocess(units: int, rounds: int) -> dict[str, float]:
    """Median of *rounds*, the configurations interleaved so that load hits them alike."""
    configs: list[int | None] = [None, 0, 1, 8]
    samples: dict[int | None, list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            samples[c].append(_inprocess_once(units, c))
    out: dict[str, float] = {}
    for c in configs:
        key = "no_hub" if c is None else f"{c}_subscribers"
        out[f"us_per_unit_{key}"] = statistics.median(samples[c]) / units * 1e6
    base = out["us_per_unit_0_subscribers"]
    out["us_per_event_1_subscriber"] = out["us_per_unit_1_subscribers"] - base
    out["us_per_extra_subscriber"] = (
        out["us_per_unit_8_subscribers"] - out["us_per_unit_1_subscribers"]
    ) / 7
    return out


def _mount(where: Path) -> None:
    cmd = [sys.executable, "-m", "vrangefs", "mount", str(where), "--memory-cap", "512M"]
    subprocess.run(cmd, check=True)


def _umount(where: Path) -> None:
    subprocess.run([sys.executable, "-m", "vrangefs", "umount", str(where)], check=True)


class _Drain:
    """``vrangefs events`` with its output counted by a thread, as a consumer would read it."""

    def __init__(self, mnt: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vrangefs", "events", str(mnt)], stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout
        assert b'"subscribed"' in self.stdout.readline()
        self.lines = 0
        self.last = 0.0
        self.done = threading.Event()
        self.want = 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        for _ in self.stdout:
            self.lines += 1
            if self.lines >= self.want:
                self.last = time.perf_counter()
                self.done.set()

    def expect(self, n: int) -> None:
        self.done.clear()
        self.want = self.lines + n

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stdout.close()


def _subscribers(mnt: Path) -> int:
    return int_stats(read_stats(mnt))["events_subscribers"]


def mounted(mnt: Path, units: int, rounds: int) -> dict[str, float]:
    f = mnt / "some-directory" / "a-file-with-a-name.bin"
    f.parent.mkdir()
    data = b"w" * units * PAGE_SIZE
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, data, 0)
    for i in range(units):
        os.setxattr(fd, VOLATILE, b"%d,%d" % (i * PAGE_SIZE, PAGE_SIZE))
    out: dict[str, float] = {}

    def purge_seconds() -> float:
        os.pwrite(fd, data, 0)
        start = time.perf_counter()
        os.setxattr(mnt, PURGE, b"all")
        return time.perf_counter() - start

    out["purge_all_s_no_subscriber"] = statistics.median(purge_seconds() for _ in range(rounds))
    drain = _Drain(mnt)
    try:
        times, lags = [], []
        for _ in range(rounds):
            drain.expect(units)
            os.pwrite(fd, data, 0)
            start = time.perf_counter()
            os.setxattr(mnt, PURGE, b"all")
            times.append(time.perf_counter() - start)
            assert drain.done.wait(60), "the subscriber did not get every line"
            lags.append(drain.last - start)
        out["purge_all_s_cli_subscriber"] = statistics.median(times)
        out["cli_last_line_after_s"] = statistics.median(lags)
        out["cli_lines_per_s"] = units / statistics.median(lags)
    finally:
        drain.close()
    while _subscribers(mnt):
        time.sleep(0.01)
    name = str(read_stats(mnt)["events_socket"])
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(b"\0" + name[1:].encode())
    try:
        out["purge_all_s_slow_subscriber"] = statistics.median(
            purge_seconds() for _ in range(rounds)
        )
        out["events_dropped"] = int_stats(read_stats(mnt))["events_dropped"]
    finally:
        slow.close()
        os.close(fd)
    base = out["purge_all_s_no_subscriber"]
    out["us_per_event_cli_subscriber"] = (out["purge_all_s_cli_subscriber"] - base) / units * 1e6
    out["us_per_event_slow_subscriber"] = (out["purge_all_s_slow_subscriber"] - base) / units * 1e6
    out["us_per_unit_no_subscriber"] = base / units * 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {
        "units": args.units,
        "inprocess": inprocess(args.units, args.rounds),
    }
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        _mount(mnt)
        try:
            result["mounted"] = mounted(mnt, args.units, args.rounds)
        finally:
            _umount(mnt)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
