"""What a small-file create costs on the wire, counted in the daemon's --debug log.

``open(O_CREAT|O_EXCL)`` + write 4 KiB + close reaches the daemon as six requests on this
kernel, and no fewer can: GETATTR of the directory (the previous create made the kernel
drop its attributes, and ``default_permissions`` needs them for the lookup's permission
check), LOOKUP of the new name (the kernel asks for every name it holds no dentry for),
CREATE, GETXATTR ``security.capability`` (before every write(2): FUSE mounts are not
SB_NOSEC unless the daemon takes FUSE_HANDLE_KILLPRIV_V2, which pyfuse3 cannot ask for),
WRITE, and RELEASE after close.  No FLUSH (answered ENOSYS once, the kernel stops asking),
no OPEN, no GETATTR of the new file.  bench/README.md, "Requests per create", has the
kernel side.  These tests keep that count from growing, and check what the kernel answers
alone afterwards: a second stat, and a miss looked up again.
"""

from __future__ import annotations

import errno
import os
import re
from collections import Counter
from pathlib import Path

from tests.conftest import wait_until
from tests.integration.conftest import Mount, Mounter, errno_of

FILES = 50
REQUEST = re.compile(r" vrangefs\.operations DEBUG: (\w+)\((.*)$")


def requests(mount: Mount) -> list[tuple[str, str]]:
    """Every request handler the daemon logged, in order: (name, arguments)."""
    assert mount.log is not None
    found = []
    for line in mount.log.read_text(errors="replace").splitlines():
        m = REQUEST.search(line)
        if m is not None:
            found.append((m.group(1), m.group(2)))
    return found


def marker(mount: Mount, name: str) -> None:
    """A request the log shows, to find where a phase starts (an absent xattr)."""
    assert errno_of(os.getxattr, mount.path, f"user.{name}") == errno.ENODATA


def between(logged: list[tuple[str, str]], start: str, end: str | None) -> list[tuple[str, str]]:
    """The requests logged after marker *start* and before marker *end* (None: to the end)."""

    def index(name: str) -> int:
        return next(i for i, (_, args) in enumerate(logged) if f"b'user.{name}'" in args)

    return logged[index(start) + 1 : len(logged) if end is None else index(end)]


def create_small_files(directory: Path, count: int) -> list[Path]:
    paths = [directory / f"small-{i:04d}" for i in range(count)]
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            assert os.write(fd, b"\xa5" * 4096) == 4096
        finally:
            os.close(fd)
    return paths


def test_a_small_file_create_is_six_requests(mounter: Mounter) -> None:
    mount = mounter.foreground(["--debug", "--memory-cap", "8M"])
    marker(mount, "start")
    create_small_files(mount.path, FILES)
    marker(mount, "end")

    # RELEASE is sent in the background after close: wait for the last one.
    def released() -> bool:
        return (
            sum(name == "release" for name, _ in between(requests(mount), "start", None)) >= FILES
        )

    wait_until(released, 10, f"{FILES} releases logged")
    phase = [(n, a) for n, a in between(requests(mount), "start", None) if "b'user.end'" not in a]
    counts = Counter(name for name, _ in phase)
    assert counts == {
        "getattr": FILES,
        "lookup": FILES,
        "create": FILES,
        "getxattr": FILES,
        "write": FILES,
        "release": FILES,
    }, phase[:12]
    assert all(args.startswith("1,") for name, args in phase if name == "getattr")  # the dir
    assert all("b'security.capability'" in args for name, args in phase if name == "getxattr")


def test_what_the_kernel_answers_alone_after_creates(mounter: Mounter) -> None:
    mount = mounter.foreground(["--debug", "--memory-cap", "8M"])
    paths = create_small_files(mount.path, FILES)
    marker(mount, "stat")
    for path in paths:  # the write made the kernel drop the size: one GETATTR each
        assert os.stat(path).st_size == 4096
    marker(mount, "stat-again")
    for path in paths:  # from the kernel's attribute cache
        assert os.stat(path).st_size == 4096
    marker(mount, "unlink")
    for path in paths:
        path.unlink()
    marker(mount, "missing")
    for _ in range(2):  # the first miss reaches the daemon, the second is a negative dentry
        for path in paths:
            assert errno_of(os.stat, path) == errno.ENOENT
    marker(mount, "end")
    logged = requests(mount)
    stat = Counter(n for n, _ in between(logged, "stat", "stat-again"))
    assert stat == {"getattr": FILES}
    assert Counter(n for n, _ in between(logged, "stat-again", "unlink")) == {}
    unlink = Counter(n for n, _ in between(logged, "unlink", "missing"))
    assert unlink["unlink"] == FILES and unlink["lookup"] == 0
    missing = Counter(n for n, _ in between(logged, "missing", "end"))
    assert missing["lookup"] == FILES
    # Nothing was lost on the way: the files are gone and the daemon holds nothing of them.
    assert not any(p.exists() for p in paths)
