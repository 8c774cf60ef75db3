"""The cache store's fleet tier: two "hosts" (two real vrangefs mounts) sharing a real Redis.

Each test starts its own ``redis-server`` on a free loopback port with persistence off (never
the system service) and kills it at the end, whether the test passed or not.  What is held:
a remote hit refills the local copy and a purged local copy is only a local miss; large
objects move in chunks, never as whole extra copies; Redis killed (SIGKILL) or hung (SIGSTOP)
mid-run costs only misses (counted, one log line each, bounded by the timeout, with a back-off
instead of hammering) and the store reconnects by itself once Redis is back; wrong bytes under
a key are caught by the content address and are a miss.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from examples.cachestore import CacheStore, key_of
from examples.cachestore.remote import RemoteMiss, RemoteTier
from examples.cachestore.server import RedisServer, RedisServerMissing, free_port
from examples.cachestore.store import Counters
from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter
from vrangefs import client

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
LOGGER = "examples.cachestore"

StoreFactory = Callable[..., CacheStore]


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    try:
        srv = RedisServer()
    except RedisServerMissing as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e}, and CI is set")
        pytest.skip(str(e))
    with srv:
        yield srv


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Mount]]:
    """Two mounts, one per "host", for the whole module (tests use fresh directories)."""
    m = Mounter(tmp_path_factory.mktemp("logs"))
    try:
        yield m.mount("48M"), m.mount("48M")
    finally:
        m.close()


@pytest.fixture
def fleet(hosts: tuple[Mount, Mount], server: RedisServer) -> Iterator[StoreFactory]:
    """``fleet(i, **tier)``: a store on host *i* in front of the test's Redis.

    Keyword arguments go to its :class:`RemoteTier` (timeout, ttl, chunk, back-off).
    Every store is closed and every directory removed afterwards.
    """
    stores: list[CacheStore] = []
    dirs = [Path(tempfile.mkdtemp(dir=h.path)) for h in hosts]

    def make(host: int, **tier: object) -> CacheStore:
        tier.setdefault("timeout", 1.0)
        remote = RemoteTier(server.url, Counters(), **tier)  # type: ignore[arg-type]
        store = CacheStore(dirs[host] / f"cache{len(stores)}", remote=remote)
        assert store.volatile
        stores.append(store)
        return store

    try:
        yield make
    finally:
        for store in stores:
            store.close()
        for d in dirs:
            shutil.rmtree(d)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# -- the tiers ----------------------------------------------------------------------------
def test_a_remote_hit_refills_the_local_copy(fleet: StoreFactory, server: RedisServer) -> None:
    a, b = fleet(0, ttl=60), fleet(1)
    data = blob(200_000, 1)
    key = a.put(data)
    assert a.counters.remote_puts == 1
    assert a.counters.remote_bytes_pushed == len(data)
    assert a.remote is not None
    with server.client() as r:
        name = a.remote.name_of(key)
        assert name == f"vrangefs:cas:{{{key}}}"  # one string per object, hash-tagged
        assert r.get(name) == data
        assert 0 < r.pttl(name) <= 60_000

    assert not b.path_of(key).exists()
    assert b.contains(key)  # Redis has it
    assert b.get(key) == data  # a remote hit ...
    assert b.path_of(key).read_bytes() == data  # ... that refilled the local copy
    assert os.getxattr(b.path_of(key), "user.vrange.volatile") == b"0,%d\n" % len(data)
    assert b.get(key) == data  # now a local hit
    c = b.counters
    assert (c.hits, c.local_hits, c.remote_hits, c.misses, c.refills) == (2, 1, 1, 0, 1)
    assert c.remote_bytes_fetched == len(data)

    client.purge_all(b.mount)  # host b under memory pressure: only a local miss
    assert b.get(key) == data
    assert (c.purged_misses, c.remote_hits, c.misses) == (1, 2, 0)

    assert a.put(data) == key  # already in Redis: not sent again
    assert a.counters.remote_deduplicated_puts == 1
    assert a.counters.remote_bytes_pushed == len(data)

    assert b.put(b"") == key_of(b"")  # the empty object is an object too
    assert a.get(key_of(b"")) == b""

    absent = key_of(b"never stored")
    assert b.get(absent) is None
    assert (c.misses, c.remote_misses) == (1, 1)

    stats = b.stats()
    assert stats.remote["state"] == "up"
    assert stats.remote["url"] == server.url
    assert stats.local_hit_rate + stats.remote_hit_rate == stats.hit_rate

    assert a.delete(key)  # from both tiers: for every host
    with server.client() as r:
        assert not r.exists(name)


def test_large_objects_move_in_chunks(
    fleet: StoreFactory, server: RedisServer, tmp_path: Path
) -> None:
    """Neither side holds more than a chunk beyond the object (put) or at all (get_to)."""
    chunk = 256 * 1024
    a, b = fleet(0, chunk=chunk), fleet(1, chunk=chunk)
    data = blob(12 * MIB + 17, 2)
    tracemalloc.start()
    try:
        key = a.put(data)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert b.get_to(key, tmp_path / "out")
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert put_peak < 3 * MIB, put_peak
    assert get_peak < 3 * MIB, get_peak
    assert (tmp_path / "out").read_bytes() == data
    assert b.path_of(key).read_bytes() == data  # refilled too
    calls = a.counters.remote_calls
    assert calls >= len(data) // chunk  # one SETRANGE per chunk
    with server.client() as r:
        assert r.strlen(f"vrangefs:cas:{{{key}}}") == len(data)
        assert r.keys("*tmp*") == []  # the temporary key was renamed into place

    source = tmp_path / "src"
    source.write_bytes(data[::-1])
    big = b.put_file(source)  # streamed in, then pushed from the local copy
    with a.open(big) as f:  # a remote hit for a, through its refilled local copy
        assert f is not None
        assert f.read() == data[::-1]
    client.purge_all(a.mount)
    assert a.get(big) == data[::-1]
    assert a.counters.remote_hits == 2


# -- Redis down, hung, back ----------------------------------------------------------------
def test_redis_killed_mid_run_then_back(
    fleet: StoreFactory, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    a = fleet(0, backoff_initial=0.2, backoff_max=0.4)
    b = fleet(1, backoff_initial=0.2, backoff_max=0.4)
    blobs = [blob(40_000 + i, 100 + i) for i in range(40)]
    keys: list[str] = []
    for i, data in enumerate(blobs):  # a run: a puts, b reads what a put
        keys.append(a.put(data))
        if i < 20:
            assert b.get(keys[i]) == data
        if i == 29:
            server.kill()  # SIGKILL mid-run
    # a's last ten puts were kept locally and failed remotely, without an exception.
    assert a.counters.remote_errors >= 1
    assert all(a.get(k) == d for k, d in zip(keys, blobs, strict=True))
    errors_before = b.counters.remote_errors
    assert errors_before == 0
    # b: local hits keep working and never touch Redis.
    start = time.monotonic()
    assert all(b.get(k) == d for k, d in zip(keys[:20], blobs[:20], strict=True))
    assert b.counters.remote_errors == 0
    # An object only Redis had: a miss, one counted error, one log line.
    caplog.clear()
    assert b.get(keys[25]) is None
    assert b.counters.remote_errors == 1
    lines = warnings_of(caplog)
    assert len(lines) == 1
    assert server.url in lines[0] and "miss" in lines[0], lines[0]
    # No hammering: for a second, lookups skip Redis except one probe per back-off.
    hammer_end = time.monotonic() + 1.0
    lookups = 0
    while time.monotonic() < hammer_end:
        assert b.get(keys[21 + lookups % 10]) is None
        lookups += 1
    assert lookups > 20
    assert b.counters.remote_errors <= 1 + 1.0 / 0.1
    assert b.counters.remote_skipped >= lookups - b.counters.remote_errors
    assert len(warnings_of(caplog)) == b.counters.remote_errors  # one line per failure
    # Puts keep working on b (locally).
    new = blob(30_000, 999)
    new_key = b.put(new)
    assert b.get(new_key) == new
    assert time.monotonic() - start < 5  # nothing waited on the dead server

    server.start()  # the same port, empty (no persistence)
    caplog.clear()
    pushed = a.counters.remote_puts
    a.put(blobs[25])  # a's back-off is over: it reconnects by itself and pushes again
    assert a.counters.remote_puts == pushed + 1

    def b_reads_it() -> bool:
        return b.get(keys[25]) == blobs[25]

    wait_until(b_reads_it, 5, "b reconnects and reads what a pushed again")
    assert b.remote is not None and b.remote.state == "up"
    assert any("answers again" in line for line in warnings_of(caplog))
    b.put(new)  # b's own put reaches Redis again
    assert fleet(0).get(new_key) == new


def test_a_hung_redis_costs_one_timeout(
    fleet: StoreFactory, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    a, b = fleet(0), fleet(1, timeout=0.3, backoff_initial=2.0, backoff_max=2.0)
    local, remote_only = blob(10_000, 3), blob(10_000, 4)
    local_key, remote_key = b.put(local), a.put(remote_only)
    server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        start = time.monotonic()
        assert b.get(remote_key) is None
        took = time.monotonic() - start
        assert 0.25 < took < 3, took  # one timeout (0.3 s), not a hang
        assert b.counters.remote_errors == 1
        assert "Timeout" in warnings_of(caplog)[-1]
        start = time.monotonic()
        assert b.get(local_key) == local  # local hits do not wait
        assert b.get(remote_key) is None  # backing off: not even a timeout
        assert b.put(blob(5_000, 5))  # nor do puts
        assert b.counters.remote_errors == 1  # no call was made ...
        assert b.counters.remote_skipped == 2  # ... the fetch and the put's check skipped
        assert time.monotonic() - start < 1
    finally:
        server.resume()

    def back() -> bool:
        return b.get(remote_key) == remote_only

    wait_until(back, 5, "b reads from Redis again")


def test_a_long_outage_keeps_backing_off(tmp_path: Path) -> None:
    """Days of failures: the back-off stays capped (and its arithmetic does not overflow)."""
    tier = RemoteTier(f"redis://127.0.0.1:{free_port()}/0", Counters(), backoff_max=0.05)
    tier._failures = 10_000
    store = CacheStore(tmp_path / "cache", remote=tier)  # the tier now counts into the store's
    assert store.get(key_of(b"x")) is None
    assert store.counters.remote_errors == 1
    assert 0.02 <= tier._retry_at - time.monotonic() <= 0.05
    store.close()


# -- wrong bytes under a key ----------------------------------------------------------------
def test_corrupt_remote_data_is_a_miss(
    fleet: StoreFactory, server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    chunk = 64 * 1024
    a, b = fleet(0, chunk=chunk), fleet(1, chunk=chunk)
    small, large = blob(5_000, 6), blob(5 * chunk + 3, 7)
    small_key, large_key = a.put(small), a.put(large)
    assert a.remote is not None
    with server.client() as r:
        r.set(a.remote.name_of(small_key), bytes(len(small)))  # same length, other bytes
        r.setrange(a.remote.name_of(large_key), 3 * chunk + 5, bytes([large[3 * chunk + 5] ^ 1]))
        assert b.get(small_key) is None
        assert not b.get_to(large_key, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        c = b.counters
        assert (c.remote_corrupt, c.misses, c.hits) == (2, 2, 0)
        assert not b.path_of(small_key).exists() and not b.path_of(large_key).exists()
        assert r.exists(a.remote.name_of(small_key), a.remote.name_of(large_key)) == 0  # gone
        assert sum("do not hash" in line for line in warnings_of(caplog)) == 2

        a.put(large)  # repaired: the key is pushed again
        r.set(a.remote.name_of(large_key), large[: 2 * chunk])  # cut short: wrong bytes too
        assert b.get(large_key) is None
        assert c.remote_corrupt == 3

        # An object that vanishes while read (expired, evicted, deleted) is a plain miss.
        a.put(large)
        assert b.remote is not None
        fetched = b.remote.fetch(large_key)
        r.delete(a.remote.name_of(large_key))
        with pytest.raises(RemoteMiss):
            list(fetched)
        assert c.remote_misses == 1

        a.put(small)
        a.put(large)
        assert b.get(small_key) == small
        assert b.get(large_key) == large


# -- the command line ---------------------------------------------------------------------
def test_cli_with_a_remote(hosts: tuple[Mount, Mount], server: RedisServer) -> None:
    data = blob(70_000, 8)
    roots = [Path(tempfile.mkdtemp(dir=h.path)) for h in hosts]
    try:

        def cli(root: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
            cmd = [sys.executable, "-m", "examples.cachestore", str(root), "--remote"]
            return subprocess.run(
                [*cmd, server.url, *args],
                cwd=REPO,
                input=stdin,
                capture_output=True,
                timeout=30,
                check=False,
            )

        put = cli(roots[0], "put", "-", stdin=data)
        assert put.returncode == 0, put.stderr
        key = put.stdout.decode().strip()
        got = cli(roots[1], "get", key)
        assert (got.returncode, got.stdout) == (0, data)
        stats = cli(roots[1], "stats")
        assert b"remote.state=up" in stats.stdout
        server.kill()
        miss = cli(roots[0] / "other", "get", key)
        assert (miss.returncode, miss.stdout) == (1, b"")
        assert b"taken as a miss" in miss.stderr  # the one log line, no traceback
        assert b"Traceback" not in miss.stderr
    finally:
        for root in roots:
            shutil.rmtree(root)
