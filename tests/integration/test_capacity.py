"""The memory cap on a real mount: ENOSPC beyond it, nothing lost, space reusable."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One 8 MiB mount for the module."""
    m = Mounter(tmp_path_factory.mktemp("capacity"))
    try:
        yield m.mount("8M")
    finally:
        m.close()


@pytest.fixture
def small(capped: Mount) -> Iterator[Mount]:
    """The 8 MiB mount, empty at the start of the test and emptied after it."""
    assert capped.used_bytes() == 0
    assert os.listdir(capped.path) == []
    yield capped
    for name in os.listdir(capped.path):
        os.unlink(capped.path / name)
    wait_until(lambda: capped.used_bytes() == 0, 10, "capped mount empty again")


def test_cap_is_the_size(small: Mount) -> None:
    st = os.statvfs(small.path)
    assert st.f_blocks * st.f_frsize == CAP
    assert st.f_bfree == st.f_blocks


def test_write_beyond_cap_fails_with_enospc_and_keeps_data(small: Mount) -> None:
    keep = os.urandom(3 * MiB + 123)
    (small.path / "keep").write_bytes(keep)
    written, err = fill(small.path / "big", 2 * CAP)
    assert err == errno.ENOSPC
    assert written <= CAP - len(keep)
    assert written > 0
    assert (small.path / "big").stat().st_size == written
    # Everything stored before the failure is intact.
    assert (small.path / "keep").read_bytes() == keep
    assert small.used_bytes() <= small.size_bytes()
    # df agrees: used never exceeds size.
    out = subprocess.run(
        ["df", "-B1", "--output=size,used,avail", str(small.path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()[1]
    size, used, avail = map(int, out.split())
    assert size == CAP
    assert used <= size
    assert used + avail == size


def test_dd_beyond_cap_fails(small: Mount) -> None:
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={small.path / 'zeros'}", "bs=1M", "count=16", "status=none"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert (small.path / "zeros").stat().st_size <= CAP
    assert small.used_bytes() <= CAP


def test_space_is_usable_again_after_delete(small: Mount) -> None:
    first, err = fill(small.path / "first", 2 * CAP)
    assert err == errno.ENOSPC
    assert first >= CAP - MiB  # nearly all of the cap was usable
    assert fill(small.path / "second", MiB)[1] == errno.ENOSPC
    os.unlink(small.path / "first")
    wait_until(lambda: small.used_bytes() <= MiB, 10, "space freed by unlink")
    os.unlink(small.path / "second")
    wait_until(lambda: small.used_bytes() == 0, 10, "all space freed")
    data = os.urandom(CAP - MiB)
    (small.path / "again").write_bytes(data)
    assert (small.path / "again").read_bytes() == data
    # Truncating frees space too.
    os.truncate(small.path / "again", MiB)
    assert small.used_bytes() == MiB
    assert fill(small.path / "more", CAP - 2 * MiB)[1] == 0


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
