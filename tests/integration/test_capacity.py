"""The memory cap on a real mount: ENOSPC beyond it, nothing lost, space reusable."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter

MiB = 1 << 20
CAP = 8 * MiB


def fill(path: Path, limit: int, chunk: int = 256 * 1024) -> tuple[int, int]:
    """Write random bytes to *path* until an error or *limit*; (bytes written, errno or 0)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    written = 0
    try:
        block = os.urandom(chunk)
        while written < limit:
            try:
                n = os.write(fd, block)
            except OSError as e:
                return written, e.errno or -1
            written += n
    finally:
        os.close(fd)
    return written, 0


def small(mounter: Mounter) -> Mount:
    return mounter.mount("8M")


def test_cap_is_the_size(mounter: Mounter) -> None:
    m = small(mounter)
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == CAP
    assert st.f_bfree == st.f_blocks


def test_write_beyond_cap_fails_with_enospc_and_keeps_data(mounter: Mounter) -> None:
    m = small(mounter)
    keep = os.urandom(3 * MiB + 123)
    (m.path / "keep").write_bytes(keep)
    written, err = fill(m.path / "big", 2 * CAP)
    assert err == errno.ENOSPC
    assert written <= CAP - len(keep)
    assert written > 0
    assert (m.path / "big").stat().st_size == written
    # Everything stored before the failure is intact.
    assert (m.path / "keep").read_bytes() == keep
    assert m.used_bytes() <= m.size_bytes()
    # df agrees: used never exceeds size.
    out = subprocess.run(
        ["df", "-B1", "--output=size,used,avail", str(m.path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()[1]
    size, used, avail = map(int, out.split())
    assert size == CAP
    assert used <= size
    assert used + avail == size


def test_dd_beyond_cap_fails(mounter: Mounter) -> None:
    m = small(mounter)
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={m.path / 'zeros'}", "bs=1M", "count=16", "status=none"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert (m.path / "zeros").stat().st_size <= CAP
    assert m.used_bytes() <= CAP


def test_space_is_usable_again_after_delete(mounter: Mounter) -> None:
    m = small(mounter)
    first, err = fill(m.path / "first", 2 * CAP)
    assert err == errno.ENOSPC
    assert first >= CAP - MiB  # nearly all of the cap was usable
    assert fill(m.path / "second", MiB)[1] == errno.ENOSPC
    os.unlink(m.path / "first")
    wait_until(lambda: m.used_bytes() <= MiB, 10, "space freed by unlink")
    os.unlink(m.path / "second")
    wait_until(lambda: m.used_bytes() == 0, 10, "all space freed")
    data = os.urandom(CAP - MiB)
    (m.path / "again").write_bytes(data)
    assert (m.path / "again").read_bytes() == data
    # Truncating frees space too.
    os.truncate(m.path / "again", MiB)
    assert m.used_bytes() == MiB
    assert fill(m.path / "more", CAP - 2 * MiB)[1] == 0


def test_enospc_on_many_small_files(mounter: Mounter) -> None:
    cap = 2 * MiB
    m = mounter.mount("2M")
    created = []
    failure = 0
    for i in range(cap // 4096 + 10):
        path = m.path / f"f{i}"
        try:
            with open(path, "wb") as f:
                f.write(b"s" * 100)
        except OSError as e:
            failure = e.errno or -1
            break
        created.append(path)
    assert failure == errno.ENOSPC
    assert cap // 4096 - 2 <= len(created) <= cap // 4096
    assert all(p.read_bytes() == b"s" * 100 for p in created[:: max(len(created) // 50, 1)])
    assert m.used_bytes() <= cap
