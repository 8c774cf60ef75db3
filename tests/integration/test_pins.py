"""Pins on real mounts: counted, owned by processes, with the kernel's and the daemon's
permission checks, and the per-user limit.

The names and formats are spelled out from the contract (``user.vrange.pin``, ``unpin``,
``pins`` with ``OFFSET,LENGTH PID COUNT`` lines), not imported from the package.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter, errno_of, run_cli
from tests.integration.vrange_helpers import (
    PAGE,
    as_nobody,
    errno_or_value,
    in_child,
    make_file,
    mark,
    module_mount,
    new_dir,
    pattern,
    purge_all,
    purged,
    stats,
)

PIN = "user.vrange.pin"
UNPIN = "user.vrange.unpin"
PINS = "user.vrange.pins"
SYSTEM_PIN = "system.vrange.pin"
SYSTEM_UNPIN = "system.vrange.unpin"
NOBODY = 65534


def pin(target: str | Path | int, value: str = "0,0", name: str = PIN) -> None:
    os.setxattr(target if isinstance(target, int) else os.fspath(target), name, value.encode())


def unpin(target: str | Path | int, value: str = "0,0", name: str = UNPIN) -> None:
    os.setxattr(target if isinstance(target, int) else os.fspath(target), name, value.encode())


def pins(target: str | Path) -> list[tuple[int, int, int, int]]:
    """``OFFSET,LENGTH PID COUNT`` lines as tuples; checks the format and the order."""
    text = os.getxattr(os.fspath(target), PINS).decode()
    assert text == "" or text.endswith("\n"), text
    out = []
    for line in text.splitlines():
        rng, pid, count = line.split(" ")
        offset, length = rng.split(",")
        out.append((int(offset), int(length), int(pid), int(count)))
    assert out == sorted(out), text
    return out


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from module_mount(tmp_path_factory, "64M", options=["allow_other"])


@pytest.fixture
def area(mount: Mount) -> Iterator[Path]:
    d = new_dir(mount)
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def volatile_file(path: Path, pages: int, mode: int = 0o644) -> Path:
    make_file(path, pattern(pages, seed=pages))
    path.chmod(mode)
    mark(path, "0,0")
    return path


def test_counted_pins_hold_a_unit_through_purge_all(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 4)
    pin(f, "4096,1")  # one page inside the unit holds all of it
    pin(f, "4K,1")
    assert pins(f) == [(PAGE, PAGE, os.getpid(), 2)]
    purge_all(mount.path)
    assert purged(f) == []
    assert f.read_bytes() == pattern(4, seed=4)
    unpin(f, "4096,4096")
    purge_all(mount.path)
    assert purged(f) == []  # one pin left
    unpin(f, "4096,1")
    assert pins(f) == []
    purge_all(mount.path)
    assert purged(f) == [(0, 4 * PAGE)]


def test_unpin_of_what_is_not_held_fails_and_changes_nothing(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    assert errno_of(unpin, f) == errno.ENOENT
    pin(f, "0,4096")
    for value in ("0,8192", "4096,4096", "0,0"):
        assert errno_of(unpin, f, value) == errno.ENOENT
    assert pins(f) == [(0, PAGE, os.getpid(), 1)]
    unpin(f, "0,4096")


def test_pin_then_purged_is_race_free_and_final(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    g = volatile_file(area / "g", 2)
    purge_all(mount.path)
    pin(f)
    assert purged(f) == [(0, 2 * PAGE)]  # the loss before the pin is seen
    assert errno_of(f.read_bytes) == errno.EIO
    f.write_bytes(pattern(2, seed=9))  # rewritten under the pin
    mark(f, "0,0")
    mark(g, "0,0")
    g.write_bytes(pattern(2, seed=3))
    purge_all(mount.path)
    assert purged(f) == [] and f.read_bytes() == pattern(2, seed=9)
    unpin(f)


@pytest.mark.parametrize("name", [PIN, UNPIN, SYSTEM_PIN, SYSTEM_UNPIN])
def test_pin_names_keep_the_range_names_rules(mount: Mount, area: Path, name: str) -> None:
    assert errno_of(os.setxattr, mount.path, name, b"0,0") == errno.EISDIR
    assert errno_of(os.setxattr, area, name, b"0,0") == errno.EISDIR
    link = area / "link"
    link.symlink_to("nowhere")
    os.mkfifo(area / "fifo")
    assert errno_of(os.setxattr, link, name, b"0,0", follow_symlinks=False) == errno.EPERM
    assert errno_of(os.setxattr, area / "fifo", name, b"0,0") == errno.EPERM
    f = volatile_file(area / "f", 1)
    assert errno_of(os.setxattr, f, name, b"0,-1") == errno.EINVAL
    assert errno_of(os.getxattr, f, name) == errno.ENODATA
    assert errno_of(os.getxattr, area, PINS) == errno.EISDIR
    assert errno_of(os.setxattr, f, PINS, b"0,0") == errno.EINVAL
    assert name not in os.listxattr(f) and PINS not in os.listxattr(f)


def test_a_reader_pins_through_system_names(mount: Mount, area: Path) -> None:
    """The kernel wants write permission for any user.* setxattr (default_permissions);
    system.vrange.pin reaches the daemon unchecked, and the daemon checks read permission."""
    readable = volatile_file(area / "readable", 2, mode=0o644)
    private = volatile_file(area / "private", 2, mode=0o600)

    def reader() -> object:
        fd = os.open(readable, os.O_RDONLY)
        out = {
            "pid": os.getpid(),
            "user_pin": errno_or_value(lambda: pin(readable)),
            "user_pin_fd": errno_or_value(lambda: pin(fd)),  # the check is on the file
            "system_pin": errno_or_value(lambda: pin(readable, name=SYSTEM_PIN)),
            "pins": errno_or_value(lambda: pins(readable)),
            "private": errno_or_value(lambda: pin(private, name=SYSTEM_PIN)),
            "private_pins": errno_or_value(lambda: pins(private)),
        }
        out["purged"] = purged(readable)
        out["system_unpin"] = errno_or_value(lambda: unpin(readable, name=SYSTEM_UNPIN))
        out["again"] = errno_or_value(lambda: unpin(readable, name=SYSTEM_UNPIN))
        return out

    result = as_nobody(reader)
    assert isinstance(result, dict)
    assert result["user_pin"] == {"errno": errno.EACCES}
    assert result["user_pin_fd"] == {"errno": errno.EACCES}
    assert result["system_pin"] is None
    assert result["pins"] == [[0, 2 * PAGE, result["pid"], 1]]
    assert result["private"] == {"errno": errno.EACCES}
    assert result["private_pins"] == {"errno": errno.EACCES}
    assert result["purged"] == []
    assert result["system_unpin"] is None
    assert result["again"] == {"errno": errno.ENOENT}
    assert pins(readable) == []


def test_the_per_user_limit(mounter: Mounter) -> None:
    m = mounter.mount("4M", options=["pin_limit=48K"])
    f = volatile_file(m.path / "f", 8)
    g = volatile_file(m.path / "g", 8)
    pin(f, "0,32K")
    pin(f, "0,32K")  # counting costs nothing
    assert errno_of(pin, g, "0,32K") == errno.EDQUOT  # 32 KiB + 32 KiB > 48 KiB
    pin(g, "0,16K")
    assert errno_of(pin, g, "16K,16K") == errno.EDQUOT
    assert pins(g) == [(0, 16 * 1024, os.getpid(), 1)]
    s = stats(m.path)
    assert s["pin_limit_bytes"] == 48 * 1024 and s["pinned_bytes"] == 48 * 1024
    assert s["pins"] == 3
    unpin(f, "0,32K")
    unpin(f, "0,32K")
    pin(g, "16K,16K")


# -- processes -----------------------------------------------------------------------------------
def _pin_all(path: Path, values: tuple[str, ...]) -> None:
    for value in values:
        pin(path, value)


def _obey(path: Path, commands: int, replies: int) -> int:
    """A holder's loop: ``pin V`` / ``unpin V`` (answered ``0`` or the errno), ``exit``,
    ``raise``; returns the exit code."""
    with os.fdopen(commands, "rb", buffering=0) as stream:
        for line in iter(stream.readline, b""):
            verb, _, value = line.strip().partition(b" ")
            if verb in (b"pin", b"unpin"):
                call = pin if verb == b"pin" else unpin
                reply = errno_or_value(lambda: call(path, value.decode()))  # noqa: B023
                os.write(replies, b"%d\n" % (reply["errno"] if isinstance(reply, dict) else 0))
            elif verb == b"exit":
                return 0
            elif verb == b"raise":
                os.abort()  # SIGABRT, as a crash
    return 0


class Holder:
    """A forked child that pins a file, reports, and then obeys commands until it ends."""

    def __init__(
        self,
        path: Path,
        values: tuple[str, ...] = ("0,0",),
        thread: bool = False,
        also: tuple[Path, ...] = (),
    ) -> None:
        """Pin *values* of *path* (from another thread if *thread*), and all of each of *also*."""
        reply_r, reply_w = os.pipe()
        cmd_r, self.cmd_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                faulthandler.disable()  # die of the signal itself, silently
                os.close(reply_r)
                os.close(self.cmd_w)
                pin_all = partial(_pin_all, path, values)
                if thread:  # the pins are taken by another thread of the process
                    worker = threading.Thread(target=pin_all)
                    worker.start()
                    worker.join()
                else:
                    pin_all()
                for other in also:
                    pin(other)
                os.write(reply_w, b"%d\n" % os.getpid())
                code = _obey(path, cmd_r, reply_w)
            finally:
                os._exit(code)
        os.close(reply_w)
        os.close(cmd_r)
        self.pid = pid
        self.replies = os.fdopen(reply_r, "rb", buffering=0)
        reply = self.replies.readline()
        assert reply == b"%d\n" % pid, f"holder {pid} did not pin: {reply!r}"

    def do(self, verb: str, value: str = "0,0") -> int:
        """Have the child pin or unpin; returns 0 or the errno it got."""
        os.write(self.cmd_w, f"{verb} {value}\n".encode())
        return int(self.replies.readline())

    def end(self, how: str) -> int:
        """End the child (``exit``, ``raise`` or a signal name); returns its wait status."""
        if how in ("exit", "raise"):
            os.write(self.cmd_w, how.encode() + b"\n")
        else:
            os.kill(self.pid, getattr(signal, how))
        os.close(self.cmd_w)
        _, status = os.waitpid(self.pid, 0)
        self.replies.close()
        return status


def pins_gone_within(path: Path, pid: int, seconds: float = 1.0) -> float:
    """Seconds until *pid* holds no pin on *path*; fails after *seconds*."""
    start = time.monotonic()
    wait_until(lambda: all(p[2] != pid for p in pins(path)), seconds, f"pins of {pid} gone")
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["exit", "raise", "SIGTERM", "SIGKILL"])
def test_the_pins_of_a_process_go_within_a_second_of_its_exit(
    mount: Mount, area: Path, how: str
) -> None:
    f = volatile_file(area / "f", 3)
    holder = Holder(f, ("0,0", "0,0", "4096,1"))
    assert pins(f) == [(0, 3 * PAGE, holder.pid, 2), (PAGE, PAGE, holder.pid, 1)]
    released_before = stats(mount.path)["pins_released_by_exit"]
    purge_all(mount.path)
    assert purged(f) == []
    holder.end(how)  # returns once the process is dead (reaped)
    pins_gone_within(f, holder.pid)  # within a second of that
    assert stats(mount.path)["pins_released_by_exit"] - released_before == 3
    purge_all(mount.path)  # the unit is purgeable again
    assert purged(f) == [(0, 3 * PAGE)]


def test_a_threads_pin_belongs_to_its_process(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    holder = Holder(f, ("0,0",), thread=True)
    assert pins(f) == [(0, 2 * PAGE, holder.pid, 1)]  # the process, not the thread
    purge_all(mount.path)
    assert purged(f) == []  # the thread is gone, the pin stays with its process
    holder.end("SIGKILL")
    pins_gone_within(f, holder.pid)


def test_a_child_does_not_inherit_its_parents_pins(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    pin(f)
    try:

        def child() -> object:
            return {
                "unpin": errno_or_value(lambda: unpin(f)),
                "pins": pins(f),
            }

        result = in_child(child)
        assert result == {"unpin": {"errno": errno.ENOENT}, "pins": [[0, 2 * PAGE, os.getpid(), 1]]}
        assert pins(f) == [(0, 2 * PAGE, os.getpid(), 1)]  # the child's exit took nothing
        purge_all(mount.path)
        assert purged(f) == []
    finally:
        unpin(f)


def test_two_processes_share_a_unit(mount: Mount, area: Path) -> None:
    """A pins, B pins, A unpins: purge-all leaves the unit; B unpins: it is purged."""
    f = volatile_file(area / "f", 4)
    a = Holder(f)
    b = Holder(f, ("4K,4K",))
    try:
        assert sorted(p[2] for p in pins(f)) == sorted([a.pid, b.pid])
        assert a.do("unpin", "4K,4K") == errno.ENOENT  # B's pin is not A's
        assert a.do("unpin") == 0
        purge_all(mount.path)
        assert purged(f) == []  # B's pin of one page holds the whole unit
        assert b.do("unpin") == errno.ENOENT  # A's range is not B's
        assert b.do("unpin", "4096,4096") == 0
        assert pins(f) == []
        purge_all(mount.path)
        assert purged(f) == [(0, 4 * PAGE)]
    finally:
        a.end("exit")
        b.end("exit")


def test_pins_are_counted_across_processes(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    a = Holder(f, ("0,0", "0,0"))
    b = Holder(f)
    try:
        assert sorted(p[2:] for p in pins(f)) == sorted([(a.pid, 2), (b.pid, 1)])
        assert a.do("unpin") == 0
        assert b.do("unpin") == 0
        purge_all(mount.path)
        assert purged(f) == []  # A still holds one
        assert b.do("unpin") == errno.ENOENT
        assert pins(f) == [(0, 2 * PAGE, a.pid, 1)]
        assert a.do("unpin") == 0
        assert a.do("unpin") == errno.ENOENT
        purge_all(mount.path)
        assert purged(f) == [(0, 2 * PAGE)]
    finally:
        a.end("exit")
        b.end("exit")


def test_a_holder_killed_while_another_holds(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 4)
    a = Holder(f)
    b = Holder(f, ("4K,4K",))
    a.end("SIGKILL")
    pins_gone_within(f, a.pid)
    purge_all(mount.path)
    assert purged(f) == []
    b.end("exit")
    pins_gone_within(f, b.pid)
    purge_all(mount.path)
    assert purged(f) == [(0, 4 * PAGE)]


# Run by a fresh interpreter: forks COUNT small processes that each pin two of the files named
# on the command line (the first twice), print their pids and wait to be killed; it reaps them.
SPAWNER = r"""
import os, signal, sys
files, count = sys.argv[2:], int(sys.argv[1])
for i in range(count):
    if os.fork() == 0:
        try:
            mine = [files[i % len(files)], files[(i + 1) % len(files)]]
            for name in (mine[0], mine[0], mine[1]):
                os.setxattr(name, "user.vrange.pin", b"0,0")
            os.write(1, b"%d\n" % os.getpid())  # one write: lines never interleave
            signal.pause()
        finally:
            os._exit(1)
sys.stdout.close()
for _ in range(count):
    os.wait()  # reaps every holder once it is killed, then exits
"""


def test_hundreds_of_pinning_processes_dying_together(mount: Mount, area: Path) -> None:
    """200 processes pin (40 files; each pins two of them, one twice), are killed at once, and
    within a second of their death nothing is pinned and every unit is purgeable.

    The holders are forked by a fresh interpreter, not by pytest: a fork of this process
    takes the kernel long to tear down, which is not the daemon's time."""
    files = [volatile_file(area / f"f{i}", 1 + i % 3) for i in range(40)]
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, "200", *map(str, files)], stdout=subprocess.PIPE
    )
    pids: list[int] = []
    pidfds: list[int] = []
    try:
        assert spawner.stdout is not None
        for _ in range(200):  # by lines: the holders keep the pipe open
            pids.append(int(spawner.stdout.readline()))
        pidfds = [os.pidfd_open(pid) for pid in pids]
        before = stats(mount.path)
        assert (before["pin_owners"], before["pins"]) == (200, 600)
        purge_all(mount.path)
        assert all(purged(f) == [] for f in files)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        poll = select.poll()
        for fd in pidfds:
            poll.register(fd, select.POLLIN)
        dead: set[int] = set()
        while len(dead) < len(pidfds):  # a pidfd is readable once its process is dead
            dead.update(fd for fd, _ in poll.poll(10_000))
        gone = pins_gone_within_stats(mount, 1.0)
    finally:
        for pid in pids:  # on a failure, no holder may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for fd in pidfds:
            os.close(fd)
        try:
            spawner.wait(10)
        finally:
            spawner.kill()
            spawner.wait()
        if spawner.stdout is not None:
            spawner.stdout.close()
    after = stats(mount.path)
    assert (after["pin_owners"], after["pinned_volatile_bytes"]) == (0, 0)
    assert after["pins_released_by_exit"] - before["pins_released_by_exit"] == 600
    assert gone < 1.0
    purge_all(mount.path)
    assert all(purged(f) == [(0, f.stat().st_size)] for f in files)


def pins_gone_within_stats(mount: Mount, seconds: float) -> float:
    """Seconds until the mount holds no pin; fails after *seconds*."""
    start = time.monotonic()
    wait_until(lambda: stats(mount.path)["pins"] == 0, seconds, "every pin gone")
    return time.monotonic() - start


def test_pins_survive_a_rename_and_go_with_the_last_unlink_and_close(
    mount: Mount, area: Path
) -> None:
    f = volatile_file(area / "f", 2)
    before = stats(mount.path)["pins"]
    with f.open("rb") as fh:
        pin(f)
        moved = area / "moved"
        f.rename(moved)
        assert pins(moved) == [(0, 2 * PAGE, os.getpid(), 1)]
        purge_all(mount.path)
        assert purged(moved) == []
        moved.unlink()
        assert os.getxattr(fh.fileno(), PINS) == b"0,8192 %d 1\n" % os.getpid()  # still open
        assert stats(mount.path)["pins"] == before + 1
    wait_until(lambda: stats(mount.path)["pins"] == before, 5.0, "the freed file's pins gone")


# -- the command line and the client ----------------------------------------------------------
def test_vrangefs_pins_and_status_show_the_pins(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 3)
    g = volatile_file(area / "g", 1)
    holder = Holder(f, ("0,0", "0,0"))
    pin(f, "4K,1")
    try:
        result = run_cli(["pins", str(f), str(g)])
        assert (result.returncode, result.stderr) == (0, "")
        lines = result.stdout.splitlines()
        assert lines[0] == f"{f}: 3 pin(s)"
        rows = [line.split() for line in lines[2:4]]
        assert [(r[0], r[1], r[4], r[5]) for r in rows] == [
            ("0", str(3 * PAGE), str(holder.pid), "2"),
            (str(PAGE), str(PAGE), str(os.getpid()), "1"),
        ]
        assert lines[4] == f"{g}: no pins"
        status = run_cli(["status", str(f)])
        assert status.returncode == 0
        assert "1 volatile unit(s), 0 purged range(s), 3 pin(s)" in status.stdout
        assert f"pid {holder.pid}, 2 times" in status.stdout
        missing = run_cli(["pins", str(area / "missing")])
        assert missing.returncode == 1 and "cannot read the pins of" in missing.stderr
    finally:
        holder.end("SIGKILL")
        unpin(f, "4K,1")


def test_a_reader_uses_client_pinned(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2, mode=0o644)

    def reader() -> object:
        from vrangefs import client  # noqa: PLC0415 (the package under test, in the child)

        with client.pinned(f) as held:
            purge_all_refused = errno_or_value(lambda: purge_all(mount.path))
            return {
                "intact": held.intact,
                "pins": [(p.offset, p.length, p.count) for p in client.pins(f)],
                "purge": purge_all_refused,
            }

    assert as_nobody(reader) == {
        "intact": True,
        "pins": [[0, 2 * PAGE, 1]],
        "purge": {"errno": errno.EPERM},
    }
    assert pins(f) == []
