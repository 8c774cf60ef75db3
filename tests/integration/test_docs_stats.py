"""docs/stats.md names every statistic a real mount prints in ``user.vrange.stats``."""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.conftest import Mount
from vrangefs import protocol

STATS_DOC = Path(__file__).resolve().parents[2] / "docs" / "stats.md"


def test_every_statistic_is_documented(fresh: Mount) -> None:
    keys = list(protocol.parse_stats(os.getxattr(fresh.path, protocol.STATS)))
    assert {"pid", "memory_cap", "resident_bytes", "purge_events"} <= set(keys), keys
    text = STATS_DOC.read_text()
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, f"statistics not described in docs/stats.md: {', '.join(missing)}"
