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
