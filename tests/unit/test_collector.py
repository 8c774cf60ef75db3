"""The garbage-collector policy keeps each run to what was made since the last full one.

Run in a child interpreter: the policy changes the process's collector for good.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import gc, json, time
from vrangefs.collector import Collector
from vrangefs.vrange import PurgeOrder, VrangeRoot

collector = Collector()
collector.install()
root = VrangeRoot(1, PurgeOrder())
for i in range(300_000):  # long-lived objects, as a mount with many units holds
    root.mark_volatile(2 * i, 2 * i + 1)
stats = collector.statistics()
collector.uninstall()
gc.unfreeze()
start = time.perf_counter_ns()
gc.collect()  # what one full run over all of it costs
stats["whole_heap_us"] = (time.perf_counter_ns() - start) // 1000
print(json.dumps(stats))
"""


def test_no_collection_examines_the_whole_heap() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=True
    )
    stats = json.loads(result.stdout)
    assert stats["gc_full_collections"] >= 10, stats
    # Each run examined a slice of the heap: far shorter than one run over all of it.
    assert stats["gc_longest_run_us"] * 4 < stats["whole_heap_us"], stats


WORKLOAD = """
import gc
from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import PurgeCause
from vrangefs.volume import Caller, Volume

P = PAGE_SIZE
ROOT = Caller(0, 0)
vol = Volume(PageStore(64 << 20), metadata_cap=1 << 30)
vol.store.on_returning = lambda: None  # freed memory waits for the reaper, as in the daemon
cache = vol.mkdir(ROOT_INO, b"c", 0o755, ROOT).ino
vol.set_cache_dir(cache, True)


def work(i):
    # A cache-directory file with units and a pin that came and went: evicted later.
    f = vol.create(cache, b"cf%d" % i, 0o644, ROOT).ino
    vol.write(f, 0, b"x" * (64 * P))
    for p in range(0, 64, 2):
        vol.mark_volatile(f, p * P, P)
    vol.pin(f, 0, P, 100 + i % 3, 0)
    vol.unpin(f, 0, P, 100 + i % 3)
    vol.release(f)
    # A file with units, a pin, purges, a split, an xattr and a truncate: then removed.
    g = vol.create(ROOT_INO, b"g%d" % i, 0o644, ROOT).ino
    vol.write(g, 0, b"y" * (64 * P))
    for p in range(64):
        vol.mark_volatile(g, p * P, P)
    vol.pin(g, 8 * P, P, 200, 0)
    vol.reclaim.for_pressure(8)
    vol.mark_nonvolatile(g, 0, 16 * P)
    vol.setxattr(g, b"user.a", b"v")
    vol.truncate(vol.inode(g), 40 * P)
    vol.release(g)
    vol.release_owner(200)
    vol.unlink(ROOT_INO, b"g%d" % i)
    vol.forget(g, 1)
    if i % 5 == 0:
        while vol.reclaim.evict_file(PurgeCause.CAP):
            pass
        for ghost in list(vol.ghosts):
            vol.ghost_unlink(*ghost)
    for _ in vol.reaping():
        pass


for i in range(20):
    work(i)
gc.collect()
gc.freeze()
gc.disable()  # from here on only reference counting frees anything
for i in range(20, 220):
    work(i)
vol.reclaim.order.oldest()
for _ in vol.reaping():
    pass
vol.check_invariants()
gc.unfreeze()
print(gc.collect())
"""


def test_the_volume_leaves_no_cyclic_garbage() -> None:
    """The policy freezes what survives a full collection, so a reference cycle among the
    daemon's objects would never be freed: files with units, pins, purges, splits,
    truncates, evictions and removals must all be freed by reference counting alone (a
    removed file's units and their purge-order entries were a cycle: 24,052 objects here)."""
    result = subprocess.run(
        [sys.executable, "-c", WORKLOAD], capture_output=True, text=True, timeout=300, check=True
    )
    assert int(result.stdout) == 0, result.stdout
