"""Bad ``vrangefs mount`` input dies at once with one line, before anything is mounted.

One real ``vrangefs mount`` (and ``mount.vrangefs``) per class of bad value: a cap below
one page, a cap no mapping can hold, a uid out of range, a bad pressure interval, a bad
``--min-free``, watermarks out of order.  The rules themselves are tested in-process in
tests/unit/test_config.py.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import VRANGEFS, Mounter, is_mounted, run_cli, serving_pids
from tests.integration.test_mount_cli import assert_one_line_error, mem_total

FAST = 10.0  # seconds: the checks run before any daemon is started
HELPER = Path(VRANGEFS[0]).with_name("mount.vrangefs")

BAD_INPUT = [
    (["--memory-cap", "1"], "--memory-cap '1'", "at least 4096 bytes"),
    (["--memory-cap", "4095"], "--memory-cap '4095'", "less than one page"),
    (["--memory-cap", "9223372036854775807"], "--memory-cap '9223372036854775807'", "at most"),
    (["-o", "uid=99999999999"], "-o uid='99999999999'", "from 0 to 4294967294"),
    (["--pressure-interval", "-1"], "--pressure-interval '-1'", "seconds from 0.01 to 3600"),
    (["--pressure-interval", "nan"], "--pressure-interval 'nan'", "seconds from 0.01 to 3600"),
    (["--min-free", "garbage"], "--min-free 'garbage'", "expected a positive number"),
    (
        ["--low-watermark", "99%", "--high-watermark", "50%"],
        "--low-watermark '99%'",
        "expected low <= high",
    ),
]


def _refused_fast(cmd: list[str], path: Path, *words: str) -> None:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    took = time.monotonic() - start
    assert_one_line_error(result, *words)
    assert result.returncode == 1
    assert took < FAST, f"took {took:.1f}s"
    assert not is_mounted(path)
    assert serving_pids(path) == []


@pytest.mark.parametrize(("args", "named", "expected"), BAD_INPUT)
def test_bad_mount_input_is_one_line_at_once(
    mounter: Mounter, args: list[str], named: str, expected: str
) -> None:
    path = mounter.mountpoint()
    _refused_fast([*VRANGEFS, "mount", str(path), *args], path, named, expected)


@pytest.mark.parametrize(
    ("opts", "named", "expected"),
    [
        ("size=4095", "-o size='4095'", "less than one page"),
        ("size=9223372036854775807", "-o size='9223372036854775807'", "at most"),
        ("rw,uid=99999999999", "-o uid='99999999999'", "from 0 to 4294967294"),
        ("low_watermark=99%,high_watermark=50%", "-o low_watermark='99%'", "low <= high"),
    ],
)
def test_mount_helper_refuses_the_same(
    mounter: Mounter, opts: str, named: str, expected: str
) -> None:
    if not HELPER.exists():
        pytest.fail(f"{HELPER} is missing (pip install -e .)")
    path = mounter.mountpoint()
    _refused_fast([str(HELPER), "vrangefs", str(path), "-o", opts], path, named, expected)


def test_cap_above_ram_mounts_with_one_warning(mounter: Mounter) -> None:
    path = mounter.mountpoint()
    log = mounter.log_path()
    cap = 2 * mem_total() // (1 << 30) + 2
    result = run_cli(["mount", str(path), "--memory-cap", f"{cap}G", "--log-file", str(log)])
    mount = mounter.adopt(path, result.stderr, log)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"vrangefs: warning: the memory cap {cap}.0 GiB is above ")
    assert "can run the machine out of memory" in lines[0]
    assert lines[1] == f"vrangefs: mounted {path} (daemon pid {mount.pid})"
    assert is_mounted(path)
