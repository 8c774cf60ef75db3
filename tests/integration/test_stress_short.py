"""Short runs of ``tools/stress.py`` on a fresh mount: the plain mix (8 processes for 10 s) and
the hostile mix (the same workers for 20 s, next to 200 waiters, 4 readers and a victim purged
over and over).

The full runs (``--seconds 600``) are for the lead to start by hand; these only show that the
tool works and that a short burst of concurrent writes, marks, purges and mmap finds nothing:
zero corruptions and zero unexpected errors, and, under the hostile mix, a mount root that
always answers. The cap is small (16 MiB) so that the memory cap, not only explicit purges,
purges volatile pages within the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.conftest import Mount, Mounter, abort_connection

STRESS = Path(__file__).resolve().parents[2] / "tools" / "stress.py"
SEED = 20240611


@pytest.mark.slow
def test_stress_short(mounter: Mounter, tmp_path: Path) -> None:
    mount = mounter.mount("16M")
    summary = tmp_path / "stress.json"
    cmd = [sys.executable, str(STRESS), str(mount.path), "--procs", "8", "--seconds", "10"]
    result = subprocess.run(
        [*cmd, "--seed", str(SEED), "--json", str(summary)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    output = result.stdout[-8000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    report = json.loads(summary.read_text())
    assert report["corruptions"] == 0, output
    assert report["unexpected"] == 0, output
    assert report["ok"], output
    memory = report["daemon_memory"]
    assert memory["rss_peak"] <= memory["rss_limit"], output  # the cap + metadata cap + 64 MiB
    assert memory["fds_end"] == memory["fds_start"], output
    ops = report["ops"]
    assert sum(ops.values()) >= 200, output
    assert ops.get("write", 0) and ops.get("nonvolatile", 0) and ops.get("foreign_read", 0)
    notes = report["notes"]
    # The model did settle volatile pages both ways: some were purged, some survived.
    assert notes.get("volatile pages found purged", 0) > 0, output
    assert notes.get("volatile pages found intact", 0) > 0, output
    assert report["stats"]["purge_events_cap"] > 0, output


def _answers(path: Path, timeout: float) -> bool:
    """Whether the mount at *path* answers a statvfs within *timeout* seconds."""
    done = threading.Event()

    def probe() -> None:
        with contextlib.suppress(OSError):
            os.statvfs(path)
        done.set()

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout)


def _abort_if_hung(mount: Mount) -> bool:
    """Abort the FUSE connection of a mount that stopped answering (so that the teardown can
    unmount it); True if it had to."""
    if _answers(mount.path, 10.0):
        return False
    abort_connection(mount.path)
    return True


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stress_hostile_short(mounter: Mounter, tmp_path: Path) -> None:
    """20 s of ``--mix hostile``: 200 processes (half as uid 65534 when run as root) loop
    ``getxattr user.vrange.purged``, 4 re-read with ``posix_fadvise(DONTNEED)`` between
    passes, a victim is purged over and over (purge-all, the cap), next to the 8 workers. The
    root must answer every probe within 15 s, and every model must hold."""
    mount = mounter.mount("16M", options=["allow_other"])
    summary = tmp_path / "hostile.json"
    cmd = [sys.executable, str(STRESS), str(mount.path), "--mix", "hostile", "--seconds", "20"]
    cmd += ["--waiters", "200", "--readers", "4", "--seed", str(SEED), "--json", str(summary)]
    result = None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=80, check=False)
    finally:
        # The tool aborts a mount that stops answering; if it was killed first, we do.
        hung = _abort_if_hung(mount)
        if hung or (result is not None and "ABORTED:" in result.stdout):
            mount.check_log = False  # the test fails on its own account; the log is moot
    output = result.stdout[-8000:] + result.stderr[-4000:]
    assert not hung, "the mount stopped answering after the run (aborted)\n" + output
    assert result.returncode == 0, output
    report = json.loads(summary.read_text())
    assert report["ok"] and not report["aborted"], output
    assert report["corruptions"] == 0, output
    assert report["unexpected"] == 0, output
    probe = report["watchdog"]
    assert probe["failure"] is None, output
    assert probe["probes"] >= 50 and probe["max_ms"] < 15_000, output
    ops, notes = report["ops"], report["notes"]
    assert ops.get("wait_purged", 0) >= 1000, output
    assert ops.get("reread", 0) > 0 and notes.get("reread passes (then fadvise DONTNEED)", 0) > 0
    assert notes.get("victim cycles, purged by purge-all", 0) > 0, output  # the first one is
    assert ops.get("write", 0) and ops.get("nonvolatile", 0), output
    if os.geteuid() == 0:  # and the mount allows others: every second one is the other user
        assert report["hostile"]["second_user_processes"] == 102, output
    print(
        f"hostile mix: {ops['wait_purged']} waits, {ops['reread']} rereads, "
        f"{ops['victim_cycle']} victim cycles; stats probe over {probe['probes']} probes: "
        f"median {probe['median_ms']:.1f} ms, p99 {probe['p99_ms']:.1f} ms, "
        f"max {probe['max_ms']:.1f} ms"
    )
