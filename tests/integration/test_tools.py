"""Everyday tools on a real mount: coreutils, tar, git and sqlite, each its own process."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.integration.conftest import Mount

PAGE = 4096
MiB = 1 << 20
OLD_NS = 1_000_000_000_123_456_789


def run(args: Sequence[str | Path], cwd: Path | None = None, stdin: str | None = None) -> str:
    """Run a tool; fail the test (showing its stderr) unless it exits 0; return its stdout."""
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr}"
    return result.stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def snapshot(root: Path, mtime_ns: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything a faithful copy keeps: type, mode, size, times, content, targets, xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            mtime = st.st_mtime_ns if mtime_ns else st.st_mtime_ns // 10**9
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), mtime, xattrs(p))
            else:
                kind = "file" if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
                content = digest(p) if stat.S_ISREG(st.st_mode) else None
                out[rel] = (
                    kind,
                    stat.S_IMODE(st.st_mode),
                    st.st_size,
                    st.st_nlink,
                    mtime,
                    content,
                    xattrs(p),
                )
    return out


def make_tree(root: Path) -> None:
    """A small tree with what copies tend to lose."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_bytes(b"small\n")
    (root / "sub" / "big.bin").write_bytes(os.urandom(MiB + 3))
    (root / "sub" / "deeper" / "note.txt").write_bytes(b"deep\n" * 1000)
    with open(root / "sparse.img", "wb") as f:
        f.seek(5 * MiB)
        f.write(b"end")
    os.symlink("small.txt", root / "link")
    os.link(root / "small.txt", root / "hardlink.txt")
    os.mkfifo(root / "fifo")
    os.chmod(root / "small.txt", 0o640)
    os.chmod(root / "sub", 0o750)
    os.setxattr(root / "small.txt", "user.tag", b"keep me")
    os.setxattr(root / "sub", "user.dirtag", b"dir")
    for p in [root / "small.txt", root / "sub" / "big.bin", root / "sub" / "deeper"]:
        os.utime(p, ns=(OLD_NS, OLD_NS))
    os.utime(root / "sub", ns=(OLD_NS, OLD_NS + 7))


# -- coreutils -------------------------------------------------------------------------------
def test_cp(work: Path, tmp_path: Path) -> None:
    outside = tmp_path / "src.bin"
    outside.write_bytes(os.urandom(3 * MiB + 17))
    run(["cp", outside, work / "in.bin"])
    assert digest(work / "in.bin") == digest(outside)
    run(["cp", work / "in.bin", work / "copy.bin"])
    run(["cp", work / "copy.bin", tmp_path / "back.bin"])
    assert digest(tmp_path / "back.bin") == digest(outside)
    assert (work / "copy.bin").stat().st_blocks * 512 == (3 * MiB + 17 + PAGE - 1) // PAGE * PAGE


def test_cp_archive_preserves_modes_times_xattrs(work: Path) -> None:
    make_tree(work / "src")
    run(["cp", "-a", work / "src", work / "dst"])
    before = snapshot(work / "src")
    after = snapshot(work / "dst")
    assert after == before
    assert after["small.txt"][1] == 0o640
    assert after["small.txt"][4] == OLD_NS
    assert after["small.txt"][6] == {"user.tag": b"keep me"}
    assert after["sub"] == ("dir", 0o750, OLD_NS + 7, {"user.dirtag": b"dir"})
    assert after["hardlink.txt"][3] == 2  # cp -a keeps hard links
    # cp -a keeps the sparse file sparse.
    assert (work / "dst" / "sparse.img").stat().st_blocks == PAGE // 512


def test_dd(work: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(8 * MiB))
    run(["dd", f"if={src}", f"of={work / 'f'}", "bs=1M", "conv=fsync", "status=none"])
    run(["dd", f"if={work / 'f'}", f"of={tmp_path / 'back'}", "bs=64K", "status=none"])
    assert digest(tmp_path / "back") == digest(src)
    # Overwrite in the middle without truncating, at an odd offset.
    run(["dd", "if=/dev/zero", f"of={work / 'f'}", "bs=1", "count=3", "seek=4097",
         "conv=notrunc", "status=none"])  # fmt: skip
    data = (work / "f").read_bytes()
    assert len(data) == 8 * MiB
    assert data[4097:4100] == bytes(3)
    assert data[:4097] == src.read_bytes()[:4097]
    # seek makes a sparse file.
    run(["dd", "if=/dev/zero", f"of={work / 'sparse'}", "bs=4096", "count=1", "seek=1000",
         "status=none"])  # fmt: skip
    st = (work / "sparse").stat()
    assert (st.st_size, st.st_blocks) == (1001 * PAGE, PAGE // 512)


def test_mv(work: Path, tmp_path: Path) -> None:
    (work / "a").write_bytes(b"moved")
    (work / "d").mkdir()
    run(["mv", work / "a", work / "d" / "b"])
    assert not (work / "a").exists()
    assert (work / "d" / "b").read_bytes() == b"moved"
    run(["mv", work / "d", work / "e"])
    assert (work / "e" / "b").read_bytes() == b"moved"
    outside = tmp_path / "outside"
    outside.write_bytes(b"from another filesystem")
    run(["mv", outside, work / "e"])  # across filesystems: copy, then unlink
    assert not outside.exists()
    assert (work / "e" / "outside").read_bytes() == b"from another filesystem"
    run(["mv", work / "e" / "outside", tmp_path / "back"])
    assert (tmp_path / "back").read_bytes() == b"from another filesystem"
    assert sorted(os.listdir(work / "e")) == ["b"]


def test_ln(work: Path) -> None:
    (work / "f").write_bytes(b"x")
    run(["ln", work / "f", work / "hard"])
    run(["ln", "-s", "f", work / "soft"])
    assert (work / "f").stat().st_nlink == 2
    assert os.readlink(work / "soft") == "f"
    assert (work / "soft").read_bytes() == b"x"
    assert run(["readlink", "-f", work / "soft"]).strip() == str(work / "f")
    run(["ln", "-sf", "hard", work / "soft"])  # replace an existing link
    assert os.readlink(work / "soft") == "hard"


def test_truncate_du_stat(work: Path) -> None:
    run(["truncate", "-s", "10M", work / "t"])
    assert (work / "t").stat().st_size == 10 * MiB
    assert run(["du", "-B1", work / "t"]).split()[0] == "0"
    assert run(["du", "-B1", "--apparent-size", work / "t"]).split()[0] == str(10 * MiB)
    (work / "data").write_bytes(b"d" * (PAGE * 5 + 1))
    assert run(["du", "-B1", work / "data"]).split()[0] == str(6 * PAGE)
    run(["truncate", "-s", "1", work / "data"])
    assert (work / "data").read_bytes() == b"d"
    out = run(["stat", "-c", "%s %b %B %h %a %F", work / "data"]).strip().split(maxsplit=5)
    assert out == ["1", "8", "512", "1", "644", "regular file"]
    run(["truncate", "-s", "+4K", work / "data"])
    assert (work / "data").stat().st_size == 1 + PAGE
    total = sum(p.stat().st_blocks * 512 for p in work.iterdir())
    assert run(["du", "-B1", "-s", work]).split()[0] == str(total)
    assert run(["stat", "-f", "-c", "%l", work]).strip() == "255"


def test_df(shared: Mount, work: Path) -> None:
    out = run(["df", "-B1", "--output=fstype,size,used,avail,target", work]).splitlines()[1]
    fstype, size, used, avail, target = out.split()
    assert fstype == "fuse.vrangefs"
    assert int(size) == 256 * MiB
    assert int(used) + int(avail) == int(size)
    assert target == str(shared.path)
    (work / "f").write_bytes(b"x" * MiB)
    out = run(["df", "-B1", "--output=used", work]).splitlines()[1]
    assert int(out) == int(used) + MiB


def test_find(work: Path) -> None:
    make_tree(work)
    files = run(["find", work, "-type", "f", "-name", "*.txt"]).split()
    assert sorted(Path(p).relative_to(work).as_posix() for p in files) == [
        "empty.txt",
        "hardlink.txt",
        "small.txt",
        "sub/deeper/note.txt",
    ]
    assert run(["find", work, "-type", "l"]).split() == [str(work / "link")]
    assert run(["find", work, "-type", "p"]).split() == [str(work / "fifo")]
    assert run(["find", work, "-empty", "-type", "f"]).split() == [str(work / "empty.txt")]
    assert sorted(run(["find", work, "-samefile", work / "small.txt"]).split()) == [
        str(work / "hardlink.txt"),
        str(work / "small.txt"),
    ]
    every = run(["find", work]).split()
    assert len(every) == len(set(every)) == 1 + len(snapshot(work))


def test_tar_round_trip(work: Path) -> None:
    make_tree(work / "src")
    archive = work / "tree.tar"
    run(["tar", "--xattrs", "--format=posix", "-cf", archive, "-C", work / "src", "."])
    (work / "dst").mkdir()
    run(["tar", "--xattrs", "-xpf", archive, "-C", work / "dst"])
    assert snapshot(work / "dst", mtime_ns=False) == snapshot(work / "src", mtime_ns=False)
    # tar's own comparison against the filesystem agrees.
    run(["tar", "--compare", "-f", archive, "-C", work / "dst"])
    listing = run(["tar", "-tf", archive]).split()
    assert "./sub/deeper/note.txt" in listing


# -- git and sqlite -----------------------------------------------------------------------------
def test_git_repository(work: Path) -> None:
    repo = work / "repo"
    git = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
           "-c", "init.defaultBranch=main", "-c", "gc.auto=0"]  # fmt: skip
    run([*git, "init", "-q", repo])
    (repo / "README").write_text("hello\n")
    (repo / "src").mkdir()
    for i in range(50):
        (repo / "src" / f"m{i}.py").write_text(f"X = {i}\n" * (i + 1))
    run([*git, "add", "."], cwd=repo)
    run([*git, "commit", "-q", "-m", "first"], cwd=repo)
    (repo / "README").write_text("hello again\n")
    run([*git, "mv", "src/m0.py", "src/zero.py"], cwd=repo)
    run([*git, "commit", "-q", "-am", "second"], cwd=repo)
    log = run([*git, "log", "--format=%s"], cwd=repo).split()
    assert log == ["second", "first"]
    assert run([*git, "status", "--porcelain"], cwd=repo) == ""
    run([*git, "gc", "-q"], cwd=repo)  # packs, renames, mmaps
    run([*git, "fsck", "--strict", "--no-progress"], cwd=repo)
    assert run([*git, "show", "HEAD~1:README"], cwd=repo) == "hello\n"
    run([*git, "clone", "-q", repo, work / "clone"])
    assert (work / "clone" / "src" / "zero.py").read_text() == "X = 0\n"
    assert run([*git, "status", "--porcelain"], cwd=work / "clone") == ""


def _sqlite_inserts(rows: int) -> str:
    values = "\n".join(f"INSERT INTO t VALUES ({i}, 'row {i}', {i * 3});" for i in range(rows))
    schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER);"
    return f"{schema}\nBEGIN;\n{values}\nCOMMIT;\n"


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_database(work: Path, journal: str) -> None:
    db = work / "test.db"
    mode = run(["sqlite3", db, f"PRAGMA journal_mode={journal};"]).strip()
    assert mode == journal
    run(["sqlite3", db], stdin=_sqlite_inserts(10_000))
    with sqlite3.connect(db) as conn:  # another process than the writer
        count, total = conn.execute("SELECT count(*), sum(n) FROM t").fetchone()
        assert (count, total) == (10_000, 3 * sum(range(10_000)))
        assert conn.execute("SELECT name FROM t WHERE id = 4321").fetchone() == ("row 4321",)
        conn.execute("UPDATE t SET n = 0 WHERE id % 2 = 0")
        conn.execute("CREATE INDEX t_n ON t (n)")
        conn.commit()
        # The CLI sees the committed change while this connection is still open.
        zeros = run(["sqlite3", db, "SELECT count(*) FROM t WHERE n = 0;"]).strip()
        assert zeros == "5000"
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        if journal == "wal":
            assert (work / "test.db-wal").exists()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert run(["sqlite3", db, "PRAGMA integrity_check;"]).strip() == "ok"
    assert run(["sqlite3", db, "SELECT count(*) FROM t;"]).strip() == "10000"
