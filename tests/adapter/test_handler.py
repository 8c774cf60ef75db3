"""The handler wrapper: the one place where errors become errno.

FsError becomes FUSEError with its errno (no traceback chained, nothing logged
as an error); FUSEError passes through; anything else is a bug, logged with its
traceback and answered EIO, and the next request is served; exceptions that are
not errors (cancellation, KeyboardInterrupt) are not swallowed.  Fault injection
arms a handler only when enabled, only on the root, and only once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import pytest
import trio

from tests.adapter.harness import ROOT, Fs, context, errno_of, run, setattr_fields
from vrangefs import operations
from vrangefs.operations import Operations
from vrangefs.pagestore import PAGE_SIZE, PageStore
from vrangefs.protocol import VOLATILE_B
from vrangefs.volume import Volume

FAULT = b"user.vrange.fault"


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_fs_errors_become_fuse_errors_with_their_errno(caplog: pytest.LogCaptureFixture) -> None:
    fs = Fs(cap_pages=4)
    ctx = fs.ctx

    async def body() -> dict[str, int | None]:
        d = await fs.ops.mkdir(ROOT, b"d", 0o755, ctx)
        await fs.ops.mkdir(d.st_ino, b"sub", 0o755, ctx)
        f = await fs.create(b"f", b"x" * (4 * PAGE_SIZE))  # the cap, none of it volatile
        return {
            "unlink missing": await errno_of(fs.ops.unlink(ROOT, b"nope", ctx)),
            "lookup too long": await errno_of(fs.ops.lookup(ROOT, b"n" * 256, ctx)),
            "mkdir existing": await errno_of(fs.ops.mkdir(ROOT, b"d", 0o755, ctx)),
            "rmdir non-empty": await errno_of(fs.ops.rmdir(ROOT, b"d", ctx)),
            "unlink a directory": await errno_of(fs.ops.unlink(ROOT, b"d", ctx)),
            "getattr unknown inode": await errno_of(fs.ops.getattr(999, ctx)),
            "readlink of a file": await errno_of(fs.ops.readlink(f.ino, ctx)),
            "open a directory": await errno_of(fs.ops.open(d.st_ino, os.O_RDONLY, ctx)),
            "xattr namespace": await errno_of(fs.ops.getxattr(f.ino, b"os2.x", ctx)),
            "xattr missing": await errno_of(fs.ops.getxattr(f.ino, b"user.x", ctx)),
            "remove a vrange name": await errno_of(fs.ops.removexattr(f.ino, VOLATILE_B, ctx)),
            "write past the cap": await errno_of(fs.ops.write(f.fh, 4 * PAGE_SIZE, b"y")),
            "truncate a directory": await errno_of(
                fs.ops.setattr(d.st_ino, attr_size(0), size_field(), None, ctx)
            ),
        }

    assert run(body) == {
        "unlink missing": errno.ENOENT,
        "lookup too long": errno.ENAMETOOLONG,
        "mkdir existing": errno.EEXIST,
        "rmdir non-empty": errno.ENOTEMPTY,
        "unlink a directory": errno.EISDIR,
        "getattr unknown inode": errno.ESTALE,
        "readlink of a file": errno.EINVAL,
        "open a directory": errno.EISDIR,
        "xattr namespace": errno.EOPNOTSUPP,
        "xattr missing": errno.ENODATA,
        "remove a vrange name": errno.ENODATA,
        "write past the cap": errno.ENOSPC,
        "truncate a directory": errno.EISDIR,
    }
    assert errors_logged(caplog) == []
    fs.volume.check_invariants()


def attr_size(size: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = size
    return attr


def size_field() -> pyfuse3.SetattrFields:
    return setattr_fields(update_size=True)


def test_fs_error_is_raised_without_its_context() -> None:
    fs = Fs()

    async def body() -> pyfuse3.FUSEError:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.ops.unlink(ROOT, b"nope", fs.ctx)
        return info.value

    e = run(body)
    assert e.errno == errno.ENOENT
    assert e.__cause__ is None and e.__suppress_context__  # "from None": the errno is the message
    fs.volume.check_invariants()


def test_an_unexpected_exception_becomes_eio_and_is_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = Fs()

    def broken(ino: int, off: int, size: int) -> bytes:
        raise ZeroDivisionError("a bug")

    async def body() -> tuple[int | None, bytes]:
        f = await fs.create(b"f", b"data")
        with monkeypatch.context() as patch:
            patch.setattr(fs.volume, "read", broken)
            err = await errno_of(fs.ops.read(f.fh, 0, 4))
        return err, await fs.read(f, 0, 4)  # the next request is served

    err, after = run(body)
    assert err == errno.EIO
    assert after == b"data"
    [record] = errors_logged(caplog)
    assert record.name == "vrangefs.operations"
    assert "unexpected error in read" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    fs.volume.check_invariants()


def test_a_fuse_error_passes_through_unlogged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = Fs()

    def refuse(ino: int) -> None:
        raise pyfuse3.FUSEError(errno.EACCES)

    monkeypatch.setattr(fs.volume, "inode", refuse)
    assert run(lambda: errno_of(fs.ops.getattr(ROOT, fs.ctx))) == errno.EACCES
    assert errors_logged(caplog) == []
    monkeypatch.undo()
    fs.volume.check_invariants()


def test_base_exceptions_are_not_swallowed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancellation (a BaseException in trio) must reach trio, not become EIO."""
    fs = Fs()

    def interrupted(ino: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fs.volume, "inode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(lambda: fs.ops.getattr(ROOT, fs.ctx))
    assert errors_logged(caplog) == []
    monkeypatch.undo()
    fs.volume.check_invariants()


def test_the_request_context_gives_new_inodes_their_owner() -> None:
    fs = Fs()

    async def body() -> tuple[int, int, int, int]:
        ctx = context(uid=1234, gid=5678)
        _, attr = await fs.ops.create(ROOT, b"f", 0o600, os.O_RDWR, ctx)
        d = await fs.ops.mkdir(ROOT, b"d", 0o700, ctx)
        return attr.st_uid, attr.st_gid, d.st_uid, stat.S_IMODE(attr.st_mode)

    assert run(body) == (1234, 5678, 1234, 0o600)
    fs.volume.check_invariants()


# -- fault injection ----------------------------------------------------------------
@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    pending: set[str] = set()
    monkeypatch.setattr(operations, "_pending_faults", pending)
    return pending


def test_fault_injection_is_refused_when_disabled(
    monkeypatch: pytest.MonkeyPatch, faults: set[str]
) -> None:
    monkeypatch.setattr(operations, "FAULT_INJECTION", False)
    fs = Fs()

    async def body() -> tuple[int | None, bytes]:
        f = await fs.create(b"f", b"data")
        err = await errno_of(fs.ops.setxattr(ROOT, FAULT, b"read", fs.ctx))
        return err, await fs.read(f, 0, 4)

    err, data = run(body)
    assert err == errno.EINVAL  # an unknown user.vrange. name
    assert data == b"data"
    assert faults == set()
    fs.volume.check_invariants()


def test_an_injected_fault_costs_one_call_of_that_handler(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, faults: set[str]
) -> None:
    monkeypatch.setattr(operations, "FAULT_INJECTION", True)
    fs = Fs()

    async def body() -> list[object]:
        f = await fs.create(b"f", b"data")
        await fs.ops.setxattr(ROOT, FAULT, b"read\n", fs.ctx)
        armed = set(faults)
        attr = await fs.ops.getattr(f.ino, fs.ctx)  # another handler: unaffected
        first = await errno_of(fs.ops.read(f.fh, 0, 4))
        second = await fs.read(f, 0, 4)
        return [armed, attr.st_size, first, second]

    assert run(body) == [{"read"}, 4, errno.EIO, b"data"]
    [record] = errors_logged(caplog)
    assert record.exc_info is not None and record.exc_info[0] is operations.InjectedFault
    assert faults == set()
    fs.volume.check_invariants()


def test_fault_injection_only_on_the_root(
    monkeypatch: pytest.MonkeyPatch, faults: set[str]
) -> None:
    monkeypatch.setattr(operations, "FAULT_INJECTION", True)
    fs = Fs()

    async def body() -> tuple[int | None, bytes]:
        f = await fs.create(b"f", b"data")
        err = await errno_of(fs.ops.setxattr(f.ino, FAULT, b"read", fs.ctx))
        return err, await fs.read(f, 0, 4)

    assert run(body) == (errno.EINVAL, b"data")
    assert faults == set()
    fs.volume.check_invariants()


def test_setattr_truncate_through_the_adapter() -> None:
    """A sanity check of the fake kernel: SETATTR fields reach the volume."""
    fs = Fs()

    async def body() -> tuple[int, int]:
        f = await fs.create(b"f", b"x" * (3 * PAGE_SIZE))
        attr = await fs.ops.setattr(f.ino, attr_size(PAGE_SIZE + 1), size_field(), None, fs.ctx)
        return attr.st_size, fs.volume.store.used_pages

    assert run(body) == (PAGE_SIZE + 1, 2)
    fs.volume.check_invariants()


def test_forget_never_raises_into_pyfuse3(caplog: pytest.LogCaptureFixture) -> None:
    """pyfuse3 awaits FORGET in its main loop with no reply to send: an exception there,
    FUSEError included, would end the daemon. A failing forget is logged and swallowed."""
    vol = Volume(PageStore(16 * PAGE_SIZE))
    ops = Operations(vol, invalidate=lambda ino: None)

    def broken(ino: int, count: int) -> None:
        raise RuntimeError("boom")

    vol.forget = broken  # type: ignore[method-assign]

    async def main() -> None:
        await ops.forget([(pyfuse3.InodeT(5), 1), (pyfuse3.InodeT(6), 2)])

    trio.run(main)
    assert caplog.text.count("unexpected error in forget") == 2
