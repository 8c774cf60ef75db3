"""The example cache store (``examples.cachestore``) on real mounts and on a plain directory.

What an application relies on: a round trip returns the bytes; objects are volatile and a
purged one is a miss (and is removed); a reader's pin (a real, counted pin of its process)
holds against purges from other processes, also while a second reader leaves, and goes when a
reader is killed; several processes hammering the same keys never
see wrong bytes nor an exception; the cap sheds the least recently used objects; the CLI's
exit codes; and the same code on a filesystem that is not vrangefs.  Child processes are
coordinated through pipes, never by sleeping.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from examples.cachestore import CacheStore, fstype_of, key_of
from tests.conftest import wait_until
from tests.integration.conftest import Mounter
from vrangefs import client

REPO = Path(__file__).resolve().parents[2]
VOLATILE = "user.vrange.volatile"
PURGED = "user.vrange.purged"
MIB = 1 << 20


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def volatile_of(path: Path) -> bytes:
    return os.getxattr(path, VOLATILE)


def purge_all(store: CacheStore) -> None:
    os.setxattr(store.mount, "user.vrange.purge", b"all")


@pytest.fixture
def store(work: Path) -> CacheStore:
    """A cache in a fresh directory of the module's shared mount (emptied after each test)."""
    return CacheStore(work / "cache")


# -- one process --------------------------------------------------------------------------
def test_round_trip_and_layout(store: CacheStore) -> None:
    assert store.volatile
    data = blob(300_000, 1)
    key = store.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert store.path_of(key) == store.root / "objects" / key[:2] / key[2:]
    assert store.path_of(key).read_bytes() == data
    assert store.contains(key)
    assert store.get(key) == data
    assert store.put(data) == key  # already there: kept, not rewritten
    empty = store.put(b"")
    assert store.get(empty) == b""
    c = store.counters
    assert (c.hits, c.misses, c.puts, c.deduplicated_puts) == (2, 0, 3, 1)
    usage = store.usage()
    assert (usage.objects, usage.bytes, usage.scratch_files) == (2, len(data), 0)
    stats = store.stats()
    assert stats.hit_rate == 1.0
    assert stats.mount["resident_bytes"] == usage.resident_bytes == 300_000 + 4096 - 300_000 % 4096


def pins_of(path: Path) -> list[tuple[int, int, int, int]]:
    """(offset, length, pid, count) of each live pin of the file."""
    return [(p.offset, p.length, p.pid, p.count) for p in client.pins(path)]


def test_objects_stay_volatile_and_are_pinned_while_open(store: CacheStore) -> None:
    data = blob(5 * 4096 + 17, 2)
    key = store.put(data)
    path = store.path_of(key)
    whole = b"0,%d\n" % len(data)
    assert volatile_of(path) == whole
    assert pins_of(path) == []
    with store.open(key) as f:
        assert f is not None
        assert volatile_of(path) == whole  # a pin, not a non-volatile mark, holds it
        assert pins_of(path) == [(0, 6 * 4096, os.getpid(), 1)]
        with store.open(key) as again:  # pins are counted: the inner block drops only its own
            assert again is not None
            assert pins_of(path) == [(0, 6 * 4096, os.getpid(), 2)]
        assert pins_of(path) == [(0, 6 * 4096, os.getpid(), 1)]
        purge_all(store)
        assert os.getxattr(path, PURGED) == b""
        assert f.read() == data
    assert pins_of(path) == []
    assert volatile_of(path) == whole
    assert store.get(key) == data
    assert volatile_of(path) == whole
    assert pins_of(path) == []


def test_a_purged_object_is_a_miss_and_is_removed(store: CacheStore) -> None:
    data = blob(MIB, 3)
    key = store.put(data)
    purge_all(store)
    assert os.getxattr(store.path_of(key), PURGED) == b"0,%d\n" % MIB
    assert not store.contains(key)
    assert store.get(key) is None
    assert not store.path_of(key).exists()
    assert (store.counters.misses, store.counters.purged_misses) == (1, 1)
    assert store.get(key) is None  # absent now: a plain miss
    assert store.counters.misses == 2
    assert store.put(data) == key
    assert store.get(key) == data


def test_the_cap_sheds_the_least_recently_used(mounter: Mounter) -> None:
    mount = mounter.mount("16M")
    store = CacheStore(mount.path / "cache")
    blobs = [blob(MIB, 100 + i) for i in range(40)]  # 2.5 times the cap
    keys = []
    for i, data in enumerate(blobs):
        keys.append(store.put(data))
        if i % 4 == 0:
            assert store.get(keys[0]) == blobs[0]  # kept hot: re-marked, purged last
    assert store.counters.failed_puts == store.counters.lost_puts == 0
    stats = store.stats()
    assert int(stats.mount["purge_events"]) >= 24
    assert int(stats.mount["resident_bytes"]) <= 16 * MIB
    assert store.get(keys[0]) == blobs[0]
    assert [store.contains(k) for k in keys[-8:]] == [True] * 8
    assert [store.get(k) for k in keys[1:9]] == [None] * 8  # the oldest went first
    assert store.counters.purged_misses == 8


def test_past_the_pin_limit_objects_are_read_unpinned(mounter: Mounter) -> None:
    """A pin the per-user limit refuses (EDQUOT) is no error: the object is read unpinned,
    and a purge shows as EIO, that is a miss, never as wrong bytes."""
    mount = mounter.mount("16M", options=["pin_limit=2M"])
    store = CacheStore(mount.path / "cache")
    small, large = blob(MIB, 11), blob(3 * MIB // 2, 12)
    small_key, large_key = store.put(small), store.put(large)
    assert store.get(large_key) == large  # pinned: 1.5 MiB of 2
    assert store.counters.unpinned_reads == 0
    with store.open(small_key) as f:  # 1 MiB pinned: 1.5 MiB more would pass the limit
        assert f is not None
        assert store.get(large_key) == large
        assert store.counters.unpinned_reads == 1
        with store.open(large_key) as unpinned:
            assert unpinned is not None
            assert client.pins(store.path_of(large_key)) == []
            purge_all(store)
            with pytest.raises(OSError) as read:
                unpinned.read()
            assert read.value.errno == errno.EIO
        assert f.read() == small  # its pin held through the purge
    assert store.get(large_key) is None  # pinned again, and found purged
    assert (store.counters.unpinned_reads, store.counters.purged_misses) == (2, 1)
    assert store.get(small_key) == small
    assert store.counters.unpinned_reads == 2


def test_discard_never_removes_a_fresh_copy(store: CacheStore) -> None:
    """A reader that found its object purged while another process re-put it."""
    data = blob(64 * 1024, 4)
    key = store.put(data)
    path = store.path_of(key)
    with open(path, "rb") as stale:
        purge_all(store)
        assert CacheStore(store.root).put(data) == key  # a fresh inode under the same name
        store._discard(path, stale.fileno())
    assert store.get(key) == data


def test_sweep_removes_only_what_dead_writers_left(store: CacheStore) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    fanout = store.objects / "ab"
    fanout.mkdir()
    orphan = fanout / f".tmp-{dead.stdout.strip()}-00ff"
    mine = fanout / f".tmp-{os.getpid()}-00ff"
    orphan.write_bytes(b"half an object")
    mine.write_bytes(b"in progress")
    assert store.usage().scratch_files == 2
    assert store.sweep() == 1
    assert not orphan.exists() and mine.exists()


# -- several processes --------------------------------------------------------------------
READER = """
import hashlib, sys
from examples.cachestore import CacheStore
store, key = CacheStore(sys.argv[1]), sys.argv[2]
with store.open(key) as f:
    assert f is not None
    print("pinned", flush=True)
    sys.stdin.readline()
    data = f.read()
print("ok" if hashlib.sha256(data).hexdigest() == key else "bad", flush=True)
"""


def start_reader(store: CacheStore, key: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, str(store.root), key],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "pinned\n"
    return proc


def finish_reader(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate("go\n", timeout=30)
    assert (out, proc.returncode) == ("ok\n", 0)


def test_a_pinned_object_survives_purges_until_the_last_reader_leaves(store: CacheStore) -> None:
    data, other = blob(2 * MIB, 5), blob(MIB, 6)
    key, other_key = store.put(data), store.put(other)
    path = store.path_of(key)
    whole = b"0,%d\n" % len(data)
    first = start_reader(store, key)
    second = start_reader(store, key)
    assert volatile_of(path) == whole  # pinned, still volatile
    assert sorted(p.pid for p in client.pins(path)) == sorted([first.pid, second.pid])
    finish_reader(first)  # must not unpin what the second still reads
    assert [(p.pid, p.count) for p in client.pins(path)] == [(second.pid, 1)]
    purge_all(store)
    assert os.getxattr(path, PURGED) == b""
    assert store.get(other_key) is None  # the idle one went
    finish_reader(second)
    assert client.pins(path) == []
    assert volatile_of(path) == whole  # purgeable again
    assert store.get(key) == data
    purge_all(store)
    assert store.get(key) is None


def test_a_reader_killed_while_pinning_leaves_no_pin(store: CacheStore) -> None:
    data = blob(MIB, 10)
    key = store.put(data)
    path = store.path_of(key)
    reader = start_reader(store, key)
    assert [p.pid for p in client.pins(path)] == [reader.pid]
    reader.kill()
    reader.communicate(timeout=30)  # reaped, its pipes closed
    wait_until(lambda: client.pins(path) == [], 5, "the dead reader's pin goes")
    assert volatile_of(path) == b"0,%d\n" % MIB
    purge_all(store)
    assert store.get(key) is None


STRESS_BLOBS = [
    blob(size, 1000 + i)
    for i, size in enumerate(
        [0, 1, 4095, 4096, 4097, 30_000, 70_000, 150_000, 262_144, 300_001, 500_000, 3 * 4096]
    )
]


def stress_worker(root: str, seed: int, ops: int) -> dict[str, int]:
    """Random put/get/delete/contains on shared keys, and now and then a purge of all."""
    store = CacheStore(root)
    rng = random.Random(seed)
    wrong = 0
    for _ in range(ops):
        data = rng.choice(STRESS_BLOBS)
        key = key_of(data)
        op = rng.random()
        if op < 0.35:
            assert store.put(data) == key
        elif op < 0.75:
            got = store.get(key)
            wrong += got is not None and got != data
        elif op < 0.88:
            store.delete(key)
        elif op < 0.97:
            store.contains(key)
        else:
            client.purge_all(store.mount)
    return {**asdict(store.counters), "wrong": wrong}


def test_several_processes_share_one_cache(store: CacheStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(stress_worker, [(str(store.root), seed, 200) for seed in range(4)])
    # Never wrong bytes.  (Corrupt misses do happen, from the vrangefs bug shown by
    # test_vrangefs_reopen_after_unlink_keeps_the_data: the hash check turns them into misses.)
    assert sum(r["wrong"] for r in results) == 0
    assert sum(r["hits"] for r in results) > 0
    assert sum(r["puts"] for r in results) > 0
    # Afterwards: nothing half-written is left, and every object is intact and volatile
    # (or purged), and no reader left it pinned.
    assert store.usage().scratch_files == 0
    for data in STRESS_BLOBS:
        path = store.path_of(key_of(data))
        if not path.exists():
            continue
        assert client.pins(path) == [], path
        if data:
            assert volatile_of(path) == b"0,%d\n" % len(data), path
        got = store.get(key_of(data))
        assert got is None or got == data


RACE_SECONDS = 4.0
RACE_OBJECT = 512 * 1024


def explicit_purges(mount: Path) -> int:
    return int(client.stats(mount)["purge_events_explicit"])


def racing_reader(root: str, seed: int, start: Barrier, results: Any) -> None:
    """Read one object through the store in a loop until the deadline; report what happened.

    ``open`` pins the object, asks what was purged and yields it only if intact: from then
    on every byte must read back right, so an OSError there (EIO) ends the loop as an error.
    ``reads_across_purges`` counts reads during which the mount ran a purge-all: each of
    those would have taken the object (it is volatile throughout) but for the pin.  A miss
    (purged while nobody held it) puts the object again, as an application would.
    """
    data = blob(RACE_OBJECT, seed)
    key = key_of(data)
    store = CacheStore(root)
    out = {"reads": 0, "reads_across_purges": 0, "wrong": 0, "misses": 0, "gets": 0}
    error = ""
    start.wait(timeout=60)
    deadline = time.monotonic() + RACE_SECONDS
    try:
        while time.monotonic() < deadline:
            with store.open(key) as f:
                if f is not None:
                    before = explicit_purges(store.mount)
                    got = b"".join(iter(partial(os.read, f.fileno(), 64 * 1024), b""))
                    purges = explicit_purges(store.mount) - before
                    out["reads"] += 1
                    out["reads_across_purges"] += purges > 0
                    out["wrong"] += got != data
            if f is None:
                out["misses"] += 1
                store.put(data)
            fetched = store.get(key)  # verified; None if purged before its pin
            out["gets"] += fetched is not None
            out["wrong"] += fetched is not None and fetched != data
    except OSError as e:
        error = repr(e)
    results.put({"role": "reader", **out, **asdict(store.counters), "error": error})


def purger(mount: str, start: Barrier, results: Any) -> None:
    """Purge everything in a loop with setfattr, and write volatile fillers past the cap."""
    filler = b"\xa5" * MIB
    purges = 0
    error = ""
    start.wait(timeout=60)
    deadline = time.monotonic() + RACE_SECONDS
    try:
        while time.monotonic() < deadline:
            for i in range(3):  # fill-0 and fill-1 (8 MiB) overflow the 8 MiB cap: it purges
                if i != 1:
                    subprocess.run(
                        ["setfattr", "-n", "user.vrange.purge", "-v", "all", mount],
                        check=True,
                        capture_output=True,
                        timeout=30,
                    )
                    purges += 1
                fd = os.open(f"{mount}/fill-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.ftruncate(fd, 4 * MIB)
                    client.mark_volatile(fd)
                    for _ in range(4):
                        os.write(fd, filler)
                finally:
                    os.close(fd)
    except (OSError, subprocess.SubprocessError) as e:
        error = repr(e)
    results.put({"role": "purger", "purges": purges, "error": error})


@pytest.mark.timeout(120)
def test_two_readers_never_see_eio_while_a_third_process_purges(mounter: Mounter) -> None:
    """Two processes read one object in loops while a third purges the mount and fills the cap.

    Their pins (counted, one per reader) hold the object through every purge that runs while
    either reads: neither ever gets EIO or wrong bytes.  Purges do run during reads (counted
    by the readers), so without working pins this test fails.
    """
    mount = mounter.mount("8M")
    store = CacheStore(mount.path / "cache")
    key = store.put(blob(RACE_OBJECT, 77))
    before = client.stats(mount.path)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=racing_reader, args=(str(store.root), 77, start, results)),
        ctx.Process(target=racing_reader, args=(str(store.root), 77, start, results)),
        ctx.Process(target=purger, args=(str(mount.path), start, results)),
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [results.get(timeout=90) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    after = client.stats(mount.path)
    readers = [r for r in reports if r["role"] == "reader"]
    (purging,) = [r for r in reports if r["role"] == "purger"]
    assert [r["error"] for r in reports] == ["", "", ""], reports
    assert [r["wrong"] for r in readers] == [0, 0], readers
    assert [r["corrupt_misses"] for r in readers] == [0, 0], readers
    assert all(r["reads"] > 0 and r["gets"] > 0 for r in readers), readers
    # The purger did purge, explicitly and through the cap, and reads overlapped purges.
    assert purging["purges"] > 0
    explicit = int(after["purge_events_explicit"]) - int(before["purge_events_explicit"])
    assert explicit >= purging["purges"]
    assert int(after["purge_events_cap"]) > int(before["purge_events_cap"])
    assert all(r["reads_across_purges"] > 0 for r in readers), readers
    # Nobody holds a pin any more, and the object, if there, is volatile and intact.
    wait_until(lambda: client.stats(mount.path)["pins"] == 0, 5, "no pin left")
    path = store.path_of(key)
    if path.exists():
        assert volatile_of(path) == b"0,%d\n" % RACE_OBJECT
        got = store.get(key)
        assert got is None or key_of(got) == key


# -- the command line ---------------------------------------------------------------------
def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "examples.cachestore", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_cli_and_its_exit_codes(store: CacheStore, tmp_path: Path) -> None:
    root = str(store.root)
    data = blob(100_000, 7)
    src, out = tmp_path / "src", tmp_path / "out"
    src.write_bytes(data)
    put = cli(root, "put", str(src))
    assert put.returncode == 0, put.stderr
    key = put.stdout.decode().strip()
    assert key == key_of(data)
    assert cli(root, "put", "-", stdin=data).stdout.decode().strip() == key
    got = cli(root, "get", key)
    assert (got.returncode, got.stdout) == (0, data)
    assert cli(root, "get", key, "-o", str(out)).returncode == 0
    assert out.read_bytes() == data
    assert cli(root, "contains", key).returncode == 0
    stats = cli(root, "stats", "--json")
    assert stats.returncode == 0
    report = json.loads(stats.stdout)
    assert report["volatile"] is True
    assert report["usage"]["objects"] == 1
    assert "purge_events" in report["mount"]
    assert b"mount.purge_events=" in cli(root, "stats").stdout
    assert cli(root, "contains", key_of(b"absent")).returncode == 1

    purge_all(store)
    assert cli(root, "contains", key).returncode == 1
    out.unlink()
    assert cli(root, "get", key, "-o", str(out)).returncode == 1
    assert not out.exists()
    miss = cli(root, "get", key)
    assert (miss.returncode, miss.stdout) == (1, b"")
    assert b"miss" in miss.stderr
    assert cli(root, "delete", key).returncode == 1  # the first miss removed it
    assert cli(root, "put", str(src)).returncode == 0
    assert cli(root, "delete", key).returncode == 0
    assert cli(root, "get", "not-a-key").returncode == 2


# -- not vrangefs -------------------------------------------------------------------------
@pytest.fixture
def plain(tmp_path: Path) -> Iterator[CacheStore]:
    yield CacheStore(tmp_path / "cache")


def test_a_plain_directory_works_without_vrangefs(plain: CacheStore, tmp_path: Path) -> None:
    assert not plain.volatile
    data = blob(200_000, 8)
    key = plain.put(data)
    path = plain.path_of(key)
    assert VOLATILE not in os.listxattr(path)  # never marked: vrangefs was not called
    assert plain.contains(key)
    assert plain.get(key) == data
    src = tmp_path / "src"
    src.write_bytes(data * 3)
    big = plain.put_file(src)
    assert plain.get_to(big, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data * 3
    assert plain.delete(key) and not plain.delete(key)
    assert plain.get(key) is None and not plain.contains(key)
    assert "used_bytes" in plain.stats().mount
    with pytest.raises(client.NotVrangefsError):
        CacheStore(plain.root, volatile=True)


def test_a_corrupt_object_is_a_miss_and_is_removed(plain: CacheStore) -> None:
    key = plain.put(blob(10_000, 9))
    plain.path_of(key).write_bytes(b"not what the key says")
    assert plain.get(key) is None
    assert plain.counters.corrupt_misses == 1
    assert not plain.path_of(key).exists()


# -- a vrangefs bug the store runs into ---------------------------------------------------
def test_vrangefs_reopen_after_unlink_keeps_the_data(work: Path) -> None:
    """An O_PATH descriptor holds a lookup but no open file; reopening it opens the inode.

    This is the deterministic form of what the stress test hits by chance: a reader's
    lookup happens before another process's unlink (or rename over), its OPEN after.
    """
    path = work / "victim"
    path.write_bytes(b"z" * 10000)
    handle = os.open(path, os.O_PATH)
    try:
        path.unlink()
        try:
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY)
        except FileNotFoundError:
            return  # also acceptable: the open lost the race with the unlink
        try:
            assert os.pread(fd, 20000, 0) == b"z" * 10000
        finally:
            os.close(fd)
    finally:
        os.close(handle)


def test_vrangefs_client_notices_another_filesystem_on_a_reused_device(
    mounter: Mounter,
) -> None:
    """Reproduced only if the kernel does reuse the number (it hands out the lowest free one,
    so it does unless another mount takes it meanwhile); otherwise skipped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    for _ in range(3):
        mount = mounter.mount("8M")
        client.stats(mount.path)  # the client now knows this device as vrangefs
        device = os.stat(mount.path).st_dev
        mounter.unmount(mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "t", mount.path], check=True)
        try:
            if os.stat(mount.path).st_dev != device:
                continue
            assert fstype_of(mount.path) == "tmpfs"  # the store's own check is not fooled
            (mount.path / "f").write_bytes(b"x" * 4096)
            with pytest.raises(client.NotVrangefsError):
                client.mark_volatile(mount.path / "f")
            return
        finally:
            subprocess.run(["umount", mount.path], check=True)
    pytest.skip("the kernel gave the tmpfs another device number each time: not reproduced")
