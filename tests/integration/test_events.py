"""The event stream on real mounts: ``vrangefs events`` and the daemon's socket.

Every purge (explicit, cap) and eviction reaches subscribers as one JSON line, with
paths under the mount point; several subscribers each get every event; a subscriber
that does not read loses events (counted, and told how many) while the others and the
daemon go on; other users are refused; killing a subscriber leaves the daemon serving.

Names and formats are spelled out from the design (``events_socket``,
``events_subscribers``, ``events_dropped``, the line fields), not imported.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import VRANGEFS, Mount, Mounter, run_cli
from tests.integration.vrange_helpers import PAGE, as_nobody, mark, purge_all, stats
from vrangefs import cli
from vrangefs.protocol import read_stats

MIB = 1 << 20
LINE_TIMEOUT = 20.0  # seconds an expected line may take (a guard, not a wait)


class Events:
    """A running ``vrangefs events MOUNTPOINT`` and the lines it prints, one thread reading."""

    def __init__(self, mount: Mount, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*VRANGEFS, "events", str(mount.path), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.next()
        assert first["event"] == "subscribed", first

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))
        self.lines.put(None)

    def next(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event line within {timeout}s") from None
        assert line is not None, f"vrangefs events ended: {self.stderr()}"
        return line

    def take(self, n: int) -> list[dict[str, Any]]:
        return [self.next() for _ in range(n)]

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def wait(self, timeout: float = LINE_TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def events(mount: Mount, *args: str) -> Iterator[Events]:
    subscriber = Events(mount, *args)
    try:
        yield subscriber
    finally:
        subscriber.stop()


def subscribers(mount: Mount) -> int:
    return stats(mount.path)["events_subscribers"]


def volatile_file(path: Path, size: int) -> None:
    path.write_bytes(b"v" * size)
    mark(path, "0,0")


def test_explicit_purge_all_is_reported_with_paths_and_ranges(fresh: Mount) -> None:
    d = fresh.path / "dir"
    d.mkdir()
    volatile_file(d / "a", 3 * PAGE)
    (d / "b").write_bytes(b"b" * 8 * PAGE)
    mark(d / "b", f"{2 * PAGE},{3 * PAGE}")
    with events(fresh, "--count", "2") as sub:
        assert subscribers(fresh) == 1
        before = time.time()
        purge_all(fresh.path)
        got = sorted(sub.take(2), key=lambda e: e["path"])
        assert sub.wait() == 0  # --count 2: exits after two events
    for event in got:
        assert before - 1 <= event["time"] <= time.time() + 1
        assert (event["event"], event["cause"]) == ("purge", "explicit")
        assert isinstance(event["ino"], int)
        assert "paths" not in event
    assert (got[0]["path"], got[0]["ranges"], got[0]["bytes"]) == (
        str(d / "a"),
        [[0, 3 * PAGE]],
        3 * PAGE,
    )
    assert (got[1]["path"], got[1]["ranges"], got[1]["bytes"]) == (
        str(d / "b"),
        [[2 * PAGE, 3 * PAGE]],
        3 * PAGE,
    )
    wait_until(lambda: subscribers(fresh) == 0, 10, "the subscriber that exited is gone")


def test_cap_purges_of_volatile_units(mounter: Mounter) -> None:
    mount = mounter.mount("4M")
    for name in ("old1", "old2"):
        volatile_file(mount.path / name, MIB)
    with events(mount) as sub:
        result = subprocess.run(
            ["dd", "if=/dev/zero", f"of={mount.path / 'new'}", "bs=1M", "count=3"],
            capture_output=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        got = sub.take(2)
    assert [(e["event"], e["cause"], e["bytes"]) for e in got] == [("purge", "cap", MIB)] * 2
    assert [e["path"] for e in got] == [str(mount.path / "old1"), str(mount.path / "old2")]


def test_eviction_in_a_cache_directory(mounter: Mounter) -> None:
    mount = mounter.mount("4M", args=["--cache-dir"])
    old = mount.path / "old"
    subprocess.run(["dd", "if=/dev/zero", f"of={old}", "bs=1M", "count=1"], check=True)
    os.link(old, mount.path / "again")
    with events(mount) as sub:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={mount.path / 'new'}", "bs=1M", "count=4", "status=none"],
            check=True,
        )
        event = sub.next()
    assert (event["event"], event["cause"], event["bytes"], event["ranges"]) == (
        "evict",
        "cap",
        MIB,
        None,
    )
    assert sorted(event["paths"]) == [str(mount.path / "again"), str(old)]
    assert event["path"] in event["paths"]
    assert not old.exists()


def test_two_subscribers_both_receive(fresh: Mount) -> None:
    for i in range(3):
        volatile_file(fresh.path / f"f{i}", PAGE)
    with events(fresh) as one, events(fresh) as two:
        assert subscribers(fresh) == 2
        purge_all(fresh.path)
        first, second = one.take(3), two.take(3)
    assert first == second
    assert sorted(e["path"] for e in first) == [str(fresh.path / f"f{i}") for i in range(3)]


def _connect(mount: Mount) -> socket.socket:
    """A raw connection to the daemon's event socket, as any local process can make."""
    name = read_stats(mount.path)["events_socket"]
    assert isinstance(name, str) and name.startswith("@"), name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(b"\0" + name[1:].encode())
    return sock


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    with sock.makefile("rb") as stream:
        for raw in stream:
            yield json.loads(raw)


class Collector:
    """A raw subscriber whose thread reads everything as it comes (faster than the CLI)."""

    def __init__(self, mount: Mount) -> None:
        self.sock = _connect(mount)
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            self.events.extend(_lines(self.sock))

    def count(self, kind: str) -> int:
        return sum(1 for e in list(self.events) if e["event"] == kind)

    def has(self, kind: str, n: int) -> bool:
        return self.count(kind) == n

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(LINE_TIMEOUT)
        self.sock.close()


@pytest.mark.timeout(300)
def test_a_slow_subscriber_loses_events_counted_and_nobody_waits(mounter: Mounter) -> None:
    # Four purges of 3000 units each: every burst fits one subscriber's queue (4096
    # lines), all four together do not, with the socket buffer, for one that never reads.
    units, rounds = 3000, 4
    mount = mounter.mount("64M")
    f = mount.path / "many"
    f.write_bytes(b"u" * units * PAGE)
    fd = os.open(f, os.O_RDWR)
    slow = _connect(mount)  # reads nothing until the end
    fast = Collector(mount)
    try:
        for i in range(units):  # one unit per page: adjacent marks stay apart
            os.setxattr(fd, "user.vrange.volatile", f"{i * PAGE},{PAGE}".encode())
        wait_until(lambda: subscribers(mount) == 2, 10, "both subscribed")
        for done in range(1, rounds + 1):
            os.pwrite(fd, b"w" * units * PAGE, 0)  # the purged units hold pages again
            purge_all(mount.path)
            started = time.monotonic()
            probe = stats(mount.path)  # while the slow one holds back lines
            assert time.monotonic() - started < 1.0, "the stats probe waited"
            assert probe["purge_events"] == done * units
            assert probe["events_subscribers"] == 2
            wait_until(
                functools.partial(fast.has, "purge", done * units), 60, "the fast one has all"
            )
        assert fast.count("dropped") == 0  # the fast one missed nothing
        dropped = stats(mount.path)["events_dropped"]
        assert 0 < dropped < units * rounds
        # The slow one, reading at last: what was queued, then how many it missed.
        kinds: dict[str, int] = {}
        told = 0
        with slow.makefile("rb") as stream:
            while kinds.get("purge", 0) + told < units * rounds:
                event = json.loads(stream.readline())
                kinds[event["event"]] = kinds.get(event["event"], 0) + 1
                told += event["count"] if event["event"] == "dropped" else 0
        assert kinds["subscribed"] == 1
        assert told == dropped, (kinds, told, dropped)
    finally:
        os.close(fd)
        slow.close()
        fast.close()
    wait_until(lambda: subscribers(mount) == 0, 10, "both subscribers gone")


def test_another_user_is_refused(mounter: Mounter) -> None:
    mount = mounter.mount("16M", options=["allow_other"])

    def events_as_nobody() -> object:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["events", str(mount.path)])
        return [code, err.getvalue()]

    result = as_nobody(events_as_nobody)
    assert isinstance(result, list)
    code, message = result
    assert code == 1
    assert "refused" in message and "uid 65534" in message, message
    assert subscribers(mount) == 0


def test_the_subscriber_limit(fresh: Mount) -> None:
    held = [_connect(fresh) for _ in range(64)]
    try:
        for sock in held:  # each is admitted: its first line says so
            with sock.makefile("rb") as stream:
                assert json.loads(stream.readline())["event"] == "subscribed"
        result = run_cli(["events", str(fresh.path)])
        assert result.returncode == 1
        assert "too many subscribers" in result.stderr, result.stderr
        assert subscribers(fresh) == 64
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: subscribers(fresh) == 0, 10, "held subscribers gone")


def test_killing_the_command_does_not_disturb_the_daemon(fresh: Mount) -> None:
    volatile_file(fresh.path / "a", PAGE)
    sub = Events(fresh)
    sub.proc.send_signal(signal.SIGKILL)
    sub.stop()
    wait_until(lambda: subscribers(fresh) == 0, 10, "the killed subscriber is gone")
    purge_all(fresh.path)
    assert stats(fresh.path)["purge_events"] == 1
    with events(fresh, "--count", "1") as again:
        volatile_file(fresh.path / "b", PAGE)
        purge_all(fresh.path)
        assert again.next()["path"] == str(fresh.path / "b")
        assert again.wait() == 0


def test_interrupt_exits_130_and_refuses_other_filesystems(fresh: Mount, tmp_path: Path) -> None:
    sub = Events(fresh)
    sub.proc.send_signal(signal.SIGINT)
    assert sub.wait() == 130
    assert sub.stderr() == ""
    sub.stop()
    result = run_cli(["events", str(tmp_path)])
    assert result.returncode == 1
    assert "is not on a vrangefs mount" in result.stderr, result.stderr
    result = run_cli(["events", str(fresh.path), "--count", "0"])
    assert result.returncode == 1 and "--count" in result.stderr


def test_the_stream_ends_with_the_mount(mounter: Mounter) -> None:
    mount = mounter.mount("16M")
    sub = Events(mount)
    try:
        mounter.unmount(mount)
        assert sub.wait() == 1
        assert "event stream ended" in sub.stderr()
    finally:
        sub.stop()


def test_peer_credentials_of_the_socket_are_the_daemons(fresh: Mount) -> None:
    with _connect(fresh) as sock:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    assert pid == stats(fresh.path)["pid"]
