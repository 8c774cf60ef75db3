"""Hostile timing around purges: the mount keeps answering, and purged bytes never come back.

Each test here reproduces a defect found by testing as a hostile user would:

- hundreds of processes waiting on a file that is being purged must not starve the
  requests that dropping the kernel's cache depends on (the mount used to stop
  answering for good);
- the moment the statistics report a purge, no read of a purged page may return the
  old bytes from the kernel's cache;
- writeback of a page stored through a shared writable mapping must not bring the
  rest of a purged page back.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import Mount, Mounter, abort_connection
from tests.integration.vrange_helpers import (
    PAGE,
    PURGE,
    PURGED,
    VOLATILE,
    child_signal,
    in_child,
    mark,
    pattern,
    purge_all,
    purged,
    stats,
)

MiB = 1024 * 1024


# -- helpers --------------------------------------------------------------------------------
def _timed(fn: Callable[[], object], timeout: float) -> float | None:
    """Seconds *fn* took in a thread, or None if it had not returned after *timeout*."""
    done = threading.Event()
    started = time.monotonic()

    def run() -> None:
        with contextlib.suppress(OSError):
            fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(timeout):
        return None
    return time.monotonic() - started


def _spawn(fn: Callable[[], None]) -> int:
    """Fork a child that runs *fn* and exits 0 (1 on an unexpected error)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pids: list[int], deadline: float) -> tuple[list[int], list[int]]:
    """Wait for children until *deadline*: (those still running, then killed; those that
    exited with a failure)."""
    left = set(pids)
    failed = []
    while left and time.monotonic() < deadline:
        for pid in list(left):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                left.discard(pid)
                if status:
                    failed.append(pid)
        time.sleep(0.02)
    for pid in left:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return sorted(left), failed


@pytest.fixture
def hostile(mounter: Mounter) -> Iterator[Mount]:
    """A mount shared with a second user, aborted if a test leaves it unable to answer."""
    mount = mounter.mount("48M", options=["allow_other"])
    try:
        yield mount
    finally:
        # Not is_mounted(): resolving the path would itself wait on a mount that hangs.
        if _timed(lambda: os.statvfs(mount.path), 10.0) is None:
            abort_connection(mount.path)
            mount.check_log = False
            mount.expect_status = -9  # whatever it is: the abort is the test's failure


# -- 1. waiters must not starve the requests an invalidation depends on ---------------------
@pytest.mark.timeout(240)
@pytest.mark.slow
def test_hundreds_of_waiters_do_not_deadlock_the_mount(hostile: Mount) -> None:
    """200 processes (half as a second user) poll ``purged`` on a file that is purged over
    and over, by purge-all and by writes at the cap, while 4 readers re-read it (dropping
    their cached pages between reads). For a minute the root must keep answering."""
    root = hostile.path
    victim = root / "victim"
    victim.write_bytes(pattern(1024))  # 4 MiB
    victim.chmod(0o666)
    seconds = float(os.environ.get("VRANGEFS_HOSTILE_SECONDS", "60"))
    end = time.monotonic() + seconds

    def purger() -> None:
        filler = root / "filler"
        body = b"f" * (8 * MiB)
        n = 0
        while time.monotonic() < end:
            with open(victim, "r+b") as f:
                f.write(pattern(1024, seed=n))
            os.setxattr(victim, VOLATILE, b"0,0")
            if n % 2:
                os.setxattr(root, PURGE, b"all")
            else:  # push the victim out at the cap: 5 x 8 MiB of volatile filler
                for i in range(5):
                    part = filler.with_name(f"filler{i}")
                    with open(part, "wb") as f:
                        f.write(body)
                    os.setxattr(part, VOLATILE, b"0,0")
            n += 1

    def reader() -> None:
        while time.monotonic() < end:
            fd = os.open(victim, os.O_RDONLY)
            try:
                for off in range(0, 4 * MiB, 128 * 1024):
                    try:
                        os.pread(fd, 128 * 1024, off)
                    except OSError as e:
                        assert e.errno == errno.EIO
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def waiter(as_other_user: bool) -> Callable[[], None]:
        def run() -> None:
            if as_other_user:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            while time.monotonic() < end:
                try:
                    os.getxattr(victim, PURGED)
                except OSError as e:
                    assert e.errno in (errno.ENOENT, errno.ESTALE)

        return run

    pids = [_spawn(purger)] + [_spawn(reader) for _ in range(4)]
    pids += [_spawn(waiter(i % 2 == 1)) for i in range(200)]
    latencies = []
    stalled = None
    try:
        while time.monotonic() < end:
            took = _timed(lambda: os.getxattr(root, "user.vrange.stats"), 15.0)
            if took is None:
                stalled = "the root did not answer getxattr(user.vrange.stats) within 15 s"
                break
            latencies.append(took)
            time.sleep(0.05)  # the probe's pace, not a synchronisation
    finally:
        stuck, failed = _reap(pids, time.monotonic() + (5 if stalled else 30))
    assert stalled is None, stalled
    assert not stuck, f"{len(stuck)} processes still blocked on the mount 30 s after the end"
    assert not failed, f"{len(failed)} processes met an unexpected error (purger first: {pids[0]})"
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(
        f"stats probe over {seconds:.0f} s: {len(latencies)} probes, "
        f"median {statistics.median(latencies) * 1e3:.1f} ms, p99 {p99 * 1e3:.0f} ms, "
        f"max {latencies[-1] * 1e3:.0f} ms"
    )
    # And the mount still works normally afterwards.
    (root / "after").write_bytes(b"still serving")
    assert (root / "after").read_bytes() == b"still serving"


# -- 2. the statistics report a purge only once its bytes are unreadable ---------------------
def _purge_later(trigger: Callable[[], None]) -> int:
    def run() -> None:
        time.sleep(random.uniform(0.05, 0.3))  # somewhere inside the reader's polling
        trigger()

    return _spawn(run)


@pytest.mark.parametrize("cause", ["explicit", "cap"])
def test_no_old_bytes_once_stats_report_the_purge(mounter: Mounter, cause: str) -> None:
    mount = mounter.mount("96M")
    root = mount.path
    big = root / "big"
    body = pattern(16384)  # 64 MiB
    rng = random.Random(7)
    for round_ in range(10):
        big.write_bytes(body)
        with open(big, "rb") as f:  # the kernel now caches every page
            assert f.read() == body
        mark(big, "0,0")
        before = stats(root)["purge_events"]

        def trigger(n: int = round_) -> None:
            if cause == "explicit":
                os.setxattr(root, PURGE, b"all")
            else:  # 48 MiB of fresh data: the cap needs the volatile file's pages
                (root / f"push{n}").write_bytes(b"p" * (48 * MiB))

        child = _purge_later(trigger)
        deadline = time.monotonic() + 30
        while stats(root)["purge_events"] == before:  # poll as fast as the mount answers
            assert time.monotonic() < deadline, f"round {round_}: no purge reported in 30 s"
        fd = os.open(big, os.O_RDONLY)
        try:
            for off in sorted(rng.randrange(0, 16384) * PAGE for _ in range(16)):
                try:
                    got = os.pread(fd, PAGE, off)
                except OSError as e:
                    assert e.errno == errno.EIO
                    continue
                pytest.fail(f"round {round_}: read at {off} returned {got[:16]!r}... after purge")
        finally:
            os.close(fd)
        assert _reap([child], time.monotonic() + 30) == ([], [])
        assert purged(big) == [(0, len(body))]
        for push in root.glob("push*"):
            push.unlink()


# -- 3. writeback of a dirty mapped page does not resurrect a purged unit ------------------
@pytest.mark.parametrize("purged_reads", ["eio", "zeros"])
def test_dirty_shared_mapping_does_not_resurrect_a_purged_page(
    mounter: Mounter, purged_reads: str
) -> None:
    mount = mounter.mount("16M", options=[f"purged_reads={purged_reads}"])
    root = mount.path
    path = root / "mapped"
    body = pattern(4)
    path.write_bytes(body)
    mark(path, "0,0")
    base = stats(root)

    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[10] = 0x21  # page 0 is dirty in the kernel's cache
            purge_all(root)
        after = stats(root)
        # The unit is purged whole: every page of it reads as purged, nothing came back.
        assert purged(path) == [(0, 4 * PAGE)]
        assert after["purged_bytes_total"] - base["purged_bytes_total"] == 4 * PAGE
        assert after["resident_bytes"] == base["resident_bytes"] - 4 * PAGE
        if purged_reads == "eio":
            with pytest.raises(OSError) as info:
                os.pread(fd, PAGE, 0)
            assert info.value.errno == errno.EIO
        else:
            assert os.pread(fd, 4 * PAGE, 0) == bytes(4 * PAGE)
    finally:
        os.close(fd)

    def touch_mapping() -> object:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4 * PAGE, mmap.MAP_SHARED) as m:
            return m[10]

    if purged_reads == "eio":
        assert child_signal(touch_mapping) == 7  # SIGBUS
    else:
        assert in_child(touch_mapping) == 0
    assert purged(path) == [(0, 4 * PAGE)]


def test_stores_after_the_purge_is_flushed_are_kept_with_zeros(mounter: Mounter) -> None:
    """With purged_reads=zeros, a page faulted in after the purge is a fresh zero page: what
    is stored into it is data again, written back as usual."""
    mount = mounter.mount("16M", options=["purged_reads=zeros"])
    path = mount.path / "mapped"
    path.write_bytes(pattern(4))
    mark(path, "0,0")
    purge_all(mount.path)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4 * PAGE, mmap.MAP_SHARED) as m:
        m[10] = 0x21
        m.flush()
    assert purged(path) == [(PAGE, 3 * PAGE)]
    assert path.read_bytes()[:PAGE] == bytes(10) + b"\x21" + bytes(PAGE - 11)
