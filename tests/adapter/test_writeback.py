"""The writeback rule of Operations.write.

Dropping an inode's cache makes the kernel write dirty mapped pages back first,
one page per WRITE, through a read-write handle.  So while an inode is flushing,
a WRITE of at most one page, page-aligned, through a read-write handle, into a
purged page is refused with EIO and changes nothing.  Through a write-only
handle, unaligned, longer than a page, into a page that is not purged, or once
the flush is over, a write stores.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest
import trio.testing

from tests.adapter.harness import File, Fs, errno_of, page, run, serving
from vrangefs.pagestore import PAGE_SIZE

P = PAGE_SIZE


def snapshot(fs: Fs, f: File) -> tuple[object, ...]:
    inode = fs.volume.inode(f.ino)
    return (
        inode.size,
        inode.mtime_ns,
        inode.ctime_ns,
        inode.blocks,
        fs.volume.store.used_pages,
        fs.purged_now(f.ino),
    )


def test_writeback_into_a_purged_page_while_flushing(caplog: pytest.LogCaptureFixture) -> None:
    fs = Fs()

    async def body() -> dict[str, object]:
        out: dict[str, object] = {}
        async with serving(fs):
            f = await fs.volatile_file(b"f", 8)
            wo = await fs.open(f.ino, os.O_WRONLY)
            assert f.fh & 1 and not wo & 1  # the handle's low bit: opened read-write
            gate = fs.hook.arm(f.ino)
            fs.purge_oldest()  # every page of f is purged; its flush is held
            await gate.wait_entered()
            assert fs.flushing(f.ino)

            before = snapshot(fs, f)
            out["rw whole page"] = await errno_of(fs.ops.write(f.fh, 0, page(50)))
            out["rw short, aligned"] = await errno_of(fs.ops.write(f.fh, P, b"z" * 100))
            out["changed nothing"] = snapshot(fs, f) == before

            out["wo whole page"] = await fs.ops.write(wo, 2 * P, page(52))
            out["rw unaligned"] = await fs.ops.write(f.fh, 3 * P + 1, b"u" * 10)
            out["rw over a page"] = await fs.ops.write(f.fh, 4 * P, page(54, P + 1))
            out["rw into a hole"] = await fs.ops.write(f.fh, 8 * P, page(58))
            out["still flushing"] = fs.flushing(f.ino)

            gate.release()
            await fs.settled(f.ino)
            out["rw after the flush"] = await fs.ops.write(f.fh, 6 * P, page(56))

            out["page 2"] = await fs.read(f, 2 * P, P) == page(52)
            out["page 3"] = await fs.read(f, 3 * P, P) == bytes(1) + b"u" * 10 + bytes(P - 11)
            out["pages 4, 5"] = await fs.read(f, 4 * P, 2 * P) == page(54, P + 1) + bytes(P - 1)
            out["page 6"] = await fs.read(f, 6 * P, P) == page(56)
            out["read page 0"] = await errno_of(fs.ops.read(f.fh, 0, P))
            out["purged"] = await fs.purged(f.ino)
            await fs.ops.release(wo)
        return out

    assert run(body) == {
        "rw whole page": errno.EIO,
        "rw short, aligned": errno.EIO,
        "changed nothing": True,
        "wo whole page": P,
        "rw unaligned": 10,
        "rw over a page": P + 1,
        "rw into a hole": P,
        "still flushing": True,
        "rw after the flush": P,
        "page 2": True,
        "page 3": True,
        "pages 4, 5": True,
        "page 6": True,
        "read page 0": errno.EIO,  # still purged: the refused writes stored nothing
        "purged": b"0,8192\n28672,4096\n",  # pages 0, 1 and 7
    }
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    fs.volume.check_invariants()


def test_the_rule_is_per_inode() -> None:
    """Another file's purged page takes a read-write page write while this one flushes."""
    fs = Fs()

    async def body() -> tuple[int, bytes, bool]:
        async with serving(fs):
            other = await fs.volatile_file(b"other", 1)
            f = await fs.volatile_file(b"f", 1)
            fs.purge_oldest()  # other: flushed (nothing holds it)
            await fs.settled(other.ino)
            gate = fs.hook.arm(f.ino)
            fs.purge_oldest()  # f: held
            await gate.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            written = await fs.ops.write(other.fh, 0, page(3))
            return written, await fs.purged(other.ino), fs.flushing(f.ino)

    assert run(body) == (P, b"", True)
    fs.volume.check_invariants()


def test_a_truncated_purged_page_is_no_longer_refused() -> None:
    """Truncating away a purged page and writing there again is new data, not writeback."""
    fs = Fs()

    async def body() -> tuple[int | None, int, bytes]:
        async with serving(fs):
            f = await fs.volatile_file(b"f", 2)
            gate = fs.hook.arm(f.ino)
            fs.purge_oldest()
            await gate.wait_entered()
            refused = await errno_of(fs.ops.write(f.fh, P, page(1)))
            await fs.ops.open(f.ino, os.O_RDWR | os.O_TRUNC, fs.ctx)
            written = await fs.ops.write(f.fh, P, page(1))  # page 1 is a plain hole now
            gate.release()
            return refused, written, await fs.purged(f.ino)

    assert run(body) == (errno.EIO, P, b"")
    fs.volume.check_invariants()
