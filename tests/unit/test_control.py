"""The control interface below the adapter: listings that cannot fit an xattr fail fast."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator

import pytest

from vrangefs import control
from vrangefs.errors import FsError


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
