"""Directory cookies and the inode table, without FUSE."""

from __future__ import annotations

import stat

from hypothesis import given, settings
from hypothesis import strategies as st

from vrangefs.inodes import DAY_NS, ROOT_INO, Directory, Inode, InodeTable
from vrangefs.pagestore import PAGE_SIZE, FileData, PageStore


def names(n: int, prefix: str = "f") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def listing(d: Directory) -> list[bytes]:
    return [name for _c, name in list(d.after(0))]


def test_cookies_are_stable_under_add_and_remove() -> None:
    d = Directory()
    for i, name in enumerate(names(200)):
        d.add(name, 100 + i)
    before = dict((name, c) for c, name in list(d.after(0)))
    for name in names(200)[::3]:
        assert d.remove(name) == 100 + int(name[1:])
    d.add(b"late", 999)
    after = {name: c for c, name in list(d.after(0))}
    for name, cookie in after.items():
        if name != b"late":
            assert cookie == before[name]
    assert after[b"late"] > max(before.values())
    assert len(d) == 200 - len(names(200)[::3]) + 1


def test_listing_is_in_insertion_order_and_resumes_after_cookie() -> None:
    d = Directory()
    for i, name in enumerate(names(10)):
        d.add(name, i + 2)
    entries = list(d.after(0))
    assert [n for _c, n in entries] == names(10)
    cookies = [c for c, _n in entries]
    assert cookies == sorted(cookies)
    assert len(set(cookies)) == 10
    assert all(c > 0 for c in cookies)  # 0 is the start of a listing
    assert [n for _c, n in list(d.after(cookies[4]))] == names(10)[5:]
    assert list(d.after(cookies[-1])) == []


def test_replacing_an_entry_gives_it_a_new_cookie() -> None:
    d = Directory()
    d.add(b"a", 2)
    d.add(b"b", 3)
    (c_a, _), (c_b, _) = list(d.after(0))
    d.add(b"a", 4)  # e.g. rename over an existing name
    assert d.entries[b"a"] == 4
    assert [n for _c, n in list(d.after(c_b))] == [b"a"]
    assert len(d) == 2
    assert c_a not in [c for c, _n in list(d.after(0))]


def test_removed_cookie_still_resumes_correctly() -> None:
    d = Directory()
    for i, name in enumerate(names(5)):
        d.add(name, i)
    cookies = [c for c, _n in list(d.after(0))]
    d.remove(b"f2")
    assert [n for _c, n in list(d.after(cookies[2]))] == [b"f3", b"f4"]
    assert [n for _c, n in list(d.after(cookies[1]))] == [b"f3", b"f4"]


def test_compaction_keeps_cookies() -> None:
    d = Directory()
    for i, name in enumerate(names(500)):
        d.add(name, i)
    cookie_of = {n: c for c, n in list(d.after(0))}
    keep = names(500)[::10]
    for name in names(500):
        if name not in keep:
            d.remove(name)  # crosses the compaction threshold many times
    assert listing(d) == keep
    assert {n: c for c, n in list(d.after(0))} == {n: cookie_of[n] for n in keep}
    mid = cookie_of[keep[20]]
    assert [n for _c, n in list(d.after(mid))] == keep[21:]


# A listing read a few entries at a time while entries come and go between the
# pages must never repeat an entry, and must return every entry that existed for
# the whole listing (POSIX leaves entries added or removed meanwhile unspecified).
actions = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "read"]), st.integers(0, 300)), max_size=200
)


@settings(max_examples=80, deadline=None)
@given(initial=st.integers(0, 150), steps=actions, page=st.integers(1, 17))
def test_paged_listing_never_skips_or_repeats(
    initial: int, steps: list[tuple[str, int]], page: int
) -> None:
    d = Directory()
    fresh = 0
    for name in names(initial):
        d.add(name, 1)
    stable = set(d.entries)  # present from start to end
    seen: list[bytes] = []
    cookie = 0
    done = False

    def read_page() -> None:
        nonlocal cookie, done
        batch = list(d.after(cookie))[:page]
        if not batch:
            done = True
        for c, name in batch:
            assert c > cookie
            seen.append(name)
            cookie = c

    for action, k in steps:
        if action == "add":
            fresh += 1
            d.add(f"new{fresh}".encode(), 1)
        elif action == "remove" and d.entries:
            victim = sorted(d.entries)[k % len(d.entries)]
            d.remove(victim)
            stable.discard(victim)
        elif not done:
            read_page()
    while not done:
        read_page()
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert stable <= set(seen), f"skipped: {sorted(stable - set(seen))[:5]}"


def test_inode_table_never_reuses_numbers() -> None:
    table = InodeTable()
    root = table.new(stat.S_IFDIR | 0o755, 0, 0)
    assert root.ino == ROOT_INO
    a = table.new(stat.S_IFREG | 0o644, 0, 0)
    table.remove(a.ino)
    b = table.new(stat.S_IFREG | 0o644, 0, 0)
    assert b.ino > a.ino
    assert table.get(a.ino) is None
    assert table.get(b.ino) is b
    assert len(table) == 2
    assert {i.ino for i in table} == {ROOT_INO, b.ino}


def test_inode_blocks_count_resident_pages_only() -> None:
    inode = Inode(2, stat.S_IFREG | 0o644, 0, 0)
    inode.data = FileData(PageStore(1 << 20))
    inode.data.truncate(100 * PAGE_SIZE)
    assert inode.blocks == 0
    assert inode.size == 100 * PAGE_SIZE
    inode.data.write(PAGE_SIZE - 1, b"ab")
    assert inode.blocks == 2 * PAGE_SIZE // 512


def test_inode_alive_while_anything_holds_it() -> None:
    inode = Inode(5, stat.S_IFREG | 0o644, 0, 0)
    held = []
    for attr in ("nlink", "lookups", "opens"):
        setattr(inode, attr, 1)
        held.append(inode.alive)
        setattr(inode, attr, 0)
    assert held == [True, True, True]
    assert inode.alive is False


def test_relatime_rule() -> None:
    inode = Inode(3, stat.S_IFREG | 0o644, 0, 0)
    t = inode.mtime_ns
    inode.atime_ns = t - 10  # older than mtime: updated
    inode.touch_atime_relatime()
    assert inode.atime_ns >= t
    inode.atime_ns = fresh = inode.mtime_ns + 1  # newer than mtime/ctime and recent: kept
    inode.ctime_ns = inode.mtime_ns
    inode.touch_atime_relatime()
    assert inode.atime_ns == fresh
    inode.mtime_ns = inode.ctime_ns = t - 2 * DAY_NS
    inode.atime_ns = t - 2 * DAY_NS + 1  # newer than both but over a day old: updated
    inode.touch_atime_relatime()
    assert inode.atime_ns >= t
