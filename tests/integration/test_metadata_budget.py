"""The metadata budget on a real mount: a second user who tries to grow the daemon with
xattrs, volatile units, empty files and long names gets ENOSPC, nothing stored is lost,
the daemon keeps serving, and its memory stays within cap + metadata cap + 64 MiB.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Mounter, errno_of, run_cli
from tests.integration.vrange_helpers import as_nobody, stats

MIB = 1 << 20
CAP = 32 * MIB
METADATA_CAP = 4 * MIB


def fill(make: Callable[[int], None], limit: int = 200_000) -> dict[str, int]:
    """Call make(i) until it fails; the count made and the errno that stopped it."""
    for i in range(limit):
        try:
            make(i)
        except OSError as e:
            return {"made": i, "errno": e.errno or 0}
    return {"made": limit, "errno": 0}


@pytest.mark.timeout(240)
def test_a_second_user_cannot_grow_the_daemon_past_the_budget(mounter: Mounter) -> None:
    mount = mounter.mount(
        "32M", options=["allow_other"], args=["--metadata-cap", str(METADATA_CAP)]
    )
    path = mount.path
    os.chmod(path, 0o1777)
    kept = os.urandom(8 * MIB)
    (path / "kept.bin").write_bytes(kept)
    play = path / "play"
    play.mkdir()
    os.chown(play, 65534, 65534)
    big = play / "big"

    def attack() -> dict[str, dict[str, int]]:
        big.write_bytes(b"u" * (4 * MIB))
        os.truncate(big, 256 * MIB)  # sparse beyond: units over holes cost metadata too
        out = {}
        out["xattrs"] = fill(lambda i: os.setxattr(big, f"user.a{i}", b"v" * 60_000), limit=10_000)
        for name in os.listxattr(big):
            os.removexattr(big, name)
        out["units"] = fill(
            lambda i: os.setxattr(big, "user.vrange.volatile", f"{2 * i * 4096},4096".encode()),
            limit=32768,  # every other page: more units than the budget holds (~15,500)
        )
        os.setxattr(big, "user.vrange.nonvolatile", b"0,0")  # unmarking never fails
        out["files"] = fill(lambda i: (play / (f"{i:06}" + "n" * 249)).touch())
        return out

    result = as_nobody(attack)
    assert isinstance(result, dict)
    for kind, got in result.items():
        assert got["errno"] == errno.ENOSPC, (kind, got)
        assert got["made"] > 0, (kind, got)
    s = stats(path)
    assert s["metadata_cap"] == METADATA_CAP
    assert s["metadata_bytes"] <= METADATA_CAP
    assert s["daemon_rss_bytes"] <= CAP + METADATA_CAP + 64 * MIB, s["daemon_rss_bytes"]
    # Nothing stored was lost, the daemon serves, and freeing makes room again.
    assert (path / "kept.bin").read_bytes() == kept
    assert errno_of((path / "root-file").touch) == errno.ENOSPC
    for entry in list(play.iterdir())[:10]:
        entry.unlink()
    (path / "root-file").touch()
    assert stats(path)["metadata_bytes"] <= METADATA_CAP


def test_the_budget_option_is_checked(mounter: Mounter, tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    for bad in ("0", "512K", "lots", "-1M", "0%"):
        result = run_cli(["mount", str(target), f"--metadata-cap={bad}"])
        assert result.returncode != 0
        assert "--metadata-cap" in result.stderr and bad in result.stderr, result.stderr
    mount = mounter.mount("64M", options=["metadata_cap=50%"])
    assert stats(mount.path)["metadata_cap"] == 32 * MIB
    mount = mounter.mount("64M")
    assert stats(mount.path)["metadata_cap"] == 64 * MIB  # auto: the larger of 64M and 10%
