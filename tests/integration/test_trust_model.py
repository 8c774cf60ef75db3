"""Who may do what with volatile ranges: the trust model, with a real second user.

A user is created for the module with ``useradd`` (``vrtest`` and random hex, removed with
``userdel -r`` afterwards); tests act as that user in forked children that drop to its uid
and gid, and through ``runuser``. The rules checked are the kernel's, because the mount uses
``default_permissions`` and the ``user.vrange.*`` names are ``user.*`` xattrs:

- marking or unmarking needs write permission on the file (EACCES without it, whoever owns
  the file, and whatever the open file descriptor's mode);
- reading ``user.vrange.volatile`` or ``user.vrange.purged`` needs read permission (EACCES);
- ``purge all`` needs write permission on the mount root (EACCES), and on a sticky root
  ownership as well (EPERM), as the VFS enforces for ``user.*`` on sticky directories;
- without ``allow_other`` FUSE refuses every other user everything (EACCES).

Every refused attempt is followed by a check, as root, that nothing changed: the listings,
the content, size and blocks of each file and the mount's purge counters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter
from tests.integration.vrange_helpers import (
    NONVOLATILE,
    PAGE,
    PURGE,
    PURGED,
    STATS,
    VOLATILE,
    errno_or_value,
    in_child,
    mark,
    pattern,
    purge_all,
    purged,
    stats,
    volatile,
)

COUNTERS = ("purge_events", "purged_bytes_total", "resident_bytes", "volatile_bytes")
DENIED = {"errno": errno.EACCES}
NOT_OWNER = {"errno": errno.EPERM}


# -- the other user -------------------------------------------------------------------------
@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """A new user with its own group, removed (home included) when the module ends."""
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        if os.environ.get("CI"):
            pytest.fail("useradd/userdel are missing, and CI is set")
        pytest.skip("useradd/userdel are missing")
    name = f"vrtest{secrets.token_hex(4)}"
    argv = ["useradd", "--create-home", "--user-group", "--shell", "/usr/sbin/nologin", name]

    def created() -> bool:
        result = _run(argv)
        # 10: /etc/passwd or /etc/group is locked by another useradd; try again
        assert result.returncode in (0, 10), f"useradd failed: {result.stderr}"
        return result.returncode == 0

    wait_until(created, 30, "useradd succeeds")
    try:
        entry = pwd.getpwnam(name)
        assert entry.pw_uid != 0 and entry.pw_gid != 0
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:

        def deleted() -> bool:
            result = _run(["userdel", "--remove", name])
            assert result.returncode in (0, 10), f"userdel failed: {result.stderr}"
            return result.returncode == 0

        wait_until(deleted, 30, f"userdel -r {name} succeeds")
        with pytest.raises(KeyError):
            pwd.getpwnam(name)


def as_user(user: User, fn: Callable[[], object]) -> object:
    """Run *fn* in a forked child whose real and effective ids are *user*'s, no other groups."""

    def drop_and_run() -> object:
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)
        assert (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (
            user.uid,
            user.uid,
            user.gid,
            user.gid,
        )
        return fn()

    return in_child(drop_and_run)


def attempts(user: User, table: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Each function's value, or ``{"errno": N}``, run as *user* in one child."""

    def run_all() -> object:
        return {what: errno_or_value(fn) for what, fn in table.items()}

    got = as_user(user, run_all)
    assert isinstance(got, dict)
    return got


# -- state, as root sees it -----------------------------------------------------------------
def file_state(f: Path) -> tuple[object, ...]:
    st = f.stat()
    try:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
    except OSError as e:
        digest = f"errno {e.errno}"
    return (volatile(f), purged(f), digest, st.st_size, st.st_blocks, st.st_mode, st.st_uid)


def state(mount: Mount, *files: Path) -> tuple[object, ...]:
    s = stats(mount.path)
    root = mount.path.stat()
    return (
        tuple(file_state(f) for f in files),
        {k: s[k] for k in COUNTERS},
        s["pid"],
        (root.st_mode, root.st_uid, root.st_gid),
    )


def make(path: Path, pages: int, mode: int, owner: User | None = None, marks: str = "") -> Path:
    path.write_bytes(pattern(pages, seed=len(path.name)))
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    path.chmod(mode)
    if marks:
        mark(path, marks)
    return path


@contextlib.contextmanager
def unchanged(mount: Mount, *files: Path) -> Iterator[None]:
    """Assert that the block leaves the files and the mount's counters as they were."""
    before = state(mount, *files)
    yield
    assert state(mount, *files) == before


# -- allow_other: the kernel checks modes for every user ------------------------------------
@pytest.fixture
def public_mount(mounter: Mounter) -> Mount:
    """A fresh mount that other users may use; its root is root's, mode 1777 (sticky)."""
    m = mounter.mount("64M", options=["allow_other"])
    root = m.path.stat()
    assert (root.st_uid, root.st_mode & 0o7777) == (0, 0o1777)
    return m


def test_another_user_cannot_change_or_read_what_modes_forbid(
    public_mount: Mount, user: User
) -> None:
    top = public_mount.path
    public = make(top / "public", 3, 0o644, marks="0,4096")  # root's, world-readable
    private = make(top / "private", 3, 0o600, marks="0,4096")  # root's, root only
    read_only = make(top / "read-only", 3, 0o444, owner=user)  # the user's, not writable

    def fsetxattr_read_only_fd() -> object:
        fd = os.open(public, os.O_RDONLY)
        try:
            os.setxattr(fd, VOLATILE, b"0,0")
        finally:
            os.close(fd)
        return None

    with unchanged(public_mount, public, private, read_only):
        got = attempts(
            user,
            {
                "mark public": lambda: os.setxattr(public, VOLATILE, b"0,0"),
                "unmark public": lambda: os.setxattr(public, NONVOLATILE, b"0,0"),
                "mark public through an fd": fsetxattr_read_only_fd,
                "remove from public": lambda: os.removexattr(public, VOLATILE),
                "mark private": lambda: os.setxattr(private, VOLATILE, b"0,0"),
                "unmark private": lambda: os.setxattr(private, NONVOLATILE, b"0,0"),
                "purged of private": lambda: os.getxattr(private, PURGED).decode(),
                "volatile of private": lambda: os.getxattr(private, VOLATILE).decode(),
                "mark own read-only": lambda: os.setxattr(read_only, VOLATILE, b"0,0"),
                "purge on the sticky root": lambda: os.setxattr(top, PURGE, b"all"),
                # allowed, and changing nothing:
                "volatile of public": lambda: os.getxattr(public, VOLATILE).decode(),
                "purged of public": lambda: os.getxattr(public, PURGED).decode(),
                "stats": lambda: os.getxattr(top, STATS).decode().startswith("pid="),
            },
        )
    assert got == {
        # user.* xattrs need write permission: inode_permission(MAY_WRITE) -> EACCES
        "mark public": DENIED,
        "unmark public": DENIED,
        "mark public through an fd": DENIED,
        "remove from public": DENIED,
        "mark private": DENIED,
        "unmark private": DENIED,
        # ...and read permission to read: EACCES
        "purged of private": DENIED,
        "volatile of private": DENIED,
        # owning the file is not enough without write permission
        "mark own read-only": DENIED,
        # a sticky directory: user.* needs ownership (xattr_permission -> EPERM)
        "purge on the sticky root": NOT_OWNER,
        "volatile of public": "0,4096\n",
        "purged of public": "",
        "stats": True,
    }


def test_purge_all_needs_write_permission_on_a_root_that_is_not_sticky(
    public_mount: Mount, user: User
) -> None:
    top = public_mount.path
    victim = make(top / "victim", 2, 0o666, marks="0,0")
    top.chmod(0o755)  # root's, not writable by others, not sticky
    with unchanged(public_mount, victim):
        got = attempts(user, {"purge": lambda: os.setxattr(top, PURGE, b"all")})
    assert got == {"purge": DENIED}
    top.chmod(0o777)  # writable by all, not sticky: write permission is enough
    got = attempts(user, {"purge": lambda: os.setxattr(top, PURGE, b"all")})
    assert got == {"purge": None}
    assert purged(victim) == [(0, 2 * PAGE)]
    assert stats(top)["purge_events"] == 1


def test_another_user_marks_what_it_may_write(public_mount: Mount, user: User) -> None:
    top = public_mount.path
    own = make(top / "own", 3, 0o644, owner=user)
    world_writable = make(top / "world-writable", 3, 0o666)  # root's
    group_writable = make(top / "group-writable", 3, 0o664)
    os.chown(group_writable, 0, user.gid)  # root's, the user's group may write
    created = top / "created"  # made by the user in the 1777 root

    def create_and_mark() -> object:
        created.write_bytes(pattern(2))
        os.setxattr(created, VOLATILE, b"0,0")
        return os.getxattr(created, VOLATILE).decode()

    def mark_unmark(f: Path) -> Callable[[], object]:
        def run() -> object:
            os.setxattr(f, VOLATILE, b"0,0")
            marked = os.getxattr(f, VOLATILE).decode()
            os.setxattr(f, NONVOLATILE, b"4096,4096")  # splits the unit
            return [marked, os.getxattr(f, VOLATILE).decode(), os.getxattr(f, PURGED).decode()]

        return run

    got = attempts(
        user,
        {
            "own": mark_unmark(own),
            "world-writable": mark_unmark(world_writable),
            "group-writable": mark_unmark(group_writable),
            "created": create_and_mark,
        },
    )
    both_ends = "0,4096\n8192,4096\n"
    assert got == {
        "own": ["0,12288\n", both_ends, ""],
        "world-writable": ["0,12288\n", both_ends, ""],
        "group-writable": ["0,12288\n", both_ends, ""],
        "created": "0,8192\n",
    }
    # root sees the same state: it belongs to the inode, not to whoever marked it
    for f in (own, world_writable, group_writable):
        assert volatile(f) == [(0, PAGE), (2 * PAGE, PAGE)]
    assert created.stat().st_uid == user.uid
    assert volatile(created) == [(0, 2 * PAGE)]


# -- a root the user owns -----------------------------------------------------------------
def test_the_owner_of_the_root_may_purge_all(mounter: Mounter, user: User) -> None:
    m = mounter.mount(
        "64M", options=["allow_other", f"uid={user.uid}", f"gid={user.gid}", "mode=0755"]
    )
    top = m.path
    root = top.stat()
    assert (root.st_uid, root.st_gid, root.st_mode & 0o7777) == (user.uid, user.gid, 0o755)
    cache = make(top / "cache", 2, 0o644, marks="0,0")  # root's file, in the user's root
    keep = make(top / "keep", 2, 0o644)  # not volatile: never purged

    def purge_then_make_sticky_and_purge_again() -> object:
        os.setxattr(top, PURGE, b"all")
        first = os.getxattr(cache, PURGED).decode()
        os.chmod(top, 0o1777)  # the owner may; sticky now, and still the owner's
        os.setxattr(top, PURGE, b"all")
        return [first, oct(os.stat(top).st_mode & 0o7777)]

    got = attempts(user, {"purges": purge_then_make_sticky_and_purge_again})
    assert got == {"purges": ["0,8192\n", "0o1777"]}
    assert purged(cache) == [(0, 2 * PAGE)]
    assert purged(keep) == []
    assert keep.read_bytes() == pattern(2, seed=len("keep"))
    assert stats(top)["purge_events"] == 1  # the second purge found nothing left


# -- without allow_other: nobody but the mounter ------------------------------------------
def test_without_allow_other_every_other_user_is_refused(mounter: Mounter, user: User) -> None:
    m = mounter.mount("64M")  # no allow_other
    top = m.path
    f = make(top / "f", 2, 0o666, marks="0,4096")  # modes would allow everything
    top.chmod(0o777)
    with unchanged(m, f):
        got = attempts(
            user,
            {
                "stat root": lambda: bool(os.stat(top)),
                "list root": lambda: os.listdir(top),
                "stats": lambda: os.getxattr(top, STATS).decode(),
                "purge": lambda: os.setxattr(top, PURGE, b"all"),
                "read": f.read_bytes,
                "write": lambda: f.write_bytes(b"x"),
                "mark": lambda: os.setxattr(f, VOLATILE, b"0,0"),
                "unmark": lambda: os.setxattr(f, NONVOLATILE, b"0,0"),
                "volatile": lambda: os.getxattr(f, VOLATILE).decode(),
                "purged": lambda: os.getxattr(f, PURGED).decode(),
                "create": lambda: (top / "new").write_bytes(b"x"),
            },
        )
        # the same through real tools in a login-like process (runuser)
        for argv in (
            ["stat", str(top)],
            ["getfattr", "-n", STATS, str(top)],
            ["setfattr", "-n", PURGE, "-v", "all", str(top)],
            ["setfattr", "-n", VOLATILE, "-v", "0,0", str(f)],
            ["getfattr", "-n", PURGED, str(f)],
        ):
            result = _run(["runuser", "-u", user.name, "--", *argv])
            assert result.returncode != 0, argv
            assert "Permission denied" in result.stderr, (argv, result.stderr)
    assert got == dict.fromkeys(got, DENIED)
    assert len(got) == 11
    assert not (top / "new").exists()
    # the mounter itself is not affected
    purge_all(top)
    assert purged(f) == [(0, PAGE)]
