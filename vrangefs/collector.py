"""Short pauses of Python's garbage collector, however much metadata the daemon holds.

CPython's cyclic collector examines every tracked object of a generation at once. The
oldest generation holds everything long-lived (inodes, volatile units, pins: several
objects each), and by default it is collected whenever it has grown by a quarter: with
400,000 units that stopped the event loop, and every request, for 0.3-0.8 s at a time.

So the daemon keeps the oldest generation young: a full collection runs every
FULL_EVERY collections of the middle generation (at most about 15,000 objects reach
the oldest one in between, about 7 ms to examine), and right after it everything that
survived is *frozen* (:func:`gc.freeze`): moved to the permanent generation, which is
never examined again. Frozen objects are still freed by reference counting, as almost
everything is; what a freeze costs is that a frozen object that later becomes part of
a reference cycle is never freed. The daemon's own structures break their cycles
themselves (a queued volatile unit and its purge-order entry point at each other until
the unit leaves the order or is let go of, see :func:`vrangefs.vrange.let_go`), so what
is left is the in-flight state of a request at the moment of a freeze (bounded, and
measured by bench/bench_leaks.py and tests/integration/test_leaks.py).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

FULL_EVERY = 2  # middle-generation collections between two full ones


class Collector:
    """Installs the policy above and times every collection (for the statistics)."""

    def __init__(self) -> None:
        self.full_collections = 0
        self.longest_run_ns = 0
        self._started = 0
        self._installed = False
        self._thresholds = gc.get_threshold()

    def install(self) -> None:
        """Collect and freeze what exists now (imports, the empty mount), then keep the
        oldest generation young."""
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self._thresholds[0], self._thresholds[1], FULL_EVERY)
        gc.callbacks.append(self._on_collection)
        self._installed = True

    def uninstall(self) -> None:
        """Back to the default policy (what is frozen stays frozen)."""
        if self._installed:
            gc.callbacks.remove(self._on_collection)
            gc.set_threshold(*self._thresholds)
            self._installed = False

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time_ns()
            return
        pause = time.thread_time_ns() - self._started  # CPU time: a preempted run is not longer
        self.longest_run_ns = max(self.longest_run_ns, pause)
        if info["generation"] == 2:
            self.full_collections += 1
            gc.freeze()  # the survivors are examined no more

    def statistics(self) -> dict[str, int]:
        """(Not how many objects are frozen: counting them walks them all.)"""
        return {
            "gc_full_collections": self.full_collections,
            "gc_longest_run_us": self.longest_run_ns // 1000,
        }


collector = Collector()
"""The daemon's one collector policy (installed by :mod:`vrangefs.mount`)."""
