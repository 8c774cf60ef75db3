"""The Volume model without FUSE: link counts, rename, unlink of open files, errors.

Every test ends with ``Volume.check_invariants()`` (the ``vol`` fixture).
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable, Iterator

import pytest

from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO, Inode
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.volume import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    AttrChange,
    Caller,
    Volume,
)

ROOT = Caller(0, 0)
CAP_PAGES = 64


@pytest.fixture
def vol() -> Iterator[Volume]:
    v = Volume(PageStore(CAP_PAGES * PAGE_SIZE))
    yield v
    v.check_invariants()


def err(fn: Callable[[], object]) -> int:
    """The errno *fn* raised as FsError."""
    with pytest.raises(FsError) as info:
        fn()
    return info.value.errno


def mkfile(vol: Volume, parent: int, name: bytes, data: bytes = b"") -> Inode:
    """Create, write and close a file, as a process would."""
    inode = vol.create(parent, name, 0o644, ROOT)
    if data:
        vol.write(inode.ino, 0, data)
    vol.release(inode.ino)
    return inode


def mkdir(vol: Volume, parent: int, name: bytes) -> Inode:
    return vol.mkdir(parent, name, 0o755, ROOT)


def child(vol: Volume, parent: int, name: bytes) -> int | None:
    d = vol.inode(parent).dir
    assert d is not None
    return d.entries.get(name)


def nlink(vol: Volume, ino: int) -> int:
    return vol.inode(ino).nlink


def used(vol: Volume) -> int:
    return vol.store.used_pages


def forget(vol: Volume, inode: Inode) -> None:
    """The kernel drops its references, as it does soon after an inode is unlinked and closed."""
    vol.forget(inode.ino, inode.lookups)


# -- link counts ------------------------------------------------------------------------
def test_file_link_counts(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"a", b"x" * PAGE_SIZE)
    d = mkdir(vol, ROOT_INO, b"d")
    assert f.nlink == 1
    vol.link(f.ino, d.ino, b"b")
    vol.link(f.ino, ROOT_INO, b"c")
    assert f.nlink == 3
    assert child(vol, d.ino, b"b") == f.ino
    assert err(lambda: vol.link(f.ino, ROOT_INO, b"c")) == errno.EEXIST
    vol.unlink(ROOT_INO, b"a")
    vol.unlink(ROOT_INO, b"c")
    assert f.nlink == 1
    assert bytes(vol.read(f.ino, 0, 10)) == b"x" * 10
    assert used(vol) == 1
    vol.unlink(d.ino, b"b")
    assert f.nlink == 0
    forget(vol, f)
    assert used(vol) == 0
    vol.check_invariants()


def test_directory_link_counts(vol: Volume) -> None:
    root = vol.inode(ROOT_INO)
    assert root.nlink == 2
    a = mkdir(vol, ROOT_INO, b"a")
    assert (root.nlink, a.nlink) == (3, 2)
    b = mkdir(vol, a.ino, b"b")
    mkfile(vol, a.ino, b"file")
    assert (root.nlink, a.nlink, b.nlink) == (3, 3, 2)  # files do not count
    assert err(lambda: vol.rmdir(ROOT_INO, b"a")) == errno.ENOTEMPTY
    assert err(lambda: vol.rmdir(a.ino, b"file")) == errno.ENOTDIR
    assert err(lambda: vol.unlink(ROOT_INO, b"a")) == errno.EISDIR
    assert err(lambda: vol.link(a.ino, ROOT_INO, b"alink")) == errno.EPERM
    vol.rmdir(a.ino, b"b")
    assert (a.nlink, b.nlink) == (2, 0)
    vol.unlink(a.ino, b"file")
    vol.rmdir(ROOT_INO, b"a")
    assert (root.nlink, a.nlink) == (2, 0)
    vol.check_invariants()


def test_no_creation_in_a_removed_directory(vol: Volume) -> None:
    d = mkdir(vol, ROOT_INO, b"gone")
    vol.rmdir(ROOT_INO, b"gone")
    assert err(lambda: vol.create(d.ino, b"f", 0o644, ROOT)) == errno.ENOENT
    assert err(lambda: vol.mkdir(d.ino, b"sub", 0o755, ROOT)) == errno.ENOENT


def test_name_limits(vol: Volume) -> None:
    assert err(lambda: vol.create(ROOT_INO, b"n" * 256, 0o644, ROOT)) == errno.ENAMETOOLONG
    mkfile(vol, ROOT_INO, b"n" * 255)
    assert err(lambda: vol.create(ROOT_INO, b"n" * 255, 0o644, ROOT)) == errno.EEXIST


# -- rename -----------------------------------------------------------------------------
def test_rename_file_over_file_frees_the_old_one(vol: Volume) -> None:
    src = mkfile(vol, ROOT_INO, b"src", b"new" * 1000)
    dst = mkfile(vol, ROOT_INO, b"dst", b"o" * (3 * PAGE_SIZE))
    assert used(vol) == 4
    vol.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0)
    assert child(vol, ROOT_INO, b"src") is None
    assert child(vol, ROOT_INO, b"dst") == src.ino
    assert dst.nlink == 0
    forget(vol, dst)
    assert used(vol) == 1  # the replaced file's data is gone
    vol.check_invariants()


def test_rename_over_an_open_file_keeps_its_data_until_release(vol: Volume) -> None:
    mkfile(vol, ROOT_INO, b"src", b"s")
    dst = mkfile(vol, ROOT_INO, b"dst", b"d" * 100)
    vol.open(dst.ino)
    vol.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0)
    assert bytes(vol.read(dst.ino, 0, 100)) == b"d" * 100
    assert used(vol) == 2
    vol.release(dst.ino)
    forget(vol, dst)
    assert used(vol) == 1


def test_rename_dir_over_empty_dir(vol: Volume) -> None:
    p1 = mkdir(vol, ROOT_INO, b"p1")
    p2 = mkdir(vol, ROOT_INO, b"p2")
    src = mkdir(vol, p1.ino, b"src")
    mkfile(vol, src.ino, b"inside", b"i")
    dst = mkdir(vol, p2.ino, b"dst")
    assert (p1.nlink, p2.nlink) == (3, 3)
    vol.rename(p1.ino, b"src", p2.ino, b"dst", 0)
    assert child(vol, p2.ino, b"dst") == src.ino
    assert child(vol, p1.ino, b"src") is None
    assert (p1.nlink, p2.nlink, src.nlink, dst.nlink) == (2, 3, 2, 0)
    assert child(vol, src.ino, b"inside") is not None
    vol.check_invariants()


def test_rename_dir_within_one_parent_over_empty_dir(vol: Volume) -> None:
    mkdir(vol, ROOT_INO, b"a")
    mkdir(vol, ROOT_INO, b"b")
    vol.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert vol.inode(ROOT_INO).nlink == 3
    vol.check_invariants()


def test_rename_errors_change_nothing(vol: Volume) -> None:
    d = mkdir(vol, ROOT_INO, b"d")
    full = mkdir(vol, ROOT_INO, b"full")
    mkfile(vol, full.ino, b"x")
    f = mkfile(vol, ROOT_INO, b"f", b"data")
    before = {n: i for n, i in vol.inode(ROOT_INO).dir.entries.items()}  # type: ignore[union-attr]
    assert err(lambda: vol.rename(ROOT_INO, b"d", ROOT_INO, b"full", 0)) == errno.ENOTEMPTY
    assert err(lambda: vol.rename(ROOT_INO, b"f", ROOT_INO, b"d", 0)) == errno.EISDIR
    assert err(lambda: vol.rename(ROOT_INO, b"d", ROOT_INO, b"f", 0)) == errno.ENOTDIR
    assert err(lambda: vol.rename(ROOT_INO, b"f", ROOT_INO, b"d", RENAME_NOREPLACE)) == (
        errno.EEXIST
    )
    assert err(lambda: vol.rename(ROOT_INO, b"nope", ROOT_INO, b"x", 0)) == errno.ENOENT
    assert err(lambda: vol.rename(ROOT_INO, b"f", ROOT_INO, b"y", RENAME_EXCHANGE)) == (
        errno.ENOENT
    )
    assert vol.inode(ROOT_INO).dir.entries == before  # type: ignore[union-attr]
    assert (d.nlink, full.nlink, f.nlink) == (2, 2, 1)
    vol.check_invariants()


def test_rename_noreplace_to_a_free_name(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f")
    vol.rename(ROOT_INO, b"f", ROOT_INO, b"g", RENAME_NOREPLACE)
    assert child(vol, ROOT_INO, b"g") == f.ino
    assert child(vol, ROOT_INO, b"f") is None


def test_rename_exchange_file_and_dir_across_parents(vol: Volume) -> None:
    p1 = mkdir(vol, ROOT_INO, b"p1")
    p2 = mkdir(vol, ROOT_INO, b"p2")
    f = mkfile(vol, p1.ino, b"f", b"file")
    d = mkdir(vol, p2.ino, b"d")
    assert (p1.nlink, p2.nlink) == (2, 3)
    vol.rename(p1.ino, b"f", p2.ino, b"d", RENAME_EXCHANGE)
    assert child(vol, p1.ino, b"f") == d.ino
    assert child(vol, p2.ino, b"d") == f.ino
    assert (p1.nlink, p2.nlink, f.nlink, d.nlink) == (3, 2, 1, 2)
    vol.check_invariants()


def test_rename_exchange_two_files(vol: Volume) -> None:
    a = mkfile(vol, ROOT_INO, b"a", b"AAAA")
    b = mkfile(vol, ROOT_INO, b"b", b"BB")
    vol.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert (child(vol, ROOT_INO, b"a"), child(vol, ROOT_INO, b"b")) == (b.ino, a.ino)
    assert bytes(vol.read(a.ino, 0, 10)) == b"AAAA"
    assert used(vol) == 2


def test_rename_onto_another_link_of_itself_does_nothing(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"a", b"x")
    vol.link(f.ino, ROOT_INO, b"b")
    vol.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert child(vol, ROOT_INO, b"a") == child(vol, ROOT_INO, b"b") == f.ino
    assert f.nlink == 2


def test_unknown_rename_flag(vol: Volume) -> None:
    mkfile(vol, ROOT_INO, b"a")
    assert err(lambda: vol.rename(ROOT_INO, b"a", ROOT_INO, b"b", 4)) == errno.EINVAL
    assert child(vol, ROOT_INO, b"a") is not None


# -- unlink of open files and freeing ---------------------------------------------------------
def test_unlinked_open_file_keeps_data_until_release(vol: Volume) -> None:
    f = vol.create(ROOT_INO, b"f", 0o644, ROOT)
    vol.write(f.ino, 0, b"q" * (2 * PAGE_SIZE + 1))
    vol.unlink(ROOT_INO, b"f")
    assert child(vol, ROOT_INO, b"f") is None
    assert f.nlink == 0
    assert bytes(vol.read(f.ino, PAGE_SIZE, 5)) == b"qqqqq"
    vol.write(f.ino, 3 * PAGE_SIZE, b"more")  # still writable through the handle
    assert used(vol) == 4
    vol.check_invariants()
    vol.release(f.ino)
    assert vol.inodes.get(f.ino) is f  # the kernel still knows it
    forget(vol, f)
    assert used(vol) == 0
    assert vol.inodes.get(f.ino) is None
    assert err(lambda: vol.inode(f.ino)) == errno.ESTALE


def test_two_opens_keep_data_until_the_last_release(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f", b"z" * 10)
    vol.open(f.ino)
    vol.open(f.ino)
    vol.unlink(ROOT_INO, b"f")
    vol.release(f.ino)
    assert bytes(vol.read(f.ino, 0, 10)) == b"z" * 10
    vol.release(f.ino)
    forget(vol, f)
    assert used(vol) == 0


def test_unlinked_file_still_known_to_the_kernel_keeps_its_data(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f", b"kept" * 1000)
    assert f.lookups > 0
    vol.unlink(ROOT_INO, b"f")
    vol.open(f.ino)  # the kernel looked the name up before the unlink
    assert bytes(vol.read(f.ino, 0, 4)) == b"kept"
    assert f.size == 4000
    vol.release(f.ino)
    forget(vol, f)
    assert used(vol) == 0


def test_forget_before_unlink_keeps_the_inode(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f", b"keep")
    vol.forget(f.ino, f.lookups)
    assert vol.inodes.get(f.ino) is f  # still linked
    found = vol.lookup(ROOT_INO, b"f")
    assert bytes(vol.read(found.ino, 0, 4)) == b"keep"


# -- attributes, data, xattrs, statfs --------------------------------------------------------
def test_write_updates_mtime_and_ctime_chmod_only_ctime(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f")
    f.atime_ns = f.mtime_ns = f.ctime_ns = 1
    vol.write(f.ino, 0, b"x")
    assert f.mtime_ns > 1
    assert f.ctime_ns > 1
    assert f.atime_ns == 1
    f.mtime_ns = f.ctime_ns = 1
    vol.setattr(f.ino, AttrChange(mode=0o600))
    assert stat.S_IMODE(f.mode) == 0o600
    assert stat.S_ISREG(f.mode)
    assert (f.mtime_ns, f.atime_ns) == (1, 1)
    assert f.ctime_ns > 1


def test_truncate_through_setattr(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f", b"y" * (5 * PAGE_SIZE))
    f.mtime_ns = 1
    vol.setattr(f.ino, AttrChange(size=PAGE_SIZE + 1))
    assert f.size == PAGE_SIZE + 1
    assert f.mtime_ns > 1
    assert used(vol) == 2
    vol.setattr(f.ino, AttrChange(size=10 * PAGE_SIZE))
    assert bytes(vol.read(f.ino, PAGE_SIZE, 2)) == b"y\0"
    assert used(vol) == 2
    d = mkdir(vol, ROOT_INO, b"d")
    assert err(lambda: vol.setattr(d.ino, AttrChange(size=0))) == errno.EISDIR


def test_enospc_keeps_existing_data(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f", b"k" * (CAP_PAGES - 2) * PAGE_SIZE)
    g = vol.create(ROOT_INO, b"g", 0o644, ROOT)
    assert err(lambda: vol.write(g.ino, 0, b"n" * 3 * PAGE_SIZE)) == errno.ENOSPC
    assert g.size == 0
    assert bytes(vol.read(f.ino, 0, 3)) == b"kkk"
    assert vol.statfs().blocks_free == 2
    vol.write(g.ino, 0, b"n" * 2 * PAGE_SIZE)
    assert vol.statfs().blocks_free == 0
    vol.release(g.ino)
    vol.unlink(ROOT_INO, b"f")
    forget(vol, f)
    assert vol.statfs().blocks_free == CAP_PAGES - 2


def test_statfs(vol: Volume) -> None:
    s = vol.statfs()
    assert (s.block_size, s.blocks, s.blocks_free, s.name_max) == (
        PAGE_SIZE,
        CAP_PAGES,
        CAP_PAGES,
        255,
    )
    f = mkfile(vol, ROOT_INO, b"f")
    vol.setattr(f.ino, AttrChange(size=1 << 30))  # sparse: costs nothing
    assert vol.statfs().blocks_free == CAP_PAGES
    files_free = vol.statfs().files_free
    mkfile(vol, ROOT_INO, b"g", b"1")
    assert vol.statfs().blocks_free == CAP_PAGES - 1
    assert vol.statfs().files_free == files_free - 1


def test_xattrs(vol: Volume) -> None:
    f = mkfile(vol, ROOT_INO, b"f")
    assert vol.listxattr(f.ino) == []
    assert err(lambda: vol.getxattr(f.ino, b"user.a")) == errno.ENODATA
    vol.setxattr(f.ino, b"user.a", b"1")
    vol.setxattr(f.ino, b"user.b", b"")
    assert vol.getxattr(f.ino, b"user.a") == b"1"
    assert vol.getxattr(f.ino, b"user.b") == b""
    assert sorted(vol.listxattr(f.ino)) == [b"user.a", b"user.b"]
    vol.removexattr(f.ino, b"user.a")
    assert err(lambda: vol.removexattr(f.ino, b"user.a")) == errno.ENODATA
    assert vol.listxattr(f.ino) == [b"user.b"]
    assert err(lambda: vol.setxattr(f.ino, b"foo.bar", b"x")) == errno.EOPNOTSUPP
    assert vol.listxattr(f.ino) == [b"user.b"]


def test_more_xattr_names_than_a_listing_holds_get_e2big_at_once(vol: Volume) -> None:
    """65,536 bytes hold at most 9,362 names of the shortest kind ("user.x" and its NUL)."""
    f = mkfile(vol, ROOT_INO, b"f")
    for i in range(9363):
        vol.setxattr(f.ino, b"user.%d" % i, b"")
    assert err(lambda: vol.listxattr(f.ino)) == errno.E2BIG
    vol.removexattr(f.ino, b"user.0")
    assert len(vol.listxattr(f.ino)) == 9362


def test_readdir_while_removing_never_repeats(vol: Volume) -> None:
    d = mkdir(vol, ROOT_INO, b"d")
    for i in range(300):
        mkfile(vol, d.ino, f"e{i}".encode())
    seen: list[bytes] = []
    cookie = 0
    removed = 0
    gone: set[bytes] = set()
    while True:
        batch = list(vol.readdir(d.ino, cookie))[:37]
        if not batch:
            break
        for c, name, _inode in batch:
            seen.append(name)
            cookie = c
        for _ in range(10):  # remove entries both already listed and not yet listed
            if removed < 200:
                name = f"e{(removed * 7) % 300}".encode()
                vol.unlink(d.ino, name)
                gone.add(name)
                removed += 1
    assert len(seen) == len(set(seen))
    stable = {f"e{i}".encode() for i in range(300)} - gone
    assert len(stable) >= 100
    assert stable <= set(seen)
    vol.check_invariants()


# -- eviction at the cap ------------------------------------------------------------------
def test_write_that_purges_its_own_range_retries_until_it_fits() -> None:
    """Purging the writer's own volatile unit frees pages the write must allocate again."""
    vol = Volume(PageStore(16 * PAGE_SIZE), low_watermark=1.0)
    f = mkfile(vol, ROOT_INO, b"f", b"a" * 12 * PAGE_SIZE)
    vol.mark_volatile(f.ino, 8 * PAGE_SIZE, 4 * PAGE_SIZE)  # oldest unit: f's pages 8..11
    g = mkfile(vol, ROOT_INO, b"g", b"g" * 4 * PAGE_SIZE)
    vol.mark_volatile(g.ino, 0, 0)  # the cap is full now
    # Rewriting f's pages 8..15 needs 4 new pages; purging f's unit frees 4 but makes pages
    # 8..11 new too, so g's unit must go as well.
    assert vol.write(f.ino, 8 * PAGE_SIZE, b"b" * 8 * PAGE_SIZE) == 8 * PAGE_SIZE
    assert bytes(vol.read(f.ino, 0, 16 * PAGE_SIZE)) == b"a" * 8 * PAGE_SIZE + b"b" * 8 * PAGE_SIZE
    assert list(vol.purged_ranges(g.ino)) == [(0, 4 * PAGE_SIZE)]
    assert sum(vol.reclaim.statistics().purge_events.values()) == 2
    vol.check_invariants()


def test_write_past_the_cap_with_nothing_volatile_is_enospc_and_changes_nothing() -> None:
    vol = Volume(PageStore(8 * PAGE_SIZE))
    f = mkfile(vol, ROOT_INO, b"f", b"a" * 6 * PAGE_SIZE)
    vol.mark_volatile(f.ino, 0, PAGE_SIZE)  # one volatile page: not enough to help
    assert err(lambda: vol.write(f.ino, 6 * PAGE_SIZE, b"b" * 4 * PAGE_SIZE)) == errno.ENOSPC
    assert vol.inode(f.ino).size == 6 * PAGE_SIZE
    assert bytes(vol.read(f.ino, PAGE_SIZE, 5 * PAGE_SIZE)) == b"a" * 5 * PAGE_SIZE
    vol.check_invariants()


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "readable"),
    [
        (0o400, 1000, 1000, True),  # the owner, owner-readable
        (0o044, 1000, 1000, False),  # the owner class decides: not readable by the owner
        (0o040, 2000, 1000, True),  # the file's group by the primary gid
        (0o404, 2000, 1000, False),  # group class without the group bit
        (0o004, 2000, 2000, False),  # might be in the group by a supplementary one: unknown
        (0o044, 2000, 2000, True),  # group and other readable: whatever the groups
    ],
)
def test_readable_by_ids_never_grants_what_the_groups_could_deny(
    vol: Volume, mode: int, uid: int, gid: int, readable: bool
) -> None:
    inode = vol.mknod(ROOT_INO, b"f", stat.S_IFREG | mode, 0, Caller(1000, 1000))
    assert Volume.readable_by_ids(inode, uid, gid) is readable


def test_a_dead_inode_with_many_units_loses_them_at_once() -> None:
    """Its units leave the counts and the purge order in the step that frees it; the
    reaper lets go of the unit objects a few index chunks per step afterwards."""
    units = 3000
    vol = Volume(PageStore(4 * units * PAGE_SIZE))
    f = vol.create(ROOT_INO, b"many", 0o644, ROOT).ino
    vol.write(f, 0, b"m" * (2 * units * PAGE_SIZE))
    other = vol.create(ROOT_INO, b"other", 0o644, ROOT).ino
    vol.write(other, 0, b"o" * PAGE_SIZE)
    for i in range(units):
        vol.mark_volatile(f, 2 * i * PAGE_SIZE, PAGE_SIZE)
    vol.mark_volatile(other, 0, PAGE_SIZE)
    woken: list[int] = []
    vol.on_reap = lambda: woken.append(1)
    vol.release(f)
    vol.unlink(ROOT_INO, b"many")
    vol.forget(f, 1)
    assert vol.inodes.get(f) is None
    assert vol.reclaim.units == 1 and len(vol.reclaim.order) == 1
    assert vol.reclaim.volatile_pages == 1 and vol.store.used_pages == 1
    vol.check_invariants()
    assert woken and vol._dropped_units
    for _ in vol.reaping():
        pass
    assert not vol._dropped_units
    assert vol.reclaim.purge_all() == 1  # the other file's unit, not a stale one
    vol.check_invariants()
