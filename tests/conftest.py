"""Helpers shared by every test layer.

:func:`wait_until` is how tests wait: for a condition, with a deadline, never for
a fixed time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.005


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, message: str | None = None
) -> T:
    """Poll *predicate* until it returns something truthy; return that value.

    Fails the test (AssertionError, naming *message* or the predicate) when
    *timeout* seconds pass first.  The predicate is always evaluated once
    more after the deadline, so a slow machine that gets there just in time
    still passes.
    """
    deadline = time.monotonic() + timeout
    interval = POLL_INTERVAL
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            value = predicate()
            if value:
                return value
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout:.1f}s: {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.1)
