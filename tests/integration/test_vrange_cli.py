"""The range commands of ``vrangefs`` run as subprocesses: exit codes, output, bad input.

``volatile``, ``nonvolatile [--check]``, ``status``, ``stats [--json]`` and ``purge`` on a
real mount.  What a command reports is checked against the xattrs themselves.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Mount, run_cli
from tests.integration.vrange_helpers import (
    PAGE,
    STATS_KEYS,
    Ranges,
    mark,
    module_mount,
    new_dir,
    pattern,
    purged,
    stats,
    volatile,
)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from module_mount(tmp_path_factory)


def ok(*args: str | Path) -> str:
    """Run a command that must succeed quietly; return its stdout."""
    result = run_cli([str(a) for a in args])
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert result.stderr == "", (args, result.stderr)
    return result.stdout


def fails(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a command that must fail with a one-line message and no traceback."""
    result = run_cli([str(a) for a in args])
    assert result.returncode != 0, (args, result.stdout)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip(), f"{args}: no message"
    return result


def status_rows(text: str) -> tuple[Ranges, Ranges]:
    """The (volatile, purged) rows of ``vrangefs status`` output."""
    rows: dict[str, Ranges] = {"volatile": [], "purged": []}
    for line in text.splitlines():
        match = re.fullmatch(r"\s+(volatile|purged)\s+(\d+)\s+(\d+)\s+.*", line)
        if match:
            rows[match[1]].append((int(match[2]), int(match[3])))
    return rows["volatile"], rows["purged"]


def test_volatile_nonvolatile_check_and_status(mnt: Mount) -> None:
    f = new_dir(mnt) / "f"
    f.write_bytes(pattern(4))
    assert ok("volatile", f) == ""
    assert volatile(f) == [(0, 4 * PAGE)]
    out = ok("status", f)
    assert out.startswith(f"{f}: size {4 * PAGE} ")
    assert "1 volatile unit(s), 0 purged range(s)" in out
    assert status_rows(out) == ([(0, 4 * PAGE)], [])

    checked = run_cli(["nonvolatile", "--check", str(f)])
    assert (checked.returncode, checked.stderr) == (0, "")
    assert checked.stdout == f"{f}: nothing purged\n"
    assert volatile(f) == []

    ok("volatile", f, "4K", "8K")  # suffixes, and one unit of pages 1-2
    ok("volatile", f, "12288", "0")
    assert volatile(f) == [(PAGE, 2 * PAGE), (3 * PAGE, PAGE)]
    purge = ok("purge", mnt.path)
    assert re.search(r"purged 2 unit\(s\)", purge), purge
    assert purged(f) == [(PAGE, 3 * PAGE)]
    out = ok("status", f)
    assert "2 volatile unit(s), 1 purged range(s)" in out
    assert status_rows(out) == ([(PAGE, 2 * PAGE), (3 * PAGE, PAGE)], [(PAGE, 3 * PAGE)])

    # --check: 1 when anything in the range was purged, printing what (within the range).
    checked = run_cli(["nonvolatile", "--check", str(f), "8K", "1"])
    assert checked.returncode == 1, checked
    assert checked.stdout.splitlines()[0].startswith(f"{f}: purged {2 * PAGE},{PAGE} ")
    assert volatile(f) == [(PAGE, PAGE), (3 * PAGE, PAGE)]
    checked = run_cli(["nonvolatile", "--check", str(f), "0", "4096"])
    assert (checked.returncode, checked.stdout) == (0, f"{f}: nothing purged\n")
    # Without --check the same report exits 0.
    out = ok("nonvolatile", f)
    assert out.startswith(f"{f}: purged {PAGE},{3 * PAGE} ")
    assert volatile(f) == []
    # Rewritten pages are data again: nothing purged any more.
    with f.open("r+b") as rewrite:
        rewrite.write(pattern(4))
    assert ok("nonvolatile", "--check", f) == f"{f}: nothing purged\n"


def test_status_of_several_files_and_of_a_missing_one(mnt: Mount) -> None:
    where = new_dir(mnt)
    a, b = where / "a", where / "b"
    a.write_bytes(pattern(2))
    b.write_bytes(pattern(3))
    mark(b, "0,4K")
    mark(b, "8K,4K")
    out = ok("status", a, b)
    assert f"{a}: size {2 * PAGE} " in out and "0 volatile unit(s)" in out
    assert f"{b}: size {3 * PAGE} " in out and "2 volatile unit(s)" in out
    assert status_rows(out) == ([(0, PAGE), (2 * PAGE, PAGE)], [])
    missing = where / "missing"
    result = run_cli(["status", str(a), str(missing)])
    assert result.returncode == 1
    assert f"{a}: size" in result.stdout
    assert str(missing) in result.stderr


def test_stats_plain_and_json(mnt: Mount) -> None:
    f = new_dir(mnt) / "f"
    f.write_bytes(pattern(2))
    mark(f, "0,0")
    data = json.loads(ok("stats", mnt.path, "--json"))
    assert isinstance(data, dict)
    for key in STATS_KEYS:
        assert isinstance(data[key], int), key
    assert data["pid"] == mnt.pid
    assert data["memory_cap"] == 64 * 1024 * 1024
    live = stats(mnt.path)
    assert {k: data[k] for k in STATS_KEYS} == {k: live[k] for k in STATS_KEYS}
    assert data["volatile_bytes"] >= 2 * PAGE
    plain = ok("stats", mnt.path)
    for key in STATS_KEYS:
        assert re.search(rf"^{key}\s+{data[key]}\b", plain, re.MULTILINE), (key, plain)


def test_purge_reports_units_and_bytes(mnt: Mount) -> None:
    ok("purge", mnt.path)  # start from nothing volatile
    f = new_dir(mnt) / "f"
    f.write_bytes(pattern(8))
    mark(f, "0,16K")
    mark(f, "16K,16K")
    before = stats(mnt.path)
    out = ok("purge", mnt.path)
    assert out.startswith(f"{mnt.path}: purged 2 unit(s), 32"), out
    after = stats(mnt.path)
    assert after["purge_events"] - before["purge_events"] == 2
    assert after["purged_bytes_total"] - before["purged_bytes_total"] == 8 * PAGE
    assert purged(f) == [(0, 8 * PAGE)]
    assert ok("purge", mnt.path).startswith(f"{mnt.path}: purged 0 unit(s), 0")


@pytest.mark.parametrize(
    ("offset", "length", "shown"),
    [
        ("abc", "0", "abc"),
        ("0", "-5", "-5"),
        ("4KB", "0", "4KB"),
        ("9223372036854775808", "0", "9223372036854775808"),
        ("0", "1,2", "1,2"),
    ],
)
@pytest.mark.parametrize("command", ["volatile", "nonvolatile"])
def test_bad_ranges_name_the_file_and_the_value(
    mnt: Mount, command: str, offset: str, length: str, shown: str
) -> None:
    f = new_dir(mnt) / "f"
    f.write_bytes(pattern(2))
    mark(f, "0,4K")
    result = fails(command, f, offset, length)
    assert str(f) in result.stderr
    assert shown in result.stderr
    assert volatile(f) == [(0, PAGE)]


def test_missing_files_other_filesystems_and_directories_are_refused(
    mnt: Mount, tmp_path: Path
) -> None:
    where = new_dir(mnt)
    missing = where / "missing"
    for command in ("volatile", "nonvolatile", "status"):
        assert str(missing) in fails(command, missing).stderr
    elsewhere = tmp_path / "not-on-vrangefs"
    elsewhere.write_bytes(b"x" * PAGE)
    for command in ("volatile", "nonvolatile", "status"):
        message = fails(command, elsewhere).stderr
        assert str(elsewhere) in message and "vrangefs" in message, message
    assert elsewhere.read_bytes() == b"x" * PAGE
    for command in ("stats", "purge"):
        assert str(tmp_path) in fails(command, tmp_path).stderr
        assert str(where) in fails(command, where).stderr  # not the mount root
    for command in ("volatile", "nonvolatile"):
        assert str(where) in fails(command, where).stderr  # a directory
    usage = run_cli(["volatile"])
    assert usage.returncode == 2 and "usage:" in usage.stderr
