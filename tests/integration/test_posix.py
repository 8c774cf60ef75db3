"""POSIX behaviour of a real mount, through real syscalls and tools in other processes.

Most tests work in a fresh directory (``work``) of one mount shared by the module;
tests that measure the whole mount's usage get a mount of their own (``fresh``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import wait_until
from tests.integration.conftest import Mount, errno_of

PAGE = 4096
MiB = 1 << 20
NOBODY = 65534
OLD_NS = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds
_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(src), AT_FDCWD, bytes(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def as_user(uid: int, fn: Callable[[], object]) -> int:
    """Run *fn* in a forked child as *uid* (and gid *uid*); the errno it raised, or 0."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def drop_cache(path: Path) -> None:
    """Drop the kernel's cached pages of *path*, so that the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def clock_after(ns: int) -> None:
    """Wait until the wall clock has passed *ns*, so new timestamps are strictly later."""
    wait_until(lambda: time.time_ns() > ns, 5, "clock moves on")


def df(path: Path) -> tuple[int, int]:
    """(size, used) in bytes as `df` reports them."""
    out = subprocess.run(
        ["df", "-B1", "--output=size,used", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    size, used = out.splitlines()[1].split()
    return int(size), int(used)


# -- files and data ----------------------------------------------------------------------
def test_create_write_read_append(work: Path) -> None:
    f = work / "f"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert os.write(fd, b"hello ") == 6
    assert os.pwrite(fd, b"HELLO", 100) == 5
    os.close(fd)
    assert f.stat().st_size == 105
    assert f.read_bytes() == b"hello " + bytes(94) + b"HELLO"
    assert errno_of(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"!")  # O_APPEND writes at the end whatever the offset
    os.close(fd)
    subprocess.run(["sh", "-c", f"printf tail >> '{f}'"], check=True)
    data = f.read_bytes()
    assert data.endswith(b"HELLO!tail")
    assert len(data) == 110
    fd = os.open(f, os.O_RDONLY)
    assert os.pread(fd, 5, 100) == b"HELLO"
    assert os.pread(fd, 10, 200) == b""
    os.close(fd)


def test_o_trunc(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x" * (3 * PAGE))
    assert f.stat().st_blocks == 3 * PAGE // 512
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    st = os.fstat(fd)
    os.close(fd)
    assert (st.st_size, st.st_blocks) == (0, 0)
    assert f.read_bytes() == b""
    subprocess.run(["sh", "-c", f"echo longer-line > '{f}'; echo hi > '{f}'"], check=True)
    assert f.read_bytes() == b"hi\n"
    # O_TRUNC marks mtime and ctime for update even when the file is already empty.
    os.truncate(f, 0)
    os.utime(f, ns=(OLD_NS, OLD_NS))
    ctime0 = f.stat().st_ctime_ns
    clock_after(ctime0)
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    assert f.stat().st_mtime_ns > ctime0
    assert f.stat().st_ctime_ns > ctime0


def test_o_rdonly_o_trunc_truncates_like_tmpfs(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"12345")
    os.close(os.open(f, os.O_RDONLY | os.O_TRUNC))
    assert f.stat().st_size == 0
    assert f.read_bytes() == b""


def test_truncate_grow_and_shrink(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"a" * 10_000)
    os.truncate(f, 20_000)
    data = f.read_bytes()
    assert data == b"a" * 10_000 + bytes(10_000)
    os.truncate(f, 5_000)
    assert f.read_bytes() == b"a" * 5_000
    os.truncate(f, 9_000)  # the bytes once past 5,000 must not come back
    assert f.read_bytes() == b"a" * 5_000 + bytes(4_000)
    with open(f, "r+b") as fh:
        fh.truncate(1)
    assert f.read_bytes() == b"a"
    assert f.stat().st_blocks == PAGE // 512


def test_sparse_file_costs_nothing(fresh: Mount) -> None:
    f = fresh.path / "sparse"
    size_before, used_before = df(fresh.path)
    with open(f, "wb") as fh:
        fh.truncate(1 << 30)
    st = f.stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks == 0
    assert df(fresh.path) == (size_before, used_before)
    with open(f, "rb") as fh:
        fh.seek(700 * MiB + 3)
        assert fh.read(100_000) == bytes(100_000)
    with open(f, "r+b") as fh:
        fh.seek(512 * MiB)
        fh.write(b"z")
    assert f.stat().st_blocks == PAGE // 512
    assert df(fresh.path)[1] == used_before + PAGE


def test_st_blocks_counts_resident_pages(work: Path) -> None:
    f = work / "f"
    with open(f, "wb") as fh:
        fh.write(b"1")
        fh.seek(MiB + PAGE - 1)
        fh.write(b"22")  # straddles two pages
    st = f.stat()
    assert st.st_size == MiB + PAGE + 1
    assert st.st_blocks == 3 * PAGE // 512
    assert st.st_blksize == PAGE


# -- names --------------------------------------------------------------------------------
def test_link_counts(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"data")
    subprocess.run(["ln", str(f), str(work / "g")], check=True)
    assert f.stat().st_nlink == 2
    assert f.stat().st_ino == (work / "g").stat().st_ino
    (work / "g").write_bytes(b"DATA")
    assert f.read_bytes() == b"DATA"
    os.unlink(f)
    assert (work / "g").stat().st_nlink == 1
    assert errno_of(os.link, work, work / "dirlink") == errno.EPERM

    assert work.stat().st_nlink == 2
    os.mkdir(work / "d1")
    os.mkdir(work / "d2")
    assert work.stat().st_nlink == 4
    assert (work / "d1").stat().st_nlink == 2
    os.mkdir(work / "d1" / "sub")
    assert (work / "d1").stat().st_nlink == 3
    assert errno_of(os.rmdir, work / "d1") == errno.ENOTEMPTY
    os.rmdir(work / "d1" / "sub")
    os.rmdir(work / "d1")
    assert work.stat().st_nlink == 3
    assert errno_of(os.rmdir, work / "g") == errno.ENOTDIR
    assert errno_of(os.unlink, work / "d2") == errno.EISDIR


def test_rename_over_existing_entries(work: Path) -> None:
    (work / "a").write_bytes(b"new")
    (work / "b").write_bytes(b"old" * 10_000)
    os.rename(work / "a", work / "b")
    assert not (work / "a").exists()
    assert (work / "b").read_bytes() == b"new"
    assert (work / "b").stat().st_blocks == PAGE // 512

    os.mkdir(work / "d")
    (work / "d" / "inside").write_bytes(b"i")
    os.mkdir(work / "empty")
    os.mkdir(work / "full")
    (work / "full" / "x").write_bytes(b"x")
    assert errno_of(os.rename, work / "d", work / "full") == errno.ENOTEMPTY
    assert errno_of(os.rename, work / "b", work / "d") == errno.EISDIR
    assert errno_of(os.rename, work / "d", work / "b") == errno.ENOTDIR
    os.rename(work / "d", work / "empty")
    assert (work / "empty" / "inside").read_bytes() == b"i"
    assert not (work / "d").exists()
    assert work.stat().st_nlink == 4  # work's own 2, plus empty/ and full/

    assert errno_of(renameat2, work / "b", work / "full", RENAME_NOREPLACE) == errno.EEXIST
    renameat2(work / "b", work / "c", RENAME_NOREPLACE)
    assert (work / "c").read_bytes() == b"new"
    renameat2(work / "c", work / "full", RENAME_EXCHANGE)
    assert (work / "c" / "x").read_bytes() == b"x"
    assert (work / "full").read_bytes() == b"new"
    assert errno_of(renameat2, work / "c", work / "nothing", RENAME_EXCHANGE) == errno.ENOENT


def test_rename_directory_between_parents(work: Path) -> None:
    os.makedirs(work / "p1" / "tree" / "deep")
    (work / "p1" / "tree" / "deep" / "f").write_bytes(b"deep")
    os.mkdir(work / "p2")
    ino = (work / "p1" / "tree").stat().st_ino
    subprocess.run(["mv", str(work / "p1" / "tree"), str(work / "p2")], check=True)
    assert (work / "p2" / "tree").stat().st_ino == ino
    assert (work / "p2" / "tree" / "deep" / "f").read_bytes() == b"deep"
    assert (work / "p1").stat().st_nlink == 2
    assert (work / "p2").stat().st_nlink == 3
    assert errno_of(os.rename, work / "p2", work / "p2" / "tree" / "x") == errno.EINVAL


def test_unlink_of_open_file(fresh: Mount) -> None:
    f = fresh.path / "f"
    _, used0 = df(fresh.path)
    payload = os.urandom(MiB)
    f.write_bytes(payload)
    assert fresh.used_bytes() == used0 + MiB
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, MiB, 0) == payload
        os.pwrite(fd, b"still writable", 10)
        assert os.pread(fd, 14, 10) == b"still writable"
        assert fresh.used_bytes() == used0 + MiB  # the data lives while the file is open
    finally:
        os.close(fd)
    wait_until(lambda: fresh.used_bytes() == used0, 10, "space freed after the last close")


def test_unlinked_mmapped_file_lives_until_munmap(fresh: Mount) -> None:
    f = fresh.path / "mapped"
    f.write_bytes(b"m" * (4 * PAGE))
    fd = os.open(f, os.O_RDWR)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        os.close(fd)
        os.unlink(f)
        m[0:4] = b"live"
        m.flush()
        assert m[0:4] == b"live"
        assert m[PAGE : PAGE + 2] == b"mm"
        assert fresh.used_bytes() == 4 * PAGE  # the mapping holds the file open
    finally:
        m.close()
    wait_until(lambda: fresh.used_bytes() == 0, 10, "space freed after munmap")


def test_symlinks(work: Path) -> None:
    (work / "target").write_bytes(b"pointed at")
    os.symlink("target", work / "rel")
    os.symlink(str(work / "target"), work / "abs")
    os.symlink("nowhere", work / "dangling")
    assert os.readlink(work / "rel") == "target"
    assert (work / "rel").read_bytes() == b"pointed at"
    assert (work / "abs").read_bytes() == b"pointed at"
    st = os.lstat(work / "rel")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert errno_of(os.stat, work / "dangling") == errno.ENOENT
    assert errno_of(os.symlink, "x", work / "rel") == errno.EEXIST
    os.lchown(work / "rel", NOBODY, NOBODY)
    assert os.lstat(work / "rel").st_uid == NOBODY
    assert (work / "target").stat().st_uid == 0
    long_target = "d/" * 1000
    os.symlink(long_target, work / "long")
    assert os.readlink(work / "long") == long_target
    ls = ["ls", "-l", str(work / "rel")]
    out = subprocess.run(ls, capture_output=True, text=True, check=True)
    assert out.stdout.rstrip().endswith("-> target")


def test_fifo(work: Path) -> None:
    fifo = work / "fifo"
    os.mkfifo(fifo, 0o644)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    writer = subprocess.Popen(["sh", "-c", f"echo through-the-fifo > '{fifo}'"])
    with open(fifo, "rb") as fh:
        assert fh.read() == b"through-the-fifo\n"
    assert writer.wait(timeout=10) == 0


def test_sockets_and_device_nodes(work: Path) -> None:
    os.mknod(work / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.stat(work / "sock").st_mode)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(work / "bound"))  # bind creates the socket inode on the mount
        assert stat.S_ISSOCK(os.stat(work / "bound").st_mode)
    finally:
        server.close()
    os.mknod(work / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(work / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    st = os.stat(work / "null")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    st = os.stat(work / "blk")
    assert stat.S_ISBLK(st.st_mode)
    assert st.st_rdev == os.makedev(7, 0)


# -- attributes and times --------------------------------------------------------------------
def test_chmod_chown_utime(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(f.stat().st_mode) == 0o4751
    assert stat.S_ISREG(f.stat().st_mode)
    os.chown(f, NOBODY, NOBODY)
    assert (f.stat().st_uid, f.stat().st_gid) == (NOBODY, NOBODY)
    subprocess.run(["chown", "0:0", str(f)], check=True)
    assert (f.stat().st_uid, f.stat().st_gid) == (0, 0)
    os.utime(f, ns=(OLD_NS, OLD_NS + 1))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_NS, OLD_NS + 1)
    subprocess.run(["touch", "-m", "-d", "@1234567890", str(f)], check=True)
    assert f.stat().st_mtime_ns == 1_234_567_890 * 10**9
    assert f.stat().st_atime_ns == OLD_NS
    os.utime(f)  # now
    assert f.stat().st_mtime_ns > time.time_ns() - 60 * 10**9


def test_write_updates_mtime_and_ctime_only(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    ctime0 = f.stat().st_ctime_ns
    clock_after(ctime0)
    with open(f, "r+b") as fh:
        fh.write(b"y")
    st = f.stat()
    assert st.st_mtime_ns > ctime0
    assert st.st_ctime_ns > ctime0
    assert st.st_atime_ns == OLD_NS


def test_chmod_updates_ctime_only(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    ctime0 = f.stat().st_ctime_ns
    clock_after(ctime0)
    os.chmod(f, 0o600)
    st = f.stat()
    assert st.st_ctime_ns > ctime0
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_NS, OLD_NS)


def test_directory_times_follow_entries(work: Path) -> None:
    os.utime(work, ns=(OLD_NS, OLD_NS))
    ctime0 = work.stat().st_ctime_ns
    clock_after(ctime0)
    (work / "new").write_bytes(b"")
    st = work.stat()
    assert st.st_mtime_ns > ctime0
    assert st.st_ctime_ns > ctime0


def test_read_updates_atime_by_relatime_rule(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"r" * 3 * PAGE)
    os.utime(f, ns=(OLD_NS, OLD_NS + 1))  # atime older than mtime: the next read updates it
    drop_cache(f)
    f.read_bytes()
    atime = f.stat().st_atime_ns
    assert atime > OLD_NS + 1
    drop_cache(f)
    f.read_bytes()  # atime is now newer than mtime and ctime, and recent: unchanged
    assert f.stat().st_atime_ns == atime
    assert f.stat().st_mtime_ns == OLD_NS + 1


# -- permissions --------------------------------------------------------------------------
def test_permission_checks_for_another_user(work: Path) -> None:
    secret = work / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    public = work / "public"
    public.write_bytes(b"everyone")
    public.chmod(0o644)
    closed = work / "closed"
    closed.mkdir(mode=0o755)
    shared_dir = work / "open"
    shared_dir.mkdir()
    shared_dir.chmod(0o1777)

    # Controls: the other user reaches the mount (allow_other) and may do what modes allow.
    assert as_user(NOBODY, public.read_bytes) == 0
    assert as_user(NOBODY, lambda: os.stat(secret)) == 0
    assert as_user(NOBODY, lambda: (shared_dir / "mine").write_bytes(b"m")) == 0
    assert (shared_dir / "mine").stat().st_uid == NOBODY
    assert (shared_dir / "mine").stat().st_gid == NOBODY

    assert as_user(NOBODY, secret.read_bytes) == errno.EACCES
    assert as_user(NOBODY, lambda: public.write_bytes(b"no")) == errno.EACCES
    assert as_user(NOBODY, lambda: (closed / "new").write_bytes(b"no")) == errno.EACCES
    assert as_user(NOBODY, lambda: os.mkdir(closed / "sub")) == errno.EACCES
    assert as_user(NOBODY, lambda: os.chmod(secret, 0o666)) == errno.EPERM
    assert as_user(NOBODY, lambda: os.chown(secret, NOBODY, NOBODY)) == errno.EPERM
    assert as_user(NOBODY, lambda: os.unlink(public)) == errno.EACCES
    assert as_user(NOBODY, lambda: os.utime(public)) == errno.EACCES  # "now" needs write access
    assert as_user(NOBODY, lambda: os.utime(public, ns=(1, 1))) == errno.EPERM  # owner only
    assert as_user(NOBODY, lambda: os.setxattr(public, "user.x", b"1")) == errno.EACCES
    assert not (closed / "new").exists()
    assert public.read_bytes() == b"everyone"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


# -- extended attributes ---------------------------------------------------------------------
def test_user_xattrs_with_tools(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"")
    subprocess.run(["setfattr", "-n", "user.colour", "-v", "blue", str(f)], check=True)
    subprocess.run(["setfattr", "-n", "user.empty", str(f)], check=True)
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.colour", str(f)],
        capture_output=True,
        check=True,
    ).stdout
    assert out == b"blue"
    dump = subprocess.run(
        ["getfattr", "-d", "--absolute-names", str(f)], capture_output=True, text=True, check=True
    ).stdout
    assert 'user.colour="blue"' in dump
    assert "user.empty" in dump
    subprocess.run(["setfattr", "-x", "user.colour", str(f)], check=True)
    missing = subprocess.run(
        ["getfattr", "-n", "user.colour", str(f)], capture_output=True, check=False
    )
    assert missing.returncode != 0
    assert os.listxattr(f) == ["user.empty"]


def test_user_xattrs_with_syscalls(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"")
    value = os.urandom(4000)
    os.setxattr(f, "user.bin", value)
    assert os.getxattr(f, "user.bin") == value
    os.setxattr(f, "user.other", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, f, "user.bin", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.none", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(f, "user.bin", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.bin") == b"replaced"
    assert sorted(os.listxattr(f)) == ["user.bin", "user.other"]
    os.removexattr(f, "user.bin")
    assert errno_of(os.removexattr, f, "user.bin") == errno.ENODATA
    assert errno_of(os.getxattr, f, "user.bin") == errno.ENODATA
    assert os.listxattr(f) == ["user.other"]
    os.mkdir(work / "d")
    os.setxattr(work / "d", "user.dir", b"yes")
    assert os.getxattr(work / "d", "user.dir") == b"yes"
    os.symlink("f", work / "link")
    assert errno_of(os.setxattr, work / "link", "user.x", b"1", 0, follow_symlinks=False) == (
        errno.EPERM
    )
    assert errno_of(os.setxattr, f, "user.big", bytes(65537)) == errno.E2BIG


def test_listxattr_of_more_names_than_fit_gets_e2big(work: Path) -> None:
    """As on tmpfs, a listing past 64 KiB is E2BIG; the daemon says so without listing."""
    f = work / "f"
    f.write_bytes(b"")
    fd = os.open(f, os.O_RDONLY)
    try:
        for i in range(9363):
            os.setxattr(fd, f"user.{i}", b"")
        assert errno_of(os.listxattr, fd) == errno.E2BIG
        for i in range(3000):
            os.removexattr(fd, f"user.{i}")
        assert sorted(os.listxattr(fd)) == sorted(f"user.{i}" for i in range(3000, 9363))
    finally:
        os.close(fd)


def test_unknown_xattr_namespace_is_not_supported(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"")
    assert errno_of(os.setxattr, f, "foo.bar", b"x") == errno.EOPNOTSUPP
    assert os.listxattr(f) == []


def test_unknown_xattr_namespace_get_and_remove(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"")
    assert errno_of(os.getxattr, f, "foo.bar") == errno.EOPNOTSUPP
    assert errno_of(os.removexattr, f, "foo.bar") == errno.EOPNOTSUPP


# -- statfs -------------------------------------------------------------------------------
def test_statfs_reports_cap_and_resident_bytes(fresh: Mount) -> None:
    st = os.statvfs(fresh.path)
    assert st.f_namemax == 255
    assert st.f_bfree <= st.f_blocks
    assert st.f_bavail <= st.f_bfree
    size, used = df(fresh.path)
    assert size == 64 * MiB
    assert used == 0
    sizes = [1, PAGE, PAGE + 1, 3 * MiB + 5]
    for i, n in enumerate(sizes):
        (fresh.path / f"f{i}").write_bytes(b"u" * n)
    with open(fresh.path / "sparse", "wb") as fh:
        fh.truncate(100 * MiB)
    resident = sum((n + PAGE - 1) // PAGE * PAGE for n in sizes)
    blocks = sum(p.stat().st_blocks * 512 for p in fresh.path.iterdir())
    assert blocks == resident
    assert df(fresh.path) == (64 * MiB, resident)
    assert os.pathconf(fresh.path, "PC_NAME_MAX") == 255
    assert st.f_files > 0


def test_long_names(work: Path) -> None:
    (work / ("n" * 255)).write_bytes(b"ok")
    assert (work / ("n" * 255)).read_bytes() == b"ok"
    assert errno_of(os.open, work / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG


# -- mmap ---------------------------------------------------------------------------------
_MMAP_CHILD = textwrap.dedent(
    """
    import mmap, os, sys
    path, mode = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if mode == "write":
        m[4096 + 10 : 4096 + 15] = b"child"
        m.flush()
    else:
        sys.stdout.buffer.write(m[0:6])
    m.close()
    os.close(fd)
    """
)


def test_mmap_shared_between_processes(work: Path) -> None:
    f = work / "mapped"
    f.write_bytes(bytes(2 * PAGE))
    fd = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            run = [sys.executable, "-c", _MMAP_CHILD, str(f)]
            subprocess.run([*run, "write"], check=True, timeout=30)
            assert m[PAGE + 10 : PAGE + 15] == b"child"  # the other process's store
            m[0:6] = b"parent"
            m.flush()
            out = subprocess.run([*run, "read"], check=True, capture_output=True, timeout=30)
            assert out.stdout == b"parent"
    finally:
        os.close(fd)
    drop_cache(f)  # the daemon, not only the page cache, holds both stores
    data = f.read_bytes()
    assert data[:6] == b"parent"
    assert data[PAGE + 10 : PAGE + 15] == b"child"
    assert len(data) == 2 * PAGE


# -- large directories --------------------------------------------------------------------
def test_large_directory_listed_completely_while_removing(work: Path) -> None:
    d = work / "big"
    d.mkdir()
    names = [f"entry-{i:05d}" for i in range(5000)]
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))

    listed = subprocess.run(
        ["ls", "-1", "-f", str(d)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(n for n in listed if n not in (".", "..")) == names
    assert len({e.name for e in os.scandir(d)}) == 5000

    # scandir while this process removes entries between reads: every entry
    # that survives is listed, and none twice.
    removed: set[str] = set()
    seen: list[str] = []
    victims = iter(names[1::2])
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            victim = next(victims, None)
            if victim is not None:
                os.unlink(d / victim)
                removed.add(victim)
    assert len(seen) == len(set(seen)), "scandir listed an entry twice"
    assert set(names) - removed <= set(seen)

    # ls in one process while another removes entries.
    remaining = sorted(set(names) - removed)
    doomed = remaining[::3]
    remover = subprocess.Popen(
        [sys.executable, "-c", "import os,sys\nfor p in sys.argv[1:]: os.unlink(p)"]
        + [str(d / n) for n in doomed]
    )
    try:
        listed = subprocess.run(
            ["ls", "-1", "-f", str(d)], capture_output=True, text=True, check=True
        ).stdout.split()
    finally:
        assert remover.wait(timeout=60) == 0
    listed = [n for n in listed if n not in (".", "..")]
    assert len(listed) == len(set(listed)), "ls listed an entry twice"
    assert set(remaining) - set(doomed) <= set(listed)
    assert sorted(os.listdir(d)) == sorted(set(remaining) - set(doomed))
