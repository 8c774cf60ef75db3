"""Cache directories on real mounts, driven by unmodified tools where possible.

A regular file whose every name is in a cache directory is evicted whole, least
recently opened first, when the cap needs room, and never while a process holds
it open (fd or mapping), pins it or keeps it (non-volatile as a whole).  Eviction
removes every name: later opens get ENOENT, inotify watchers get IN_DELETE, and
nobody ever gets EIO.  Nothing outside a cache directory is ever removed.

Names and formats are spelled out from the contract (``user.vrange.cache_dir``,
``--cache-dir``, ``vrangefs cachedir``, the stats keys), not imported.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import mmap
import os
import random
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter, errno_of, run_cli
from tests.integration.vrange_helpers import (
    as_nobody,
    errno_or_value,
    fork_child,
    in_child,
    join_child,
    stats,
)

MIB = 1 << 20
CACHE_DIR = "user.vrange.cache_dir"


def body(tag: str, size: int) -> bytes:
    """Content that names its file: a header, then bytes derived from the tag."""
    head = f"{tag}\n".encode()
    seed = hashlib.sha256(head).digest()
    reps = -(-(size - len(head)) // len(seed))
    return (head + seed * reps)[:size]


def check_body(data: bytes) -> str:
    """The tag of a file's content; fails if the content is not exactly body(tag)."""
    tag = data.split(b"\n", 1)[0].decode()
    assert data == body(tag, len(data)), f"content of {tag!r} is corrupt"
    return tag


def dd(path: Path, size_mib: int, tag: str) -> subprocess.CompletedProcess[bytes]:
    """Write body(tag) to *path* with dd, as a shell user would."""
    return subprocess.run(
        ["dd", f"of={path}", "bs=1M", f"count={size_mib}", "iflag=fullblock", "status=none"],
        input=body(tag, size_mib * MIB),
        capture_output=True,
        check=False,
    )


def cache_mount(mounter: Mounter, cap: str = "8M", *args: str) -> Mount:
    """A mount that is one cache directory, evicting down to exactly the cap."""
    return mounter.mount(cap, args=["--cache-dir", "--low-watermark", "100%", *args])


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@contextmanager
def held_open(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A shell holding *path* open on fd 3 (``exec 3<file``) until the block ends."""
    shell = subprocess.Popen(
        ["sh", "-c", 'exec 3<"$1"; echo held; read _', "sh", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout is not None and shell.stdout.readline() == "held\n"
        yield shell
    finally:
        shell.communicate("\n", timeout=30)


def test_a_full_cache_dir_evicts_the_oldest_files_and_writes_never_fail(
    mounter: Mounter,
) -> None:
    mount = cache_mount(mounter)
    d = mount.path / "objects"
    d.mkdir()
    for i in range(20):
        result = dd(d / f"f{i:02}", 1, f"f{i:02}")
        assert result.returncode == 0, result.stderr
    kept = names(d)
    # Exactly the newest files fill the cap; the oldest went, in order.
    assert kept == {f"f{i:02}" for i in range(12, 20)}, kept
    for i in range(12):  # the write that evicted returned once the kernel knew: stat too
        assert not (d / f"f{i:02}").exists()
        assert errno_of(open, d / f"f{i:02}", "rb") == errno.ENOENT
    for name in kept:
        assert check_body((d / name).read_bytes()) == name
    s = stats(mount.path)
    assert s["resident_bytes"] <= s["memory_cap"] == 8 * MIB
    assert s["evicted_files"] == 12 and s["evicted_files_cap"] == 12
    assert s["evicted_bytes"] == 12 * MIB
    assert s["cache_dir_files"] == 8 and s["cache_dir_bytes"] == 8 * MIB


def test_the_last_open_decides_the_order(mounter: Mounter) -> None:
    mount = cache_mount(mounter, "4M")
    for i in range(4):
        assert dd(mount.path / f"f{i}", 1, f"f{i}").returncode == 0
    assert check_body((mount.path / "f0").read_bytes()) == "f0"  # f0 is now the newest
    assert dd(mount.path / "f4", 1, "f4").returncode == 0
    assert names(mount.path) == {"f0", "f2", "f3", "f4"}  # f1 was the least recently opened


def test_open_mapped_and_pinned_files_are_never_evicted(mounter: Mounter) -> None:
    mount = cache_mount(mounter, "8M")
    d = mount.path
    for name in ("by_fd", "by_map", "by_writer", "by_pin", "free"):
        assert dd(d / name, 1, name).returncode == 0
    writer = open(d / "by_writer", "r+b")  # noqa: SIM115
    fd = os.open(d / "by_map", os.O_RDONLY)
    mapping = mmap.mmap(fd, MIB, prot=mmap.PROT_READ)
    os.close(fd)  # only the mapping holds it now
    os.setxattr(d / "by_pin", "user.vrange.pin", b"0,0")  # this process's pin
    with held_open(d / "by_fd"):
        for i in range(24):  # three times the cap
            assert dd(d / f"new{i}", 1, f"new{i}").returncode == 0
        left = names(d)
        assert {"by_fd", "by_map", "by_writer", "by_pin"} <= left, left
        assert "free" not in left
        assert check_body(mapping[:]) == "by_map"
        writer.seek(0)
        assert check_body(writer.read()) == "by_writer"
        assert check_body((d / "by_pin").read_bytes()) == "by_pin"
    writer.close()
    mapping.close()
    os.setxattr(d / "by_pin", "user.vrange.unpin", b"0,0")
    # Released, they are the least recently opened files (by_pin was just read: it is
    # the newest): the next writes take them, then the oldest of the new ones.
    for i in range(4):
        assert dd(d / f"more{i}", 1, f"more{i}").returncode == 0
    gone = {"by_fd", "by_map", "by_writer", "new20"}
    assert not gone & names(d), names(d)
    assert "by_pin" in names(d)


def test_inotify_watchers_get_in_delete(mounter: Mounter) -> None:
    if shutil.which("inotifywait") is None:
        pytest.fail("inotifywait (inotify-tools) is not installed: tools/setup.sh installs it")
    mount = cache_mount(mounter, "4M")
    d = mount.path / "watched"
    d.mkdir()
    for i in range(4):
        assert dd(d / f"f{i}", 1, f"f{i}").returncode == 0
    watcher = subprocess.Popen(
        ["inotifywait", "-m", "-e", "delete", "--format", "%e %f", str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr, stdout = watcher.stderr, watcher.stdout
        assert stderr is not None and stdout is not None
        wait_until(lambda: "Watches established" in stderr.readline(), 30)
        assert dd(d / "f4", 2, "f4").returncode == 0  # evicts f0 and f1
        seen = {stdout.readline().strip() for _ in range(2)}
        assert seen == {"DELETE f0", "DELETE f1"}, seen
    finally:
        watcher.kill()
        watcher.communicate()
    assert names(d) == {"f2", "f3", "f4"}


def test_kept_files_stay_until_marked_volatile(mounter: Mounter) -> None:
    mount = cache_mount(mounter, "4M")
    d = mount.path
    for i in range(4):
        assert dd(d / f"f{i}", 1, f"f{i}").returncode == 0
    for i in range(3):
        subprocess.run(
            ["setfattr", "-n", "user.vrange.nonvolatile", "-v", "0,0", d / f"f{i}"], check=True
        )
    assert dd(d / "f4", 1, "f4").returncode == 0  # only f3 could go
    assert names(d) == {"f0", "f1", "f2", "f4"}
    # f4 goes next; then only kept files are left, and a write gets ENOSPC.
    assert dd(d / "f5", 1, "f5").returncode == 0
    failed = dd(d / "f6", 2, "f6")  # its first MiB takes f5's room; then none is left
    assert failed.returncode != 0 and b"No space left" in failed.stderr
    assert names(d) == {"f0", "f1", "f2", "f6"}
    for i in range(3):
        assert check_body((d / f"f{i}").read_bytes()) == f"f{i}"
    subprocess.run(["setfattr", "-n", "user.vrange.volatile", "-v", "0,0", d / "f0"], check=True)
    assert dd(d / "f7", 1, "f7").returncode == 0  # f6 is older: f0 was just read
    assert names(d) == {"f0", "f1", "f2", "f7"}
    assert dd(d / "f8", 1, "f8").returncode == 0  # now f0 goes; f1, f2 stay kept
    assert names(d) == {"f1", "f2", "f7", "f8"}


def test_nothing_outside_a_cache_directory_is_removed(mounter: Mounter) -> None:
    mount = mounter.mount("8M", args=["--low-watermark", "100%"])  # only one cache dir
    cache, plain = mount.path / "cache", mount.path / "plain"
    cache.mkdir()
    plain.mkdir()
    subprocess.run(["setfattr", "-n", CACHE_DIR, "-v", "1", cache], check=True)
    for i in range(4):
        assert dd(cache / f"c{i}", 1, f"c{i}").returncode == 0
    written = []
    for i in range(12):  # ordinary files take the cache's room, then fill up
        result = dd(plain / f"p{i}", 1, f"p{i}")
        if result.returncode != 0:
            assert b"No space left" in result.stderr
            break
        written.append(f"p{i}")
    assert len(written) == 8, written  # the cache files made room for four more
    assert names(cache) == set()
    for name in written:
        assert check_body((plain / name).read_bytes()) == name
    s = stats(mount.path)
    assert s["evicted_files"] == 4 and s["cache_dir_files"] == 0


def test_renames_and_hard_links(mounter: Mounter) -> None:
    mount = mounter.mount("5M", args=["--low-watermark", "100%"])
    cache, plain = mount.path / "cache", mount.path / "plain"
    cache.mkdir()
    plain.mkdir()
    subprocess.run(["setfattr", "-n", CACHE_DIR, "-v", "1", cache], check=True)
    for name in ("out", "linked_out", "two_links", "in_later"):
        folder = plain if name == "in_later" else cache
        assert dd(folder / name, 1, name).returncode == 0
    (cache / "out").rename(plain / "out")  # an ordinary file now
    os.link(cache / "linked_out", plain / "linked_out")  # one name outside: ordinary
    os.link(cache / "two_links", cache / "two_links.2")  # all names inside: evictable
    (plain / "in_later").rename(cache / "in_later")  # evictable now, the newest
    assert dd(cache / "new", 3, "new").returncode == 0  # 2 MiB must go
    assert names(cache) == {"linked_out", "new"}, names(cache)  # both names of two_links
    assert names(plain) == {"out", "linked_out"}
    for path in (plain / "out", plain / "linked_out", cache / "linked_out", cache / "new"):
        assert check_body(path.read_bytes()) == path.name


def test_cachedir_command_and_attribute(mounter: Mounter) -> None:
    mount = mounter.mount("8M", options=["allow_other"])
    tree = mount.path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "f").write_bytes(b"x" * 4096)

    def flag(path: Path) -> bytes:
        return os.getxattr(path, CACHE_DIR)

    assert flag(tree) == b"0"
    result = run_cli(["cachedir", str(tree)])
    assert result.returncode == 0, result.stderr
    assert "3 directories" in result.stdout
    assert [flag(p) for p in (tree, tree / "a", tree / "a" / "b")] == [b"1"] * 3
    (tree / "a" / "new").mkdir()
    assert flag(tree / "a" / "new") == b"1"  # inherited
    got = subprocess.run(
        ["getfattr", "-n", CACHE_DIR, "--only-values", tree],
        capture_output=True,
        text=True,
        check=True,
    )
    assert got.stdout == "1"
    assert stats(mount.path)["cache_dir_files"] == 1
    result = run_cli(["cachedir", "--off", str(tree)])
    assert result.returncode == 0, result.stderr
    assert flag(tree / "a" / "new") == b"0"
    assert stats(mount.path)["cache_dir_files"] == 0
    # Bad input: a clear errno, nothing changed.
    for value in (b"2", b"", b"yes", b"1\n\n"):
        assert errno_of(os.setxattr, tree, CACHE_DIR, value) == errno.EINVAL
    assert errno_of(os.setxattr, tree / "a" / "f", CACHE_DIR, b"1") == errno.ENOTDIR
    assert errno_of(os.getxattr, tree / "a" / "f", CACHE_DIR) == errno.ENOTDIR
    assert flag(tree) == b"0"
    result = run_cli(["cachedir", str(tree / "a" / "f")])
    assert result.returncode != 0 and "f" in result.stderr
    # Another user may not make someone else's directory a cache directory.
    os.chmod(tree, 0o755)
    got_errno = as_nobody(lambda: errno_or_value(lambda: os.setxattr(tree, CACHE_DIR, b"1")))
    assert got_errno in ({"errno": errno.EACCES}, {"errno": errno.EPERM})
    os.chmod(mount.path, 0o1777)
    assert as_nobody(lambda: errno_or_value(lambda: os.setxattr(mount.path, CACHE_DIR, b"1"))) == {
        "errno": errno.EPERM
    }
    assert flag(tree) == b"0" and flag(mount.path) == b"0"


def test_cp_and_tar_of_more_than_the_cap(mounter: Mounter, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"s{i:02}").write_bytes(body(f"s{i:02}", 512 * 1024))
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="src")
    mount = cache_mount(mounter, "4M")
    assert subprocess.run(["cp", "-r", src, mount.path / "copy"], check=False).returncode == 0
    assert subprocess.run(["tar", "-xf", archive, "-C", mount.path], check=False).returncode == 0
    left = [p for d in ("copy", "src") for p in (mount.path / d).iterdir()]
    assert 0 < len(left) <= 8
    for path in left:
        assert check_body(path.read_bytes()) == path.name
    assert names(mount.path / "src") == {f"s{i:02}" for i in range(16, 24)}


@pytest.mark.timeout(180)
def test_eviction_racing_with_open_rename_link_unlink(mounter: Mounter) -> None:
    """Processes open, read, rename, link and unlink files while a writer forces
    evictions: every open either gets ENOENT or the file's exact bytes, never EIO."""
    mount = cache_mount(mounter, "16M")
    dirs = [mount.path / f"d{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    seconds = 8.0

    def writer() -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tag = f"w{count}"
            temp = dirs[count % 3] / f".tmp-{tag}"  # written, then renamed: as caches do
            temp.write_bytes(body(tag, 256 * 1024))
            os.rename(temp, dirs[count % 3] / tag)
            count += 1
        return count

    def churner(seed: int) -> dict[str, int]:
        rng = random.Random(seed)
        seen = {"read": 0, "enoent": 0, "renamed": 0, "linked": 0, "unlinked": 0}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            d = rng.choice(dirs)
            try:
                entries = [e for e in os.listdir(d) if not e.startswith(".tmp")]
            except OSError as e:
                raise AssertionError(f"listdir: {e}") from e
            if not entries:
                continue
            path = d / rng.choice(entries)
            action = rng.random()
            try:
                if action < 0.6:
                    with open(path, "rb") as f:
                        data = f.read()
                    assert check_body(data) == path.name.split(".")[0], path
                    seen["read"] += 1
                elif action < 0.75:
                    os.rename(path, rng.choice(dirs) / (path.name.split(".")[0] + f".r{seed}"))
                    seen["renamed"] += 1
                elif action < 0.9:
                    os.link(path, rng.choice(dirs) / (path.name.split(".")[0] + f".l{seed}"))
                    seen["linked"] += 1
                else:
                    os.unlink(path)
                    seen["unlinked"] += 1
            except FileNotFoundError:
                seen["enoent"] += 1
            except FileExistsError:
                pass
        return seen

    pids = [fork_child(writer)]
    pids += [fork_child(functools.partial(churner, seed)) for seed in range(6)]
    results: list[Any] = []
    for pid, fd in pids:
        status, result = join_child(pid, fd)
        assert os.waitstatus_to_exitcode(status) == 0, f"child {pid}: status {status:#x}"
        results.append(result)
    written = results[0]
    assert isinstance(written, int) and written > 64  # far more than the cap holds
    reads = sum(r["read"] for r in results[1:])
    assert reads > 100
    s = stats(mount.path)
    assert s["evicted_files"] > 0 and s["resident_bytes"] <= s["memory_cap"]
    # The survivors are intact, every name of them.
    for d in dirs:
        for path in d.iterdir():
            check_body(path.read_bytes())


def test_processes_in_another_user_see_misses_not_errors(mounter: Mounter) -> None:
    mount = cache_mount(mounter, "4M", "-o", "allow_other")
    os.chmod(mount.path, 0o1777)

    def fill() -> list[int]:
        failures = []
        for i in range(8):
            try:
                (mount.path / f"u{i}").write_bytes(body(f"u{i}", MIB))
            except OSError as e:
                failures.append(e.errno or 0)
        return failures

    assert as_nobody(fill) == []  # nobody's files evict each other: no ENOSPC
    assert len(names(mount.path)) == 4
    assert in_child(lambda: sorted(names(mount.path))) == [f"u{i}" for i in range(4, 8)]


def test_purge_all_evicts_every_closed_cache_file(mounter: Mounter) -> None:
    mount = cache_mount(mounter, "16M")
    for i in range(4):
        assert dd(mount.path / f"f{i}", 1, f"f{i}").returncode == 0
    subprocess.run(
        ["setfattr", "-n", "user.vrange.nonvolatile", "-v", "0,0", mount.path / "f0"], check=True
    )
    with held_open(mount.path / "f1"):
        result = run_cli(["purge", str(mount.path)])
        assert result.returncode == 0, result.stderr
        assert "evicted 2 file(s), 2.0 MiB" in result.stdout, result.stdout
        assert names(mount.path) == {"f0", "f1"}
    s = stats(mount.path)
    assert s["evicted_files_explicit"] == 2 and s["evicted_bytes_explicit"] == 2 * MIB
    assert s["cache_dir_files"] == 2 and s["cache_dir_bytes"] == 2 * MIB
