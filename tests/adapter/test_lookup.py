"""Lookups: a name that is not there is answered as a negative entry the kernel may cache.

Inode 0 with an entry timeout (pyfuse3's way to say "cache this miss"), never counted as
a kernel reference; every other failure stays an error.  Why caching a miss is safe:
operations.NEGATIVE_TIMEOUT.
"""

from __future__ import annotations

import errno

import pyfuse3

from tests.adapter.harness import ROOT, Fs, errno_of, run
from vrangefs.operations import NEGATIVE_TIMEOUT


def test_a_missing_name_is_a_negative_entry() -> None:
    fs = Fs()

    async def body() -> pyfuse3.EntryAttributes:
        return await fs.ops.lookup(ROOT, b"nope", fs.ctx)

    entry = run(body)
    assert entry.st_ino == 0
    assert entry.entry_timeout == NEGATIVE_TIMEOUT > 0
    assert entry.attr_timeout == 0
    fs.volume.check_invariants()  # no lookup was counted for it


def test_a_name_found_after_a_miss_is_a_real_entry() -> None:
    fs = Fs()

    async def body() -> tuple[int, int]:
        miss = await fs.ops.lookup(ROOT, b"f", fs.ctx)
        made = await fs.create(b"f", b"data")
        hit = await fs.ops.lookup(ROOT, b"f", fs.ctx)
        assert hit.st_ino == made.ino and hit.st_size == 4
        return miss.st_ino, hit.st_ino

    miss, hit = run(body)
    assert miss == 0 and hit != 0
    fs.volume.check_invariants()


def test_other_lookup_failures_stay_errors() -> None:
    fs = Fs()
    ctx = fs.ctx

    async def body() -> dict[str, int | None]:
        f = await fs.create(b"f", b"data")
        return {
            "too long": await errno_of(fs.ops.lookup(ROOT, b"n" * 256, ctx)),
            "in a file": await errno_of(fs.ops.lookup(f.ino, b"x", ctx)),
            "in an unknown inode": await errno_of(fs.ops.lookup(999, b"x", ctx)),
        }

    result = run(body)
    assert result["too long"] == errno.ENAMETOOLONG
    assert result["in a file"] == errno.ENOTDIR
    assert result["in an unknown inode"] not in (None, 0)
    fs.volume.check_invariants()
