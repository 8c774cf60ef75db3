"""The control interface below the adapter: listings that cannot fit an xattr fail fast."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator

import pytest

from vrangefs import control
from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.pins import InodePins
from vrangefs.protocol import PINS_B
from vrangefs.volume import Caller, Volume


def test_a_listing_stops_as_soon_as_it_passes_the_xattr_limit() -> None:
    consumed = 0

    def ranges() -> Iterator[tuple[int, int]]:
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield (i * 8192, 4096)

    with pytest.raises(FsError) as info:
        control._listing(7, "user.vrange.purged", ranges())
    assert info.value.errno == errno.E2BIG
    assert "inode 7" in str(info.value) and "user.vrange.purged" in str(info.value)
    # Lines of 12-16 bytes: about 5,000 of them pass 64 KiB. Not a million.
    assert 4000 < consumed < 6000


def test_a_listing_that_fits_is_complete_and_in_order() -> None:
    pairs = [(i * 8192, 4096) for i in range(3000)]
    out = control._listing(1, "user.vrange.volatile", iter(pairs))
    assert out == b"".join(b"%d,%d\n" % p for p in pairs)
    assert len(out) <= 65536


def test_more_pins_than_any_listing_can_hold_are_refused_before_sorting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """6,000 pins need more than 64 KiB even at the shortest line ("0,4096 1 1"): E2BIG
    without building the listing; 4,000 one-page pins still list."""
    vol = Volume(PageStore(64 * PAGE_SIZE), pin_limit=6000 * PAGE_SIZE)
    f = vol.create(ROOT_INO, b"f", 0o644, Caller(0, 0)).ino
    vol.write(f, 0, b"x")
    for tgid in range(1, 6001):
        vol.pin(f, 0, PAGE_SIZE, tgid, 0)
    listed = 0
    rows = InodePins.rows

    def counting(self: InodePins) -> list[tuple[int, int, int, int]]:
        nonlocal listed
        listed += 1
        return rows(self)

    monkeypatch.setattr(InodePins, "rows", counting)
    with pytest.raises(FsError) as info:
        control.getxattr(vol, f, PINS_B)
    assert info.value.errno == errno.E2BIG and f"inode {f}" in str(info.value)
    assert listed == 0
    for tgid in range(4001, 6001):
        vol.unpin(f, 0, PAGE_SIZE, tgid)
    value = control.getxattr(vol, f, PINS_B)
    assert listed == 1 and len(value.splitlines()) == 4000 and len(value) <= 65536
