"""examples/shell_example.sh against a fresh mount: it runs to the end and shows each step."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import Mount

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "shell_example.sh"


def test_shell_example_runs_every_step(fresh: Mount) -> None:
    result = subprocess.run(
        ["sh", str(SCRIPT), str(fresh.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    for line in (
        "$ setfattr -n user.vrange.volatile -v 0,0 ",
        'user.vrange.volatile="0,1048576\\012"',
        f"$ setfattr -n user.vrange.purge -v all {fresh.path}",
        'user.vrange.purged="0,1048576\\012"',
        "Input/output error",
        "$ setfattr -n user.vrange.nonvolatile -v 0,0 ",
        'user.vrange.purged=""',
        "OK: every step behaved as documented",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert list(fresh.path.iterdir()) == []  # it cleans up after itself


def test_shell_example_fails_off_vrangefs(tmp_path: Path) -> None:
    """On a plain directory the purge step cannot work: the script must say so, not pass."""
    result = subprocess.run(
        ["sh", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "FAILED" in result.stderr
