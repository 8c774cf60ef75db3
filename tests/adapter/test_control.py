"""The user.vrange.* control names, dispatched through Operations.getxattr/setxattr.

The contract's error rules: the range names on a directory answer EISDIR (and
EINVAL on other non-regular files); ``stats`` and ``purge`` exist only on the
mount root (elsewhere getxattr answers ENODATA and setxattr EINVAL); an unknown
``user.vrange.`` name answers ENODATA to getxattr and EINVAL to setxattr; a
malformed value gives EINVAL or ERANGE, is logged as a warning and changes
nothing; the names are virtual (never listed, never removable, never stored).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import pytest
import trio

from tests.adapter.harness import ROOT, File, Fs, errno_of, page, run, serving
from vrangefs.pagestore import PAGE_SIZE
from vrangefs.protocol import (
    CACHE_DIR_B,
    NONVOLATILE_B,
    PURGE_B,
    PURGED_B,
    STATS_B,
    VOLATILE_B,
    parse_stats,
)
from vrangefs.volume import Caller

P = PAGE_SIZE
UNKNOWN = b"user.vrange.nope"


async def get(fs: Fs, ino: int, name: bytes) -> bytes | int:
    """The value, or the errno."""
    try:
        return await fs.ops.getxattr(ino, name, fs.ctx)
    except pyfuse3.FUSEError as e:
        return e.errno


async def put(fs: Fs, ino: int, name: bytes, value: bytes) -> int | None:
    return await errno_of(fs.ops.setxattr(ino, name, value, fs.ctx))


async def tree(fs: Fs) -> tuple[File, int, int, int]:
    """A regular file (2 pages and 100 bytes), a directory, a symlink and a fifo."""
    f = await fs.create(b"f", page(0) * 2 + b"t" * 100)
    d = await fs.ops.mkdir(ROOT, b"d", 0o755, fs.ctx)
    s = await fs.ops.symlink(ROOT, b"s", b"f", fs.ctx)
    p = await fs.ops.mknod(ROOT, b"p", stat.S_IFIFO | 0o644, 0, fs.ctx)
    return f, d.st_ino, s.st_ino, p.st_ino


def test_range_names_on_a_file() -> None:
    fs = Fs()

    async def body() -> list[object]:
        async with serving(fs):
            f, *_ = await tree(fs)
            return [
                await get(fs, f.ino, VOLATILE_B),
                await put(fs, f.ino, VOLATILE_B, b"0,0"),
                await get(fs, f.ino, VOLATILE_B),  # the end-of-file page counts as whole
                await put(fs, f.ino, NONVOLATILE_B, b"4K,1\n"),  # suffix, echo's newline
                await get(fs, f.ino, VOLATILE_B),  # split in two
                await get(fs, f.ino, PURGED_B),
                await put(fs, ROOT, PURGE_B, b"all"),
                await get(fs, f.ino, PURGED_B),
                await put(fs, f.ino, NONVOLATILE_B, b"0,0"),
                await get(fs, f.ino, VOLATILE_B),
                await get(fs, f.ino, PURGED_B),  # sticky until written
            ]

    assert run(body) == [
        b"",
        None,
        b"0,8292\n",
        None,
        b"0,4096\n8192,100\n",
        b"",
        None,
        b"0,4096\n8192,100\n",
        None,
        b"",
        b"0,4096\n8192,100\n",
    ]
    fs.volume.check_invariants()


def test_range_names_on_other_kinds_of_inode() -> None:
    fs = Fs()

    async def body() -> dict[str, list[bytes | int | None]]:
        out: dict[str, list[bytes | int | None]] = {}
        async with serving(fs):
            _, d, s, p = await tree(fs)
            for kind, ino in (("root", ROOT), ("dir", d), ("symlink", s), ("fifo", p)):
                out[kind] = [
                    await get(fs, ino, VOLATILE_B),
                    await get(fs, ino, PURGED_B),
                    await put(fs, ino, VOLATILE_B, b"0,0"),
                    await put(fs, ino, NONVOLATILE_B, b"0,0"),
                ]
        return out

    eisdir, einval = errno.EISDIR, errno.EINVAL
    assert run(body) == {
        "root": [eisdir] * 4,
        "dir": [eisdir] * 4,
        "symlink": [einval] * 4,
        "fifo": [einval] * 4,
    }
    fs.volume.check_invariants()


def test_stats_and_purge_only_on_the_root() -> None:
    fs = Fs()

    async def body() -> list[object]:
        async with serving(fs):
            f, d, *_ = await tree(fs)
            await put(fs, f.ino, VOLATILE_B, b"0,0")
            out: list[object] = [
                await get(fs, f.ino, STATS_B),
                await get(fs, d, STATS_B),
                await put(fs, f.ino, PURGE_B, b"all"),
                await put(fs, d, PURGE_B, b"all"),
                await get(fs, f.ino, PURGED_B),  # nothing was purged by those
                await put(fs, ROOT, PURGE_B, b"ALL"),
                await put(fs, ROOT, PURGE_B, b""),
                await put(fs, ROOT, PURGE_B, b"all "),
                await get(fs, f.ino, PURGED_B),
                await put(fs, ROOT, PURGE_B, b"all\n"),
                await get(fs, f.ino, PURGED_B),
            ]
            stats = await get(fs, ROOT, STATS_B)
            assert isinstance(stats, bytes)
            out.append(stats)
        return out

    *answers, stats = run(body)
    assert answers == [
        errno.ENODATA,
        errno.ENODATA,
        errno.EINVAL,
        errno.EINVAL,
        b"",
        errno.EINVAL,
        errno.EINVAL,
        errno.EINVAL,
        b"",
        None,
        b"0,8292\n",
    ]
    assert isinstance(stats, bytes)
    keys = [line.partition(b"=")[0] for line in stats.splitlines()]
    assert len(keys) == len(set(keys)), "a statistic is listed twice"
    values = parse_stats(stats)
    assert values["pid"] == os.getpid()
    assert values["memory_cap"] == 64 * P
    assert values["resident_bytes"] == 0  # f's three pages were purged
    assert values["purge_events"] == 1
    assert values["purged_bytes_total"] == 3 * P
    assert values["invalidations"] == 1  # the adapter's own part
    assert isinstance(values["invalidation_max_us"], int)
    fs.volume.check_invariants()


def test_unknown_and_one_way_names() -> None:
    fs = Fs()

    async def body() -> list[object]:
        async with serving(fs):
            f, *_ = await tree(fs)
            return [
                await get(fs, f.ino, UNKNOWN),
                await put(fs, f.ino, UNKNOWN, b"1"),
                await get(fs, ROOT, UNKNOWN),
                await put(fs, ROOT, UNKNOWN, b"1"),
                await get(fs, f.ino, NONVOLATILE_B),  # write-only names
                await get(fs, ROOT, PURGE_B),
                await put(fs, f.ino, PURGED_B, b"0,0"),  # read-only names
                await put(fs, ROOT, STATS_B, b"x"),
                await get(fs, f.ino, b"user.vrange."),
                await get(fs, f.ino, UNKNOWN),  # setting stored nothing
            ]

    e = errno
    assert run(body) == [
        *(e.ENODATA, e.EINVAL, e.ENODATA, e.EINVAL),
        *(e.ENODATA, e.ENODATA, e.EINVAL, e.EINVAL),
        *(e.ENODATA, e.ENODATA),
    ]
    fs.volume.check_invariants()


@pytest.mark.parametrize(
    ("value", "err"),
    [
        (b"garbage", errno.EINVAL),
        (b"-1,4096", errno.EINVAL),
        (b"0,4096,1", errno.EINVAL),
        (b"0 ,4096", errno.EINVAL),
        (b"0,4KB", errno.EINVAL),
        (b"0x0,4096", errno.EINVAL),
        (b"0,4096\x00", errno.EINVAL),
        (b"", errno.EINVAL),
        (b"9223372036854775807,1", errno.ERANGE),
        (b"99999999999999999999,0", errno.ERANGE),
        (b"8589934592G,0", errno.ERANGE),
    ],
)
@pytest.mark.parametrize("name", [VOLATILE_B, NONVOLATILE_B])
def test_a_malformed_range_changes_nothing(
    name: bytes, value: bytes, err: int, caplog: pytest.LogCaptureFixture
) -> None:
    fs = Fs()

    async def body() -> tuple[int | None, bytes | int, bytes | int]:
        async with serving(fs):
            f, *_ = await tree(fs)
            await put(fs, f.ino, VOLATILE_B, b"4096,4096")
            before = await get(fs, f.ino, VOLATILE_B)
            with caplog.at_level(logging.WARNING, logger="vrangefs.control"):
                answer = await put(fs, f.ino, name, value)
            return answer, before, await get(fs, f.ino, VOLATILE_B)

    answer, before, after = run(body)
    assert answer == err
    assert before == after == b"4096,4096\n"
    assert [r.levelno for r in caplog.records if r.name == "vrangefs.control"] == [logging.WARNING]
    fs.volume.check_invariants()


def test_the_names_are_virtual() -> None:
    fs = Fs()

    async def body() -> list[object]:
        async with serving(fs):
            f, *_ = await tree(fs)
            await put(fs, f.ino, VOLATILE_B, b"0,0")
            await put(fs, f.ino, b"user.note", b"kept")
            await put(fs, f.ino, b"user.vrangefoo", b"a plain name")  # no dot: not ours
            return [
                sorted(await fs.ops.listxattr(f.ino, fs.ctx)),
                await errno_of(fs.ops.removexattr(f.ino, VOLATILE_B, fs.ctx)),
                await errno_of(fs.ops.removexattr(f.ino, UNKNOWN, fs.ctx)),
                await get(fs, f.ino, b"user.vrangefoo"),
                await get(fs, f.ino, VOLATILE_B),  # still marked
                fs.volume.inode(f.ino).xattrs,
            ]

    assert run(body) == [
        [b"user.note", b"user.vrangefoo"],
        errno.ENODATA,
        errno.ENODATA,
        b"a plain name",
        b"0,8292\n",
        {b"user.note": b"kept", b"user.vrangefoo": b"a plain name"},
    ]
    fs.volume.check_invariants()


def test_a_directory_of_thousands_joins_the_cache_between_other_requests() -> None:
    """Making a big directory a cache directory, and ordinary again, is a job of small
    steps: requests made meanwhile see some of its files evictable and some not yet."""
    count = 5000
    fs = Fs(cap_pages=2 * count)
    caller = Caller(0, 0)

    async def body() -> list[int]:
        seen: list[int] = []
        async with serving(fs) as nursery:
            d = await fs.ops.mkdir(ROOT, b"d", 0o755, fs.ctx)
            for i in range(count):
                f = fs.volume.create(d.st_ino, b"f%d" % i, stat.S_IFREG | 0o644, caller)
                fs.volume.write(f.ino, 0, b"x")
                fs.volume.release(f.ino)
            for flag, final in ((b"1", count), (b"0", 0)):
                done = trio.Event()

                async def change(flag: bytes = flag, done: trio.Event = done) -> None:
                    await fs.ops.setxattr(d.st_ino, CACHE_DIR_B, flag, fs.ctx)
                    done.set()

                nursery.start_soon(change)
                with trio.fail_after(10):
                    while not done.is_set():
                        seen.append(int((await fs.stats())["cache_dir_files"]))
                        await trio.sleep(0)
                assert (await fs.stats())["cache_dir_files"] == final
        return seen

    seen = run(body)
    assert any(0 < files < count for files in seen), seen
    fs.volume.check_invariants()
