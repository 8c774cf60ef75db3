"""The pool of freed, still-faulted pages: a bounded amount of freed memory (1/16 of the cap,
at most 32 MiB) is kept for the next write, reported as ``page_pool_bytes``, handed out zeroed,
and never counted as data; everything freed past it goes back to the kernel.
"""

from __future__ import annotations

import os

from tests.conftest import wait_until
from tests.integration.conftest import Mounter
from tests.integration.test_leaks import rss
from tests.integration.vrange_helpers import PAGE, pattern, stats

MiB = 1 << 20


def test_freed_pages_up_to_the_bound_are_kept_and_come_back_zeroed(mounter: Mounter) -> None:
    mount = mounter.mount("64M")  # a pool of 4 MiB
    assert mount.pid is not None
    f = mount.path / "f"
    s = stats(mount.path)
    assert s["page_pool_bytes"] == 0
    start = rss(mount.pid)
    f.write_bytes(b"\xee" * 16 * MiB)
    written = rss(mount.pid)
    os.truncate(f, 0)  # frees the pages at once (an unlink frees them on FORGET)
    s = stats(mount.path)
    assert s["resident_bytes"] == 0
    assert s["page_pool_bytes"] == 4 * MiB  # the bound: the other 12 MiB go back
    assert s["returning_bytes"] in (0, 12 * MiB)  # once the reaper's step has run
    wait_until(lambda: stats(mount.path)["returning_bytes"] == 0, message="12 MiB returned")
    assert rss(mount.pid) <= written - 10 * MiB, (start, written, rss(mount.pid))

    # A new file's first write takes the pooled pages: unwritten bytes read as zeros.
    g = mount.path / "g"
    with open(g, "wb") as out:
        out.seek(5)
        out.write(b"x")
    assert g.read_bytes() == bytes(5) + b"x"
    content = pattern(2 * MiB // PAGE)
    with open(g, "r+b") as out:
        out.seek(PAGE + 1)
        out.write(content)
    fd = os.open(g, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the daemon, not the cache
    finally:
        os.close(fd)
    assert g.read_bytes() == bytes(5) + b"x" + bytes(PAGE - 5) + content
    s = stats(mount.path)
    assert s["page_pool_bytes"] == 4 * MiB - s["resident_bytes"]
    assert s["resident_bytes"] + s["page_pool_bytes"] <= s["memory_cap"]
