"""Differential integrity check: one file on vrangefs, one on tmpfs, the same operations.

Usage::

    python tools/difftest.py --mount-fresh [--ops 100000] [--seed S]
    python tools/difftest.py MOUNTPOINT [--ops 100000] [--seed S]
    python tools/difftest.py --mount-fresh --replay S [--ops N]   # rerun a seed, op by op

``--mount-fresh`` mounts a vrangefs of its own (``--memory-cap 1G --pressure-purge off``) in a
temporary directory and always unmounts it; a MOUNTPOINT given instead should be mounted the
same way (a large cap and no pressure purging), since a purge is reported as a failure. The
tmpfs file lives in ``--tmpfs-dir`` (default ``/dev/shm``). The seed is printed first; the
run depends on nothing but the seed, so ``--replay SEED`` (the same as ``--seed SEED
--verbose``) repeats it exactly, printing every operation. Exit status: 0 if the two files
never differed, 1 otherwise (the seed, the failing operation, the last operations and both
sides' bytes around the first difference are printed), 2 for bad arguments.

Operations, chosen at random with offsets biased to page (4 KiB) boundaries, the daemon's
1 MiB chunk boundaries, the end of the file and odd places, sizes up to ``--max-size``
(default 3 MiB) and beyond it only by a sparse write or truncate: ``pwrite`` (random or zero
bytes; sometimes through an ``O_APPEND`` descriptor), ``pread`` (any range, past the end too),
``ftruncate``/``truncate`` (shrink, grow, odd sizes), ``mmap`` stores and loads through
``MAP_SHARED`` mappings that live across other operations (each store followed by
``msync``), reopening (sometimes with ``O_TRUNC``), ``fsync``, dropping the kernel's cached
pages (``POSIX_FADV_DONTNEED``), and marking ranges of the vrangefs file volatile or
non-volatile, which must not change a byte while nothing is purged.

After every operation: both files' ``st_size`` must agree and their whole contents (read
through the page cache) must be equal; the vrangefs file's ``st_blocks`` must cover every page
that holds a non-zero byte and no page past the end; ``user.vrange.purged`` must be empty.
Every 16th operation, and after every cache drop, the vrangefs file is also read with
``O_DIRECT``, which bypasses the kernel's cache and shows what the daemon itself holds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import random
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.stress import fresh_mount

PAGE = 4096
CHUNK = 1 << 20
VOLATILE = "user.vrange.volatile"
NONVOLATILE = "user.vrange.nonvolatile"
PURGED = "user.vrange.purged"
DIRECT_EVERY = 16
LOG_TAIL = 40

OPS: dict[str, float] = {
    "pwrite": 24,
    "append": 3,
    "pread": 8,
    "truncate": 8,
    "mmap_store": 9,
    "mmap_load": 5,
    "remap": 2,
    "munmap": 1,
    "volatile": 7,
    "nonvolatile": 7,
    "reopen": 2,
    "fsync": 1,
    "drop_cache": 3,
}


class Mismatch(Exception):
    """The two files differ (message says how)."""


class Side:
    """One of the two files: its path, an O_RDWR descriptor and an optional shared mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.map: mmap.mmap | None = None

    def unmap(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None

    def close(self) -> None:
        self.unmap()
        os.close(self.fd)

    def read_all(self, size: int, buf: memoryview) -> memoryview:
        return self.read_all_fd(self.fd, size, buf)

    @staticmethod
    def read_all_fd(fd: int, size: int, buf: memoryview) -> memoryview:
        """The first *size* bytes of *fd* (fewer at an early end of file), read into *buf*."""
        got = 0
        while got < size:
            n = os.preadv(fd, [buf[got:size]], got)
            if n == 0:
                break
            got += n
        return buf[:got]


_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def _address(view: memoryview) -> int:
    # A read-only view would refuse from_buffer; ours are views of writable mmaps.
    holder = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(holder)
    del holder
    return address


def same(x: memoryview, y: memoryview) -> bool:
    """x == y for two equally long byte views, at memcmp speed (memoryview's own == is slow)."""
    if len(x) == 0:
        return True
    return bool(_memcmp(_address(x), _address(y), len(x)) == 0)


_ZERO_PAGE = ctypes.create_string_buffer(PAGE)


def count_data_pages(buf: mmap.mmap, size: int) -> int:
    """The number of pages of buf[:size] holding a non-zero byte."""
    base = _address(memoryview(buf))
    zero = ctypes.addressof(_ZERO_PAGE)
    return sum(1 for a in range(0, size, PAGE) if _memcmp(base + a, zero, min(PAGE, size - a)) != 0)


def hexdump(data: bytes, base: int) -> str:
    lines = []
    for i in range(0, len(data), 16):
        lines.append(f"    {base + i:10d}  {data[i : i + 16].hex(' ')}")
    return "\n".join(lines) or "    (nothing)"


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on prefix equality: memcmp speed
    while lo < hi:
        mid = (lo + hi) // 2
        if a[lo : mid + 1] == b[lo : mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class DiffTest:
    def __init__(
        self, vdir: Path, tdir: Path, seed: int, max_size: int, verbose: bool = False
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_size = max_size
        self.verbose = verbose
        name = f"difftest-{os.getpid()}"
        self.v = Side(vdir / name)
        self.t = Side(tdir / name)
        self.size = 0
        self.index = 0
        self.log: deque[str] = deque(maxlen=LOG_TAIL)
        self.counts: Counter[str] = Counter()
        self.kinds = list(OPS)
        self.weights = list(OPS.values())
        self.bufs = [mmap.mmap(-1, max_size + PAGE) for _ in range(3)]

    def close(self) -> None:
        for side in (self.v, self.t):
            side.close()
            with contextlib.suppress(OSError):
                os.unlink(side.path)
        for buf in self.bufs:
            buf.close()

    def note(self, text: str) -> None:
        entry = f"#{self.index} {text}"
        self.log.append(entry)
        if self.verbose:
            print(entry, flush=True)

    # -- choosing --------------------------------------------------------------------------
    def offset(self) -> int:
        """An offset biased to page and 1 MiB boundaries, the end of the file, odd places."""
        rng, size = self.rng, self.size
        r = rng.random()
        if r < 0.2:
            off = rng.randint(0, max(size, 1) // PAGE) * PAGE
        elif r < 0.35:
            off = rng.randint(0, self.max_size // CHUNK) * CHUNK
        elif r < 0.5:
            base = rng.choice((rng.randint(0, self.max_size // PAGE) * PAGE, size))
            off = base + rng.choice((-PAGE - 1, -PAGE, -1, 1, PAGE - 1, PAGE, PAGE + 1))
        elif r < 0.6:
            off = size
        elif r < 0.65:
            off = size + rng.randint(1, 3 * PAGE)  # past the end: a hole before it
        else:
            off = rng.randint(0, max(size, PAGE))
        return min(max(off, 0), self.max_size)

    def length(self, off: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            n = 0
        elif r < 0.35:
            n = rng.randint(1, 300)
        elif r < 0.6:
            n = rng.randint(1, 4) * PAGE + rng.choice((0, 0, -1, 1, rng.randint(1, PAGE - 1)))
        elif r < 0.85:
            n = rng.randint(PAGE, 64 * PAGE)
        elif r < 0.95:
            n = CHUNK - off % CHUNK + rng.choice((-PAGE, -1, 0, 1, PAGE))  # to a chunk boundary
        else:
            n = rng.randint(CHUNK, 2 * CHUNK)
        return max(min(n, self.max_size - off), 0)

    def data(self, n: int) -> bytes:
        if self.rng.random() < 0.1:
            return bytes(n)
        return self.rng.randbytes(n)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, ops: int, progress: Callable[[int], None] | None = None) -> None:
        for self.index in range(1, ops + 1):
            kind = self.rng.choices(self.kinds, self.weights)[0]
            getattr(self, "op_" + kind)()
            self.counts[kind] += 1
            self.check(direct=self.index % DIRECT_EVERY == 0 or kind == "drop_cache")
            if progress is not None:
                progress(self.index)

    def both(self, name: str, fn: Callable[[Side], object]) -> tuple[object, object]:
        """Apply fn to both sides; they must return the same or fail with the same errno."""
        results: list[object] = []
        for side in (self.v, self.t):
            try:
                results.append(fn(side))
            except OSError as e:
                results.append(f"OSError {e.errno} ({e.strerror})")
        if results[0] != results[1]:
            a, b = (repr(r)[:200] for r in results)
            raise Mismatch(f"{name}: vrangefs gave {a}, tmpfs gave {b}")
        return results[0], results[1]

    # -- operations --------------------------------------------------------------------------
    def op_pwrite(self) -> None:
        off = self.offset()
        data = self.data(self.length(off))
        self.note(f"pwrite off={off} len={len(data)}")
        self.both("pwrite", lambda s: os.pwrite(s.fd, data, off))
        if data:
            self.size = max(self.size, off + len(data))

    def op_append(self) -> None:
        data = self.data(self.length(self.size))
        self.note(f"append len={len(data)} (O_APPEND, at {self.size})")

        def write(s: Side) -> int:
            fd = os.open(s.path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both("append", write)
        self.size += len(data)

    def op_pread(self) -> None:
        off = self.offset() + self.rng.choice((0, 0, 0, self.rng.randint(0, PAGE)))
        n = self.length(min(off, self.max_size)) + self.rng.randint(0, 2)
        self.note(f"pread off={off} len={n}")
        self.both("pread", lambda s: os.pread(s.fd, n, off))

    def op_truncate(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            size = 0
        elif r < 0.5:
            size = rng.randint(0, self.size)
        elif r < 0.75:
            size = self.offset()
        else:
            size = min(self.size + rng.randint(1, CHUNK), self.max_size)
        how = rng.choice(("ftruncate", "truncate"))
        self.note(f"{how} {self.size} -> {size}")
        if how == "ftruncate":
            self.both(how, lambda s: os.ftruncate(s.fd, size))
        else:
            self.both(how, lambda s: os.truncate(s.path, size))
        self.size = size

    def ensure_map(self) -> int:
        """Map both files (the whole current size) unless mapped; returns the mapped length."""
        mapped = self.v.map
        if mapped is not None and len(mapped) > 0:
            return len(mapped)
        if self.size == 0:
            return 0
        self.note(f"  mmap length={self.size}")
        for side in (self.v, self.t):
            side.map = mmap.mmap(side.fd, self.size, mmap.MAP_SHARED)
        return self.size

    def mapped_range(self) -> tuple[int, int] | None:
        """A range to store into or load from: inside the mapping and the file."""
        limit = min(self.ensure_map(), self.size)
        if limit == 0:
            return None
        a = self.rng.randint(0, limit - 1)
        if self.rng.random() < 0.3:
            a = a // PAGE * PAGE
        n = self.rng.choice((1, self.rng.randint(1, 200), PAGE, self.rng.randint(1, 8 * PAGE)))
        return a, min(a + n, limit)

    def op_mmap_store(self) -> None:
        r = self.mapped_range()
        if r is None:
            return self.op_pwrite()
        a, b = r
        data = self.data(b - a)
        self.note(f"mmap_store [{a},{b}) + msync")
        for side in (self.v, self.t):
            assert side.map is not None
            side.map[a:b] = data
            lo = a // PAGE * PAGE
            side.map.flush(lo, b - lo)
        return None

    def op_mmap_load(self) -> None:
        r = self.mapped_range()
        if r is None:
            return self.op_pread()
        a, b = r
        self.note(f"mmap_load [{a},{b})")
        assert self.v.map is not None and self.t.map is not None
        x, y = self.v.map[a:b], self.t.map[a:b]
        if x != y:
            i = first_difference(x, y)
            raise Mismatch(
                f"mmap load [{a},{b}) differs at {a + i}:\n"
                f"  vrangefs\n{hexdump(x[i : i + 32], a + i)}\n"
                f"  tmpfs\n{hexdump(y[i : i + 32], a + i)}"
            )
        return None

    def op_remap(self) -> None:
        self.note("remap")
        self.v.unmap()
        self.t.unmap()
        self.ensure_map()

    def op_munmap(self) -> None:
        self.note("munmap")
        self.v.unmap()
        self.t.unmap()

    def pick_range(self) -> tuple[int, int]:
        if self.rng.random() < 0.15:
            return 0, 0
        off = self.offset()
        n = 0 if self.rng.random() < 0.2 else self.length(off) + self.rng.randint(0, PAGE)
        return off, n

    def op_volatile(self) -> None:
        off, n = self.pick_range()
        self.note(f"volatile {off},{n}")
        os.setxattr(self.v.fd, VOLATILE, b"%d,%d" % (off, n))

    def op_nonvolatile(self) -> None:
        off, n = self.pick_range()
        self.note(f"nonvolatile {off},{n}")
        os.setxattr(self.v.fd, NONVOLATILE, b"%d,%d" % (off, n))

    def op_reopen(self) -> None:
        trunc = self.rng.random() < 0.2
        self.note("reopen" + (" O_TRUNC" if trunc else ""))
        for side in (self.v, self.t):
            os.close(side.fd)
            side.fd = os.open(side.path, os.O_RDWR | (os.O_TRUNC if trunc else 0))
        if trunc:
            self.size = 0

    def op_fsync(self) -> None:
        self.note("fsync")
        self.both("fsync", lambda s: os.fsync(s.fd))

    def op_drop_cache(self) -> None:
        self.note("fadvise DONTNEED")
        for side in (self.v, self.t):
            os.posix_fadvise(side.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    # -- checks ---------------------------------------------------------------------------------
    def check(self, direct: bool) -> None:
        sv, st = os.fstat(self.v.fd), os.fstat(self.t.fd)
        if sv.st_size != st.st_size or sv.st_size != self.size:
            raise Mismatch(
                f"st_size: vrangefs {sv.st_size}, tmpfs {st.st_size}, expected {self.size}"
            )
        x = self.v.read_all(self.size, memoryview(self.bufs[0]))
        y = self.t.read_all(self.size, memoryview(self.bufs[1]))
        self.compare("read", x, y)
        if direct:
            self.compare("O_DIRECT read", self.read_direct(), y)
        purged = os.getxattr(self.v.fd, PURGED)
        if purged:
            raise Mismatch(f"pages were purged (is pressure purging off?): {purged!r}")
        pages = -(-self.size // PAGE)
        data_pages = count_data_pages(self.bufs[1], self.size)
        if not data_pages * 8 <= sv.st_blocks <= pages * 8:
            raise Mismatch(
                f"vrangefs st_blocks {sv.st_blocks}: {data_pages} pages hold data and the file "
                f"spans {pages}, so it must be between {data_pages * 8} and {pages * 8} "
                f"(tmpfs says {st.st_blocks})"
            )

    def read_direct(self) -> memoryview:
        fd = os.open(self.v.path, os.O_RDONLY | os.O_DIRECT)
        try:
            return Side.read_all_fd(fd, self.size, memoryview(self.bufs[2]))
        finally:
            os.close(fd)

    def compare(self, how: str, xv: memoryview, yv: memoryview) -> None:
        if len(xv) == len(yv) and same(xv, yv):
            return
        x, y = xv.tobytes(), yv.tobytes()
        i = first_difference(x, y)
        lo = max(i - 16, 0) // 16 * 16
        raise Mismatch(
            f"{how}: contents differ at byte {i} (page {i // PAGE}, chunk {i // CHUNK}); "
            f"lengths {len(x)} and {len(y)}\n  vrangefs:\n{hexdump(x[lo : lo + 64], lo)}\n"
            f"  tmpfs:\n{hexdump(y[lo : lo + 64], lo)}"
        )


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def run(vdir: Path, args: argparse.Namespace, seed: int) -> int:
    test = DiffTest(vdir, args.tmpfs_dir, seed, args.max_size, verbose=args.verbose)
    start = time.monotonic()
    last = [start]

    def progress(i: int) -> None:
        now = time.monotonic()
        if now - last[0] >= args.progress:
            last[0] = now
            print(f"  {i} ops, {now - start:.0f} s, size {test.size}", flush=True)

    try:
        test.run(args.ops, progress)
    except (Mismatch, OSError) as e:
        print(f"\ndifftest: MISMATCH at operation #{test.index} (seed {seed}): {e}")
        print(f"last {len(test.log)} operations:")
        for entry in test.log:
            print(f"  {entry}")
        where = "--mount-fresh" if args.mount_fresh else str(args.mountpoint)
        print(f"rerun: python tools/difftest.py {where} --replay {seed} --ops {test.index}")
        return 1
    finally:
        test.close()
    elapsed = time.monotonic() - start
    print(f"\ndifftest: {args.ops} operations in {elapsed:.1f} s, no difference (seed {seed})")
    for kind, n in sorted(test.counts.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<12} {n:>8}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vrangefs against tmpfs, op by op.")
    parser.add_argument("mountpoint", nargs="?", type=Path, help="a mounted vrangefs")
    parser.add_argument("--mount-fresh", action="store_true", help="mount our own vrangefs")
    parser.add_argument("--ops", type=int, default=100_000, help="operations (default 100000)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--replay", type=int, metavar="SEED", help="rerun SEED verbosely")
    parser.add_argument("--verbose", action="store_true", help="print every operation")
    parser.add_argument("--max-size", type=parse_size, default=3 * CHUNK, help="default 3M")
    parser.add_argument("--tmpfs-dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--progress", type=float, default=30, help="seconds between reports")
    args = parser.parse_args(argv)
    if (args.mountpoint is None) == (not args.mount_fresh):
        parser.error("give a MOUNTPOINT or --mount-fresh (one of them)")
    if args.replay is not None:
        args.seed, args.verbose = args.replay, True
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"difftest: seed {seed}, {args.ops} operations", flush=True)
    tdir = Path(tempfile.mkdtemp(prefix="difftest-", dir=args.tmpfs_dir))
    args.tmpfs_dir = tdir
    try:
        if not args.mount_fresh:
            return run(args.mountpoint, args, seed)
        try:
            with fresh_mount("1G", ["--pressure-purge", "off"], label="difftest") as mnt:
                status = run(mnt, args, seed)
        except RuntimeError as e:
            print(f"difftest: {e}", file=sys.stderr)
            return 1
        return status
    finally:
        with contextlib.suppress(OSError):
            tdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
