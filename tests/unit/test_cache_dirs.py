"""Cache directories on the Volume, without FUSE: which files are evicted, when, in which order.

A regular file whose every name is in a cache directory is evicted as a whole when a purge
needs room, least recently opened first, in one order with volatile range units; an open
handle, a pin or a whole-file non-volatile mark holds it.  Every step is followed by
``Volume.check_invariants()``.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable

import pytest

from vrangefs.errors import FsError
from vrangefs.inodes import ROOT_INO
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import PurgeCause
from vrangefs.volume import RENAME_EXCHANGE, AttrChange, Caller, Volume
from vrangefs.vrange import CacheFile

ROOT = Caller(0, 0)
TGID = 4242
UID = 1000

Event = tuple[str, int, PurgeCause, int]
"""("purged" or "evicted", inode, cause, pages)."""


class Recorder:
    """A purge listener that remembers purges and evictions in order and holds nothing back."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.names: dict[int, list[tuple[int, bytes]]] = {}

    def purged(self, ino: int, cause: PurgeCause, pages: int) -> None:
        self.events.append(("purged", ino, cause, pages))

    def evicted(
        self, ino: int, cause: PurgeCause, pages: int, names: list[tuple[int, bytes]]
    ) -> None:
        self.events.append(("evicted", ino, cause, pages))
        self.names[ino] = names

    def unpublished(self) -> tuple[dict[PurgeCause, int], dict[PurgeCause, int]]:
        return {}, {}

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def evicted_inos(self) -> list[int]:
        return [ino for kind, ino, _, _ in self.take() if kind == "evicted"]


class Setup:
    """A volume with a cache directory ``c``, an ordinary directory ``o`` and an open
    ordinary file ``w`` that writes to force purges.  ``low_watermark=1.0``: a write at
    the cap purges only what it needs, so the order shows one entry at a time."""

    def __init__(self, cap_pages: int = 16, cache_dir: bool = False) -> None:
        self.vol = Volume(PageStore(cap_pages * PAGE_SIZE), low_watermark=1.0, cache_dir=cache_dir)
        self.rec = Recorder()
        self.vol.reclaim.listener = self.rec
        self.c = self.mkdir(ROOT_INO, b"c")
        self.vol.set_cache_dir(self.c, True)
        self.o = self.mkdir(ROOT_INO, b"o")
        self.w = self.vol.create(ROOT_INO, b"w", 0o644, ROOT).ino  # stays open
        self.w_pages = 0
        self.check()

    def check(self) -> None:
        self.vol.check_invariants()

    def mkdir(self, parent: int, name: bytes) -> int:
        return self.vol.mkdir(parent, name, 0o755, ROOT).ino

    def put(self, parent: int, name: bytes, pages: int, byte: int = 0x61) -> int:
        """Create, write and close a file, as a cache program would."""
        ino = self.vol.create(parent, name, 0o644, ROOT).ino
        if pages:
            self.vol.write(ino, 0, bytes([byte]) * pages * PAGE_SIZE)
        self.vol.release(ino)
        self.check()
        return ino

    def use(self, ino: int) -> None:
        """Open and close: the file becomes the most recently used."""
        self.vol.open(ino, os.O_RDONLY)
        self.vol.release(ino)
        self.check()

    def grow(self, pages: int) -> None:
        """Write *pages* more pages to ``w`` (an ordinary file): purges what the cap needs."""
        self.vol.write(self.w, self.w_pages * PAGE_SIZE, b"w" * pages * PAGE_SIZE)
        self.w_pages += pages
        self.check()

    def evicts(self, pages: int, *inos: int) -> None:
        """Growing ``w`` by *pages* pages evicts exactly these files, in this order."""
        self.grow(pages)
        assert self.rec.evicted_inos() == list(inos)

    def names(self, parent: int) -> set[bytes]:
        d = self.vol.inode(parent).dir
        assert d is not None
        return set(d.entries)

    def intact(self, ino: int, pages: int, byte: int = 0x61) -> bool:
        return bytes(self.vol.read(ino, 0, pages * PAGE_SIZE)) == bytes([byte]) * pages * PAGE_SIZE

    def queued(self) -> list[tuple[str, int]]:
        """The purge order, oldest first: ("file", ino) or ("unit", ino)."""
        return [
            ("file" if isinstance(u, CacheFile) else "unit", u.ino) for u in self.vol.reclaim.order
        ]


def err(fn: Callable[[], object]) -> int:
    with pytest.raises(FsError) as info:
        fn()
    return info.value.errno


# -- the order --------------------------------------------------------------------------
def test_least_recently_opened_goes_first() -> None:
    s = Setup(cap_pages=8)
    a, b, c, d = (s.put(s.c, name, 2) for name in (b"a", b"b", b"c", b"d"))
    s.use(b)
    s.use(a)  # order now: c, d, b, a
    assert s.queued() == [("file", c), ("file", d), ("file", b), ("file", a)]
    s.grow(2)
    assert s.rec.take() == [("evicted", c, PurgeCause.CAP, 2)]
    assert s.names(s.c) == {b"a", b"b", b"d"}
    s.grow(3)  # needs 3 pages: d (2) is not enough, b goes too
    assert s.rec.evicted_inos() == [d, b]
    assert s.names(s.c) == {b"a"}
    assert s.intact(a, 2)
    assert s.vol.store.used_pages == 7


def test_creating_and_writing_count_as_the_open_they_are() -> None:
    """A file's place is its last open; a write through an old handle does not move it."""
    s = Setup(cap_pages=4)
    a = s.vol.create(s.c, b"a", 0o644, ROOT).ino
    b = s.put(s.c, b"b", 1)
    s.vol.write(a, 0, b"a" * PAGE_SIZE)  # written after b was created, opened before
    s.vol.release(a)
    s.check()
    s.evicts(3, a)
    assert s.intact(b, 1)


def test_one_order_with_volatile_range_units() -> None:
    """A unit marked before a file's last open goes before the file, one marked after it
    goes after; the units are of ordinary files and of a cache file alike."""
    s = Setup(cap_pages=8)
    early = s.put(s.o, b"early", 2)
    s.vol.mark_volatile(early, 0, 0)
    f = s.put(s.c, b"f", 2)
    late = s.put(s.o, b"late", 2)
    s.vol.mark_volatile(late, 0, 0)
    g = s.put(s.c, b"g", 2)
    assert s.queued() == [("unit", early), ("file", f), ("unit", late), ("file", g)]
    s.use(f)  # now the newest
    assert s.queued() == [("unit", early), ("unit", late), ("file", g), ("file", f)]
    s.grow(2)
    s.grow(2)
    s.grow(2)
    assert [(kind, ino) for kind, ino, _, _ in s.rec.take()] == [
        ("purged", early),
        ("purged", late),
        ("evicted", g),
    ]
    assert s.names(s.o) == {b"early", b"late"}  # purged units, not removed files
    assert s.names(s.c) == {b"f"}
    assert err(lambda: s.vol.read(early, 0, 1)) == errno.EIO
    s.evicts(2, f)


def test_joining_a_cache_directory_counts_as_a_use() -> None:
    s = Setup(cap_pages=6)
    old = s.put(s.o, b"old", 2)
    a = s.put(s.c, b"a", 2)
    s.vol.rename(s.o, b"old", s.c, b"old", 0)  # joins now: newer than a
    s.check()
    assert s.queued() == [("file", a), ("file", old)]
    s.vol.rename(s.c, b"old", s.c, b"renamed", 0)  # within cache directories: keeps its place
    s.check()
    assert s.queued() == [("file", a), ("file", old)]
    s.evicts(6, a, old)
    assert s.names(s.c) == set()


# -- what holds a file ------------------------------------------------------------------
def test_open_handles_hold_a_file_until_the_last_release() -> None:
    s = Setup(cap_pages=4)
    f = s.vol.create(s.c, b"f", 0o644, ROOT).ino  # created: open
    s.vol.write(f, 0, b"a" * 2 * PAGE_SIZE)
    s.check()
    assert s.queued() == []
    assert err(lambda: s.grow(3)) == errno.ENOSPC  # nothing evictable: the open file stays
    s.vol.open(f, os.O_RDONLY)
    s.vol.release(f)  # one of two handles
    s.check()
    assert s.queued() == []
    assert err(lambda: s.grow(3)) == errno.ENOSPC
    assert s.intact(f, 2)
    s.vol.release(f)  # the last one
    s.check()
    assert s.queued() == [("file", f)]
    s.evicts(3, f)


def test_an_open_file_is_skipped_and_keeps_its_place_after_release() -> None:
    s = Setup(cap_pages=4)
    a = s.put(s.c, b"a", 2)
    b = s.put(s.c, b"b", 2)
    s.vol.open(a, os.O_RDONLY)  # open, and now the newest
    s.check()
    s.evicts(2, b)
    s.vol.release(a)
    s.check()
    s.evicts(2, a)


def test_pins_hold_a_file() -> None:
    s = Setup(cap_pages=4)
    f = s.put(s.c, b"f", 2)
    s.vol.pin(f, 0, PAGE_SIZE, TGID, UID)  # one page of it holds the whole file
    s.check()
    assert s.queued() == []
    assert err(lambda: s.grow(3)) == errno.ENOSPC
    s.vol.pin(f, 0, PAGE_SIZE, TGID, UID)  # counted: two unpins needed
    s.vol.unpin(f, 0, PAGE_SIZE, TGID)
    s.check()
    assert s.queued() == []
    s.vol.unpin(f, 0, PAGE_SIZE, TGID)
    s.check()
    assert s.queued() == [("file", f)]
    # A pin that goes with its process frees the file as well.
    s.vol.pin(f, PAGE_SIZE, PAGE_SIZE, TGID + 1, UID)
    s.check()
    assert s.queued() == []
    assert s.vol.release_owner(TGID + 1) == 1
    s.check()
    s.evicts(3, f)


def test_a_pinned_file_keeps_its_place_in_the_order() -> None:
    s = Setup(cap_pages=6)
    a = s.put(s.c, b"a", 2)
    b = s.put(s.c, b"b", 2)
    s.vol.pin(a, 0, 0, TGID, UID)
    s.check()
    assert s.queued() == [("file", b)]
    s.vol.unpin(a, 0, 0, TGID)
    s.check()
    assert s.queued() == [("file", a), ("file", b)]  # a pin is not a use


def test_kept_files_stay_until_marked_volatile_as_a_whole() -> None:
    s = Setup(cap_pages=6)
    f = s.put(s.c, b"f", 3)
    assert s.vol.mark_nonvolatile(f, 0, 0) == []
    s.check()
    assert s.queued() == []
    assert err(lambda: s.grow(4)) == errno.ENOSPC
    s.vol.mark_volatile(f, 0, PAGE_SIZE)  # a part: still kept
    s.vol.mark_nonvolatile(f, 0, PAGE_SIZE)
    s.check()
    assert s.queued() == []
    s.vol.mark_volatile(f, 0, 0)  # the whole file: evictable again (and one volatile unit)
    s.check()
    assert ("file", f) in s.queued()
    s.vol.mark_nonvolatile(f, 0, 3 * PAGE_SIZE)  # from 0 covering the file: kept again
    s.check()
    assert s.queued() == []
    s.vol.mark_volatile(f, 0, 10 * PAGE_SIZE)  # from 0 past the end: the whole file
    s.vol.mark_nonvolatile(f, PAGE_SIZE, 0)  # a part (to the end): not kept, unit cut
    s.check()
    assert [kind for kind, _ in s.queued()] == ["file", "unit"]
    s.evicts(4, f)


def test_a_part_marked_non_volatile_does_not_keep_a_file() -> None:
    s = Setup(cap_pages=4)
    f = s.put(s.c, b"f", 3)
    s.vol.mark_nonvolatile(f, 0, 2 * PAGE_SIZE)
    s.vol.mark_nonvolatile(f, PAGE_SIZE, 0)
    s.check()
    assert s.queued() == [("file", f)]
    s.evicts(2, f)


def test_a_kept_file_stays_kept_out_of_and_back_into_a_cache_directory() -> None:
    s = Setup(cap_pages=4)
    f = s.put(s.c, b"f", 2)
    s.vol.mark_nonvolatile(f, 0, 0)
    s.vol.rename(s.c, b"f", s.o, b"f", 0)
    s.vol.rename(s.o, b"f", s.c, b"f", 0)
    s.check()
    assert s.queued() == []
    assert err(lambda: s.grow(3)) == errno.ENOSPC


def test_empty_files_directories_and_symlinks_are_never_evicted() -> None:
    s = Setup(cap_pages=4)
    empty = s.put(s.c, b"empty", 0)
    sub = s.mkdir(s.c, b"sub")
    s.vol.symlink(s.c, b"link", b"target", ROOT)
    s.check()
    assert s.queued() == []
    assert s.vol.reclaim.purge_all() == 0
    assert s.names(s.c) == {b"empty", b"sub", b"link"}
    assert s.vol.reclaim.statistics().cache_dir_files == 1
    s.vol.open(empty, os.O_WRONLY)
    s.vol.write(empty, 0, b"now some data")
    s.vol.release(empty)
    s.check()
    assert s.queued() == [("file", empty)]
    assert s.vol.inode(sub).cache_dir


def test_truncating_a_closed_file_to_nothing_takes_it_out_of_the_order() -> None:
    s = Setup(cap_pages=4)
    f = s.put(s.c, b"f", 2)
    s.vol.setattr(f, AttrChange(size=0))
    s.check()
    assert s.queued() == []
    s.vol.setattr(f, AttrChange(size=3 * PAGE_SIZE))  # a hole: still nothing to free
    s.check()
    assert s.queued() == []
    s.vol.open(f, os.O_WRONLY | os.O_TRUNC)
    s.vol.write(f, 0, b"x")
    s.vol.release(f)
    s.check()
    assert s.queued() == [("file", f)]


# -- names: renames and hard links ------------------------------------------------------
def test_renames_into_and_out_of_a_cache_directory() -> None:
    s = Setup(cap_pages=4)
    f = s.put(s.o, b"f", 2)
    assert s.vol.reclaim.statistics().cache_dir_files == 0
    s.vol.rename(s.o, b"f", s.c, b"f", 0)
    s.check()
    stats = s.vol.reclaim.statistics()
    assert (stats.cache_dir_files, stats.cache_dir_pages) == (1, 2)
    assert s.queued() == [("file", f)]
    s.vol.rename(s.c, b"f", s.o, b"g", 0)
    s.check()
    stats = s.vol.reclaim.statistics()
    assert (stats.cache_dir_files, stats.cache_dir_pages) == (0, 0)
    assert err(lambda: s.grow(3)) == errno.ENOSPC
    assert s.intact(f, 2)


def test_a_file_renamed_over_a_cache_file_replaces_it() -> None:
    s = Setup(cap_pages=8)
    old = s.put(s.c, b"x", 2)
    s.vol.lookup(s.c, b"x")  # the kernel knows it: it lingers after the rename
    new = s.put(s.o, b"x", 1)
    s.vol.rename(s.o, b"x", s.c, b"x", 0)
    s.check()
    assert s.queued() == [("file", new)]
    assert s.vol.reclaim.statistics().cache_dir_files == 1
    s.vol.forget(old, s.vol.inode(old).lookups)
    s.check()
    assert s.vol.inodes.get(old) is None


def test_rename_exchange_across_a_cache_directory() -> None:
    s = Setup(cap_pages=8)
    inside = s.put(s.c, b"x", 2)
    outside = s.put(s.o, b"y", 2)
    s.vol.rename(s.c, b"x", s.o, b"y", RENAME_EXCHANGE)
    s.check()
    assert s.queued() == [("file", outside)]
    s.evicts(6, outside)
    assert s.intact(inside, 2)
    assert s.names(s.c) == set()


def test_a_hard_link_outside_keeps_the_file() -> None:
    s = Setup(cap_pages=4)
    f = s.put(s.c, b"f", 2)
    s.vol.link(f, s.o, b"keep")
    s.check()
    assert s.queued() == []
    assert s.vol.reclaim.statistics().cache_dir_files == 0
    assert err(lambda: s.grow(3)) == errno.ENOSPC
    s.vol.unlink(s.o, b"keep")  # every name in a cache directory again: joins, as a use
    s.check()
    assert s.queued() == [("file", f)]
    s.evicts(3, f)


def test_eviction_removes_every_name_and_reports_them() -> None:
    s = Setup(cap_pages=4)
    c2 = s.mkdir(ROOT_INO, b"c2")
    s.vol.set_cache_dir(c2, True)
    f = s.put(s.c, b"f", 2)
    s.vol.link(f, s.c, b"f2")
    s.vol.link(f, c2, b"f3")
    s.check()
    assert s.queued() == [("file", f)]
    s.evicts(3, f)
    assert sorted(s.rec.names[f]) == sorted([(s.c, b"f"), (s.c, b"f2"), (c2, b"f3")])
    assert s.names(s.c) == set() and s.names(c2) == set()
    assert err(lambda: s.vol.lookup(s.c, b"f2")) == errno.ENOENT
    assert s.vol.store.used_pages == 3  # only w's pages


# -- turning cache directories on and off -----------------------------------------------
def test_turning_a_directory_into_a_cache_directory_and_back() -> None:
    s = Setup(cap_pages=6)
    a = s.put(s.o, b"a", 2)
    b = s.put(s.o, b"b", 2)
    s.vol.link(b, ROOT_INO, b"b-elsewhere")  # a name outside: stays ordinary
    s.vol.set_cache_dir(s.o, True)
    s.check()
    assert s.vol.is_cache_dir(s.o)
    assert s.queued() == [("file", a)]
    assert s.vol.reclaim.statistics().cache_dir_files == 1
    s.vol.set_cache_dir(s.o, False)  # its files are kept at once
    s.check()
    assert s.queued() == []
    assert s.vol.reclaim.statistics().cache_dir_files == 0
    assert err(lambda: s.grow(3)) == errno.ENOSPC
    assert s.intact(a, 2) and s.intact(b, 2)
    s.vol.set_cache_dir(s.o, True)
    s.vol.set_cache_dir(s.o, True)  # again: no change, no new place in the order
    s.check()
    s.evicts(3, a)


def test_turning_off_the_cache_directory_of_an_open_file() -> None:
    s = Setup(cap_pages=4)
    f = s.vol.create(s.c, b"f", 0o644, ROOT).ino
    s.vol.write(f, 0, b"a" * 2 * PAGE_SIZE)
    s.vol.set_cache_dir(s.c, False)
    s.vol.release(f)
    s.check()
    assert s.queued() == []
    s.vol.set_cache_dir(s.c, True)
    s.check()
    assert s.queued() == [("file", f)]


def test_directories_inherit_the_setting_when_made() -> None:
    s = Setup(cap_pages=8)
    sub = s.mkdir(s.c, b"sub")
    subsub = s.mkdir(sub, b"subsub")
    plain = s.mkdir(s.o, b"plain")
    assert s.vol.is_cache_dir(sub) and s.vol.is_cache_dir(subsub)
    assert not s.vol.is_cache_dir(plain)
    deep = s.put(subsub, b"deep", 2)
    assert s.queued() == [("file", deep)]
    s.vol.set_cache_dir(s.c, False)  # existing subdirectories keep theirs
    s.check()
    assert s.vol.is_cache_dir(sub)
    assert s.queued() == [("file", deep)]
    assert not s.vol.is_cache_dir(s.mkdir(s.c, b"later"))
    s.vol.rename(s.c, b"sub", s.o, b"sub", 0)  # moving a directory changes nothing
    s.check()
    assert s.vol.is_cache_dir(sub)
    assert err(lambda: s.vol.is_cache_dir(deep)) == errno.ENOTDIR


def test_a_mount_that_is_one_cache_directory() -> None:
    s = Setup(cap_pages=4, cache_dir=True)
    assert s.vol.is_cache_dir(ROOT_INO) and s.vol.is_cache_dir(s.o)
    f = s.put(s.o, b"f", 2)
    s.vol.release(s.w)  # w is in the root: a cache file too, now closed, newest
    s.check()
    assert s.queued() == [("file", f)]  # w holds nothing yet
    s.vol.open(s.w, os.O_WRONLY)
    s.evicts(3, f)


# -- evicted inodes and ghost names -----------------------------------------------------
def evict_one(s: Setup, name: bytes = b"f", lookups: int = 1) -> int:
    """Put a 2-page file in ``c``, let the kernel look it up, evict it (cap 4 pages)."""
    f = s.put(s.c, name, 2)
    for _ in range(lookups):
        s.vol.lookup(s.c, name)
    s.evicts(3, f)
    return f


def test_an_evicted_inode_answers_estale_and_its_name_enoent() -> None:
    s = Setup(cap_pages=4)
    f = evict_one(s)
    inode = s.vol.inodes.get(f)
    assert inode is not None and inode.evicted and inode.data is None
    for call in (
        lambda: s.vol.inode(f),
        lambda: s.vol.open(f),
        lambda: s.vol.read(f, 0, 1),
        lambda: s.vol.setattr(f, AttrChange(mode=0o600)),
        lambda: s.vol.getxattr(f, b"user.x"),
        lambda: s.vol.pin(f, 0, 0, TGID, UID),
        lambda: s.vol.mark_volatile(f, 0, 0),
        lambda: s.vol.link(f, s.c, b"again"),
    ):
        assert err(call) == errno.ESTALE
    assert err(lambda: s.vol.lookup(s.c, b"f")) == errno.ENOENT
    assert err(lambda: s.vol.unlink(s.c, b"f")) == errno.ENOENT
    assert s.vol.statfs().blocks_free == 1
    s.check()


def test_ghosts_are_seen_only_by_ghost_lookup_until_unlinked() -> None:
    s = Setup(cap_pages=4)
    f = evict_one(s, lookups=0)
    assert s.vol.ghosts == {(s.c, b"f"): f}
    assert s.vol.ghost_lookup(s.c, b"nope") is None
    ghost = s.vol.ghost_lookup(s.c, b"f")
    assert ghost is not None and ghost.ino == f and ghost.lookups == 2  # create's + this one
    s.check()
    assert s.vol.ghost_unlink(s.c, b"f") is True
    assert s.vol.ghost_unlink(s.c, b"f") is False
    assert s.vol.ghosts == {}
    s.check()
    assert s.vol.inodes.get(f) is not None  # the kernel still holds it
    s.vol.forget(f, 2)
    s.check()
    assert s.vol.inodes.get(f) is None


def test_forget_first_then_the_last_ghost_frees_the_inode() -> None:
    s = Setup(cap_pages=4)
    c2 = s.mkdir(ROOT_INO, b"c2")
    s.vol.set_cache_dir(c2, True)
    f = s.put(s.c, b"f", 2)
    s.vol.link(f, c2, b"g")  # lookups: 2 (create, link)
    s.evicts(3, f)
    assert s.vol.ghosts == {(s.c, b"f"): f, (c2, b"g"): f}
    s.vol.forget(f, 2)
    s.check()
    assert s.vol.inodes.get(f) is not None  # two ghosts hold it
    assert s.vol.ghost_unlink(c2, b"g")
    s.check()
    assert s.vol.inodes.get(f) is not None
    assert s.vol.bury(s.c, b"f")  # the kernel was told otherwise
    s.check()
    assert s.vol.inodes.get(f) is None
    assert s.vol.ghosts == {}


@pytest.mark.parametrize("reuse", ["create", "mkdir", "symlink", "link", "rename", "mknod"])
def test_reusing_a_ghost_name_buries_the_ghost(reuse: str) -> None:
    s = Setup(cap_pages=4)
    other = s.put(s.o, b"other", 0)
    f = evict_one(s)
    s.vol.forget(f, 2)  # create's lookup and evict_one's
    s.check()
    assert s.vol.inodes.get(f) is not None  # the ghost holds it
    vol = s.vol
    if reuse == "create":
        new = vol.create(s.c, b"f", 0o644, ROOT)
        vol.release(new.ino)
    elif reuse == "mkdir":
        new = vol.mkdir(s.c, b"f", 0o755, ROOT)
    elif reuse == "symlink":
        new = vol.symlink(s.c, b"f", b"t", ROOT)
    elif reuse == "mknod":
        new = vol.mknod(s.c, b"f", 0o644, 0, ROOT)
    elif reuse == "link":
        new = vol.link(other, s.c, b"f")
    else:
        vol.rename(s.o, b"other", s.c, b"f", 0)
        new = vol.inode(other)
    s.check()
    assert vol.ghosts == {}
    assert vol.inodes.get(f) is None
    assert vol.ghost_unlink(s.c, b"f") is False  # the unlinker comes late: not a ghost
    assert vol.lookup(s.c, b"f").ino == new.ino
    s.check()


def test_forget_of_an_evicted_inode_frees_it_and_its_metadata() -> None:
    s = Setup(cap_pages=4)
    charged = s.vol.budget.charged
    inodes = len(s.vol.inodes)
    f = s.put(s.c, b"f", 2)
    s.vol.setxattr(f, b"user.tag", b"v" * 100)
    s.vol.lookup(s.c, b"f")
    s.evicts(3, f)
    assert s.vol.ghost_unlink(s.c, b"f")
    s.vol.forget(f, 1)
    s.check()
    assert s.vol.inodes.get(f) is not None  # one lookup left
    s.vol.forget(f, 1)
    s.check()
    assert s.vol.inodes.get(f) is None
    assert len(s.vol.inodes) == inodes
    assert s.vol.budget.charged == charged  # the name and the xattr went with it
    s.vol.forget(f, 1)  # a late forget of what is gone: logged, ignored
    s.check()


def test_evicting_a_file_leaves_the_pins_of_others() -> None:
    """Eviction drops the evicted file's bookkeeping only: a pinned file stays pinned."""
    s = Setup(cap_pages=6)
    keep = s.put(s.c, b"keep", 1)
    s.vol.pin(keep, 0, 0, TGID, UID)
    f = s.put(s.c, b"f", 2)
    s.evicts(4, f)
    assert [(p.start, p.end, p.tgid) for p in s.vol.pins(keep)] == [(0, 1, TGID)]
    s.check()


# -- statistics -------------------------------------------------------------------------
def test_statistics_count_files_pages_and_evictions_by_cause() -> None:
    s = Setup(cap_pages=16)
    stats = s.vol.reclaim.statistics()
    assert (stats.cache_dir_files, stats.cache_dir_pages) == (0, 0)
    assert stats.evicted_files == dict.fromkeys(PurgeCause, 0)
    inos = [s.put(s.c, b"f%d" % i, i + 1) for i in range(5)]  # 1 + 2 + 3 + 4 + 5 pages
    s.put(s.o, b"ordinary", 1)
    empty = s.put(s.c, b"empty", 0)
    stats = s.vol.reclaim.statistics()
    assert (stats.cache_dir_files, stats.cache_dir_pages) == (6, 15)
    s.grow(2)  # 16 - 15 - 1 = 0 free: f0 (1 page) and f1 (2 pages) go
    assert s.rec.evicted_inos() == inos[:2]
    assert s.vol.reclaim.for_pressure(1) == 3  # f2
    assert s.vol.reclaim.purge_all() == 2  # f3 and f4
    s.check()
    stats = s.vol.reclaim.statistics()
    assert stats.evicted_files == {
        PurgeCause.CAP: 2,
        PurgeCause.PRESSURE: 1,
        PurgeCause.EXPLICIT: 2,
    }
    assert stats.evicted_pages == {
        PurgeCause.CAP: 3,
        PurgeCause.PRESSURE: 3,
        PurgeCause.EXPLICIT: 9,
    }
    assert stats.purged_pages == dict.fromkeys(PurgeCause, 0)  # evictions are not purges
    assert (stats.cache_dir_files, stats.cache_dir_pages) == (1, 0)  # the empty one
    assert s.names(s.c) == {b"empty"}
    assert s.vol.inode(empty).nlink == 1
    assert stats.oldest_age == 0.0 and stats.purgeable_units == 0


def test_cache_dir_pages_follow_writes_truncates_and_unlinks() -> None:
    s = Setup(cap_pages=16)

    def counted() -> tuple[int, int]:
        stats = s.vol.reclaim.statistics()
        return stats.cache_dir_files, stats.cache_dir_pages

    f = s.vol.create(s.c, b"f", 0o644, ROOT).ino
    assert counted() == (1, 0)
    s.vol.write(f, 0, b"x" * 3 * PAGE_SIZE)
    assert counted() == (1, 3)
    s.vol.setattr(f, AttrChange(size=PAGE_SIZE))
    assert counted() == (1, 1)
    s.vol.release(f)
    s.vol.unlink(s.c, b"f")
    assert counted() == (0, 0)
    s.check()


def test_oldest_age_tells_how_long_the_head_of_the_order_waited() -> None:
    s = Setup(cap_pages=8)
    assert s.vol.reclaim.statistics().oldest_age == 0.0
    f = s.put(s.c, b"f", 1)
    head = s.vol.reclaim.order.oldest()
    assert head is not None and head.ino == f
    assert 0.0 <= s.vol.reclaim.statistics().oldest_age < 60.0


# -- the cap ----------------------------------------------------------------------------
def test_writes_never_fail_while_an_evictable_file_is_resident() -> None:
    """Random cache-file writes, uses, keeps and ordinary writes: ENOSPC only when nothing
    is left to purge or evict, and then only because the non-evictable data fills the cap."""
    rng = random.Random(11)
    s = Setup(cap_pages=32)
    files: dict[bytes, int] = {}
    failures = 0
    for step in range(400):
        name = b"f%d" % rng.randrange(12)
        action = rng.random()
        if action < 0.6:
            pages = rng.randrange(1, 6)
            if name in s.names(s.c):
                ino = files[name]
                s.vol.open(ino, os.O_WRONLY | os.O_TRUNC)
            else:  # never made, or evicted: a miss, made again
                ino = files[name] = s.vol.create(s.c, name, 0o644, ROOT).ino
            try:
                s.vol.write(ino, 0, bytes([step % 251 + 1]) * pages * PAGE_SIZE)
            except FsError as e:
                assert e.errno == errno.ENOSPC
                failures += 1
                assert len(s.vol.reclaim.order) == 0, f"step {step}: ENOSPC with evictable data"
            s.vol.release(ino)
        elif action < 0.75:
            inode = s.vol.inodes.get(files[name]) if name in s.names(s.c) else None
            if inode is not None:
                if rng.random() < 0.5:
                    s.vol.mark_nonvolatile(inode.ino, 0, 0)  # kept
                else:
                    s.vol.mark_nonvolatile(inode.ino, 0, PAGE_SIZE)  # a part: no change
                    s.vol.mark_volatile(inode.ino, 0, 0)  # evictable again
                    s.vol.mark_nonvolatile(inode.ino, 1, 0)  # the unit is taken back
        elif action < 0.9:
            try:
                s.grow(1)
            except FsError as e:
                assert e.errno == errno.ENOSPC
                failures += 1
                assert len(s.vol.reclaim.order) == 0, f"step {step}: ENOSPC with evictable data"
                s.vol.setattr(s.w, AttrChange(size=0))
                s.w_pages = 0
        else:
            s.vol.reclaim.for_pressure(rng.randrange(1, 4))
        s.check()
    stats = s.vol.reclaim.statistics()
    assert sum(stats.evicted_files.values()) > 20 and failures > 0


def test_nothing_outside_a_cache_directory_is_ever_evicted() -> None:
    """Ordinary files fill the cap next to held cache files: ENOSPC, every byte intact."""
    s = Setup(cap_pages=64)
    sub = s.mkdir(s.o, b"sub")
    ordinary = {s.put(d, b"f%d" % i, 3, byte=i + 1): i + 1 for i, d in enumerate([s.o, sub] * 5)}
    linked = s.put(s.c, b"linked", 2, byte=0x21)
    s.vol.link(linked, s.o, b"linked")
    kept = s.put(s.c, b"kept", 2, byte=0x22)
    s.vol.mark_nonvolatile(kept, 0, 0)
    pinned = s.put(s.c, b"pinned", 2, byte=0x23)
    s.vol.pin(pinned, 0, 0, TGID, UID)
    held = s.vol.create(s.c, b"open", 0o644, ROOT).ino
    s.vol.write(held, 0, b"\x24" * 2 * PAGE_SIZE)
    s.check()
    assert s.queued() == []
    while True:
        try:
            s.grow(1)
        except FsError as e:
            assert e.errno == errno.ENOSPC
            break
    assert s.vol.store.free_pages == 0
    assert s.rec.take() == []
    for ino, byte in ordinary.items():
        assert s.intact(ino, 3, byte)
    for ino, byte in ((linked, 0x21), (kept, 0x22), (pinned, 0x23), (held, 0x24)):
        assert s.intact(ino, 2, byte)
    assert s.vol.reclaim.purge_all() == 0
    assert s.vol.reclaim.for_pressure(64) == 0
    assert s.rec.take() == []
    s.check()


def test_metadata_full_does_not_stop_evictions() -> None:
    """Eviction only gives metadata back (names, later the inode)."""
    s = Setup(cap_pages=4)
    s.put(s.c, b"f", 2)
    before = s.vol.budget.charged
    s.grow(3)
    assert s.vol.budget.charged < before
    s.check()


def test_a_file_whose_pages_a_range_purge_took_is_evicted_next() -> None:
    """Its pages are one volatile unit marked before its last open, so the unit goes first;
    the file keeps its place and is evicted next, for no pages: a reader then gets ENOENT
    (a miss), not EIO from the purged pages."""
    s = Setup(cap_pages=4)
    f = s.put(s.c, b"f", 2)
    s.vol.mark_volatile(f, 0, 0)  # setfattr on the path: no open
    s.use(f)  # read later: the file is now newer than its unit
    assert s.queued() == [("unit", f), ("file", f)]
    s.vol.write(s.w, 0, b"w" * 4 * PAGE_SIZE)  # needs 2 pages: the unit is enough
    assert [(kind, ino) for kind, ino, _, _ in s.rec.take()] == [("purged", f)]
    assert s.queued() == [("file", f)]
    s.check()
    assert s.vol.reclaim.purge_all() == 0  # evicted, though it freed no page
    assert s.names(s.c) == set()
    assert [(kind, ino) for kind, ino, _, _ in s.rec.take()] == [("evicted", f)]
    s.check()


def test_creating_a_file_at_the_inode_limit_evicts_rather_than_fails() -> None:
    """One-page files in a cache directory can fill the inode limit before the cap: the
    next create evicts the least recently used of them instead of failing with ENOSPC."""
    s = Setup(cap_pages=64)
    s.vol.max_inodes = 16
    made = [s.put(s.c, b"f%d" % i, 1) for i in range(16 - len(s.vol.inodes))]
    assert len(s.vol.reclaim.order) == len(made)  # all evictable
    s.put(s.c, b"one more", 1)
    assert [ino for kind, ino, _, _ in s.rec.take() if kind == "evicted"] == made[:1]
    s.check()


def test_metadata_shortage_evicts_files_but_never_the_one_being_changed() -> None:
    s = Setup(cap_pages=64)
    made = [s.put(s.c, b"f%d" % i, 1) for i in range(8)]
    s.vol.budget.cap = s.vol.budget.used + 100  # no room for an xattr
    s.vol.setxattr(made[0], b"user.k", b"v" * 200)  # made[0] is the oldest: spared
    evicted = [ino for kind, ino, _, _ in s.rec.take() if kind == "evicted"]
    assert evicted == [made[1]]
    assert s.vol.getxattr(made[0], b"user.k") == b"v" * 200
    s.check()
