"""A short run of ``tools/difftest.py``: 5,000 operations, fixed seed, vrangefs against tmpfs.

The mount has a large cap and no pressure purging, so marking ranges volatile or
non-volatile (which the run mixes in) must never change a byte. The full run is
``python tools/difftest.py --mount-fresh --ops 100000``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Mounter

DIFFTEST = Path(__file__).resolve().parents[2] / "tools" / "difftest.py"
SEED = 424242


@pytest.mark.slow
def test_difftest_short(mounter: Mounter) -> None:
    mount = mounter.mount("256M", args=["--pressure-purge", "off"])
    cmd = [sys.executable, str(DIFFTEST), str(mount.path), "--ops", "5000"]
    result = subprocess.run(
        [*cmd, "--seed", str(SEED), "--max-size", "1536K"],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    output = result.stdout[-8000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    assert "5000 operations in" in result.stdout and "no difference" in result.stdout, output
