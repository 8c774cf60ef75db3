"""Pins on real mounts: counted, owned by processes, with the kernel's and the daemon's
permission checks, and the per-user limit.

The names and formats are spelled out from the contract (``user.vrange.pin``, ``unpin``,
``pins`` with ``OFFSET,LENGTH PID COUNT`` lines), not imported from the package.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Mount, Mounter, errno_of
from tests.integration.vrange_helpers import (
    PAGE,
    as_nobody,
    errno_or_value,
    make_file,
    mark,
    module_mount,
    new_dir,
    pattern,
    purge_all,
    purged,
    stats,
)

PIN = "user.vrange.pin"
UNPIN = "user.vrange.unpin"
PINS = "user.vrange.pins"
SYSTEM_PIN = "system.vrange.pin"
SYSTEM_UNPIN = "system.vrange.unpin"
NOBODY = 65534


def pin(target: str | Path | int, value: str = "0,0", name: str = PIN) -> None:
    os.setxattr(target if isinstance(target, int) else os.fspath(target), name, value.encode())


def unpin(target: str | Path | int, value: str = "0,0", name: str = UNPIN) -> None:
    os.setxattr(target if isinstance(target, int) else os.fspath(target), name, value.encode())


def pins(target: str | Path) -> list[tuple[int, int, int, int]]:
    """``OFFSET,LENGTH PID COUNT`` lines as tuples; checks the format and the order."""
    text = os.getxattr(os.fspath(target), PINS).decode()
    assert text == "" or text.endswith("\n"), text
    out = []
    for line in text.splitlines():
        rng, pid, count = line.split(" ")
        offset, length = rng.split(",")
        out.append((int(offset), int(length), int(pid), int(count)))
    assert out == sorted(out), text
    return out


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from module_mount(tmp_path_factory, "64M", options=["allow_other"])


@pytest.fixture
def area(mount: Mount) -> Iterator[Path]:
    d = new_dir(mount)
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def volatile_file(path: Path, pages: int, mode: int = 0o644) -> Path:
    make_file(path, pattern(pages, seed=pages))
    path.chmod(mode)
    mark(path, "0,0")
    return path


def test_counted_pins_hold_a_unit_through_purge_all(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 4)
    pin(f, "4096,1")  # one page inside the unit holds all of it
    pin(f, "4K,1")
    assert pins(f) == [(PAGE, PAGE, os.getpid(), 2)]
    purge_all(mount.path)
    assert purged(f) == []
    assert f.read_bytes() == pattern(4, seed=4)
    unpin(f, "4096,4096")
    purge_all(mount.path)
    assert purged(f) == []  # one pin left
    unpin(f, "4096,1")
    assert pins(f) == []
    purge_all(mount.path)
    assert purged(f) == [(0, 4 * PAGE)]


def test_unpin_of_what_is_not_held_fails_and_changes_nothing(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    assert errno_of(unpin, f) == errno.ENOENT
    pin(f, "0,4096")
    for value in ("0,8192", "4096,4096", "0,0"):
        assert errno_of(unpin, f, value) == errno.ENOENT
    assert pins(f) == [(0, PAGE, os.getpid(), 1)]
    unpin(f, "0,4096")


def test_pin_then_purged_is_race_free_and_final(mount: Mount, area: Path) -> None:
    f = volatile_file(area / "f", 2)
    g = volatile_file(area / "g", 2)
    purge_all(mount.path)
    pin(f)
    assert purged(f) == [(0, 2 * PAGE)]  # the loss before the pin is seen
    assert errno_of(f.read_bytes) == errno.EIO
    f.write_bytes(pattern(2, seed=9))  # rewritten under the pin
    mark(f, "0,0")
    mark(g, "0,0")
    g.write_bytes(pattern(2, seed=3))
    purge_all(mount.path)
    assert purged(f) == [] and f.read_bytes() == pattern(2, seed=9)
    unpin(f)


@pytest.mark.parametrize("name", [PIN, UNPIN, SYSTEM_PIN, SYSTEM_UNPIN])
def test_pin_names_keep_the_range_names_rules(mount: Mount, area: Path, name: str) -> None:
    assert errno_of(os.setxattr, mount.path, name, b"0,0") == errno.EISDIR
    assert errno_of(os.setxattr, area, name, b"0,0") == errno.EISDIR
    link = area / "link"
    link.symlink_to("nowhere")
    os.mkfifo(area / "fifo")
    assert errno_of(os.setxattr, link, name, b"0,0", follow_symlinks=False) == errno.EPERM
    assert errno_of(os.setxattr, area / "fifo", name, b"0,0") == errno.EPERM
    f = volatile_file(area / "f", 1)
    assert errno_of(os.setxattr, f, name, b"0,-1") == errno.EINVAL
    assert errno_of(os.getxattr, f, name) == errno.ENODATA
    assert errno_of(os.getxattr, area, PINS) == errno.EISDIR
    assert errno_of(os.setxattr, f, PINS, b"0,0") == errno.EINVAL
    assert name not in os.listxattr(f) and PINS not in os.listxattr(f)


def test_a_reader_pins_through_system_names(mount: Mount, area: Path) -> None:
    """The kernel wants write permission for any user.* setxattr (default_permissions);
    system.vrange.pin reaches the daemon unchecked, and the daemon checks read permission."""
    readable = volatile_file(area / "readable", 2, mode=0o644)
    private = volatile_file(area / "private", 2, mode=0o600)

    def reader() -> object:
        fd = os.open(readable, os.O_RDONLY)
        out = {
            "pid": os.getpid(),
            "user_pin": errno_or_value(lambda: pin(readable)),
            "user_pin_fd": errno_or_value(lambda: pin(fd)),  # the check is on the file
            "system_pin": errno_or_value(lambda: pin(readable, name=SYSTEM_PIN)),
            "pins": errno_or_value(lambda: pins(readable)),
            "private": errno_or_value(lambda: pin(private, name=SYSTEM_PIN)),
            "private_pins": errno_or_value(lambda: pins(private)),
        }
        out["purged"] = purged(readable)
        out["system_unpin"] = errno_or_value(lambda: unpin(readable, name=SYSTEM_UNPIN))
        out["again"] = errno_or_value(lambda: unpin(readable, name=SYSTEM_UNPIN))
        return out

    result = as_nobody(reader)
    assert isinstance(result, dict)
    assert result["user_pin"] == {"errno": errno.EACCES}
    assert result["user_pin_fd"] == {"errno": errno.EACCES}
    assert result["system_pin"] is None
    assert result["pins"] == [[0, 2 * PAGE, result["pid"], 1]]
    assert result["private"] == {"errno": errno.EACCES}
    assert result["private_pins"] == {"errno": errno.EACCES}
    assert result["purged"] == []
    assert result["system_unpin"] is None
    assert result["again"] == {"errno": errno.ENOENT}
    assert pins(readable) == []


def test_the_per_user_limit(mounter: Mounter) -> None:
    m = mounter.mount("4M", options=["pin_limit=48K"])
    f = volatile_file(m.path / "f", 8)
    g = volatile_file(m.path / "g", 8)
    pin(f, "0,32K")
    pin(f, "0,32K")  # counting costs nothing
    assert errno_of(pin, g, "0,32K") == errno.EDQUOT  # 32 KiB + 32 KiB > 48 KiB
    pin(g, "0,16K")
    assert errno_of(pin, g, "16K,16K") == errno.EDQUOT
    assert pins(g) == [(0, 16 * 1024, os.getpid(), 1)]
    s = stats(m.path)
    assert s["pin_limit_bytes"] == 48 * 1024 and s["pinned_bytes"] == 48 * 1024
    assert s["pins"] == 3
    unpin(f, "0,32K")
    unpin(f, "0,32K")
    pin(g, "16K,16K")
