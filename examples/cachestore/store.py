"""A content-addressed blob cache that lets the filesystem shed it: :class:`CacheStore`.

Objects live one per file under ``ROOT/objects/ab/cdef...`` (the sha256 of the content, split
after two hex digits so no directory grows huge).  On a vrangefs mount every object is volatile
whenever nobody is reading it, so the filesystem may purge it, least recently used first, when
it needs memory: the cache never fills up and never gets its owner killed.  A purged object is
found out when it is next read (it is then a miss, and removed).  On any other filesystem
(tmpfs, ext4, ...) the same code stores plain files and calls nothing of vrangefs.

Several processes may use one cache at once.  What makes that safe:

* **Publishing is atomic.**  An object is written to a temporary file (``.tmp-PID-RANDOM``) in
  the same directory and renamed into place only when complete, so no reader ever finds a
  partial object under its final name.  A reader that opened the previous file of the same
  key keeps reading that inode (same content: the name is its hash).
* **Objects are volatile from their first byte.**  The temporary file is sized and marked
  volatile before anything is written.  A writer that dies at any point leaves nothing that
  the filesystem cannot purge; :meth:`CacheStore.sweep` removes the names it leaves.  If the
  filesystem purges the object while it is being written, it is not published.
* **Readers pin, and the last reader out unpins.**  Volatility belongs to the inode, not to a
  process, so two readers pinning the same object with plain ``mark_nonvolatile`` /
  ``mark_volatile`` would unpin it under each other.  Readers therefore hold a shared
  ``flock`` while pinned; on the way out a reader makes the object volatile again only if it
  can take the lock exclusively (nobody else is reading).  Pins are taken *after* opening,
  and what was purged is read *after* pinning, so a purge between open and pin is seen.
* **Everything is checked.**  A purged object, a read that fails with EIO, a vanished file
  (ENOENT at any point) and content whose hash is not its name are all misses.  A damaged
  object is removed without ever removing a fresh one that another process published under
  the same name meanwhile (see :meth:`CacheStore._discard`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from vrangefs import client, mountinfo

CHUNK = 1 << 20
"""How much put_file and get_to move at a time."""

TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SCRATCH_RE = re.compile(r"\.(?:tmp|trash)-(\d+)-[0-9a-f]+")

StrPath = str | os.PathLike[str]


class BadKeyError(ValueError):
    """Not a key of this cache (keys are 64 lower-case hex digits: a sha256)."""


@dataclass
class Counters:
    """What one :class:`CacheStore` instance did (per process, not shared)."""

    hits: int = 0
    misses: int = 0
    """All misses: absent, purged and corrupt ones."""
    purged_misses: int = 0
    """The object was there but the filesystem had purged (part of) it."""
    corrupt_misses: int = 0
    """The object's content did not hash to its name."""
    puts: int = 0
    put_bytes: int = 0
    deduplicated_puts: int = 0
    """The object was already there, intact: it was only made most recently used."""
    lost_puts: int = 0
    """Purged while being written, so not published."""
    failed_puts: int = 0
    """The put raised (ENOSPC on a full tmpfs, for instance)."""
    deletes: int = 0


@dataclass
class CacheStats(Counters):
    """:class:`Counters` plus what the filesystem says about the whole mount.

    ``mount`` is vrangefs' ``user.vrange.stats`` (``resident_bytes``, ``purge_events``,
    ``purged_bytes_total``, ``daemon_rss_bytes``, ...) when the cache is volatile, else
    ``size_bytes`` and ``used_bytes`` from statvfs.
    """

    volatile: bool = False
    mount: dict[str, int | str] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass
class Usage:
    """What the cache directory holds now (a walk: as costly as the number of objects)."""

    objects: int = 0
    bytes: int = 0
    """Sum of the objects' sizes."""
    resident_bytes: int = 0
    """Bytes of allocated blocks; on vrangefs purged pages count none."""
    scratch_files: int = 0
    """Temporary and trash files (in progress, or left by a writer that died)."""


def key_of(data: bytes | bytearray | memoryview) -> str:
    """The key :meth:`CacheStore.put` gives *data*."""
    return hashlib.sha256(data).hexdigest()


def mount_root(path: StrPath) -> Path:
    """The mount point of the filesystem that holds *path*."""
    p = Path(os.path.realpath(path))
    while not os.path.ismount(p):
        p = p.parent
    return p


def fstype_of(mountpoint: StrPath) -> str | None:
    """The type of the filesystem mounted at *mountpoint* (``fuse.vrangefs``, ``tmpfs``, ...).

    Read afresh from the mount table, matching the mount point (the top mount there) and its
    current device number: the kernel hands a freed anonymous device number to the next
    mount, so a cached answer could take a tmpfs mounted later for an earlier vrangefs.
    """
    entry = mountinfo.find(mountpoint)
    if entry is None or not entry.is_device(os.stat(mountpoint).st_dev):
        return None
    return entry.fstype


class CacheStore:
    """A content-addressed cache of byte strings under *root*.

    *volatile*: ``None`` (default) detects whether *root* is on vrangefs once, here (from the
    mount table, see :func:`fstype_of`); ``True`` insists (``NotVrangefsError`` otherwise);
    ``False`` stores plain files even on vrangefs, which then fills up like any other
    directory and calls nothing of vrangefs.  *fsync*
    flushes each object before publishing it (pointless on an in-memory filesystem; there for
    disks).  One instance is not thread-safe; processes may share the directory freely.
    """

    def __init__(self, root: StrPath, *, volatile: bool | None = None, fsync: bool = False):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.scratch = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.mount = mount_root(self.root)
        self.fsync = fsync
        if volatile is None:
            volatile = fstype_of(self.mount) == client.FUSE_FSTYPE
        if volatile:
            client.stats(self.mount)  # raises NotVrangefsError elsewhere
        self.volatile: bool = volatile
        self.counters = Counters()

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r}, volatile={self.volatile})"

    # -- names ------------------------------------------------------------------------
    def path_of(self, key: str) -> Path:
        """Where the object *key* lives (raises :class:`BadKeyError` for a malformed key)."""
        if not _KEY_RE.fullmatch(key):
            raise BadKeyError(f"not a cache key (64 lower-case hex digits): {key!r}")
        return self.objects / key[:2] / key[2:]

    # -- writing ----------------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store *data*; return its key (its sha256, hex).

        If an intact copy is already there it is kept and made most recently used.  The key is
        returned even when the object could not be kept (purged while being written): a cache
        entry may vanish at any time, and :meth:`get` tells.  Raises OSError (ENOSPC on a full
        non-volatile filesystem, or on vrangefs when nothing volatile is left to purge).
        """
        key = key_of(data)
        path = self.path_of(key)
        try:
            if self._refresh(path, len(data)):
                self.counters.deduplicated_puts += 1
            else:
                self._publish(path.parent, [data], len(data), path)
        except OSError:
            self.counters.failed_puts += 1
            raise
        self.counters.puts += 1
        self.counters.put_bytes += len(data)
        return key

    def put_file(self, source: StrPath | BinaryIO) -> str:
        """Store the content of a file (a path, or a binary file object read to its end).

        Streams in :data:`CHUNK` pieces, so objects larger than memory are fine; the key is
        known only at the end, so the temporary file lives in ``ROOT/tmp`` (same filesystem:
        the rename is still atomic).
        """
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:
                return self.put_file(f)
        size: int | None = None
        with suppress(OSError, ValueError, AttributeError):
            st = os.fstat(source.fileno())
            if stat.S_ISREG(st.st_mode):
                size = st.st_size - source.tell()
        chunks = iter(lambda: source.read(CHUNK), b"")
        try:
            key, n = self._publish(self.scratch, chunks, size, None)
        except OSError:
            self.counters.failed_puts += 1
            raise
        self.counters.puts += 1
        self.counters.put_bytes += n
        return key

    def _publish(
        self,
        directory: Path,
        chunks: Iterable[bytes | bytearray | memoryview],
        size: int | None,
        final: Path | None,
    ) -> tuple[str, int]:
        """Write a temporary file in *directory*, then rename it to *final* (or to its key).

        Returns (key, bytes written).  The temporary file is volatile before its first byte
        (when the size is known up front; else as soon as it is complete), so a writer that
        dies leaves nothing unpurgeable behind.
        """
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if self.volatile and size:
                os.ftruncate(fd, size)  # a hole: costs no memory
                client.mark_volatile(fd)
            digest = hashlib.sha256()
            written = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                digest.update(view)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
            if written != size:
                os.ftruncate(fd, written)
                if self.volatile and written:
                    client.mark_volatile(fd)
            if self.fsync:
                os.fsync(fd)
            lost = self.volatile and bool(client.purged(fd))
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        key = digest.hexdigest()
        if final is None:
            final = self.path_of(key)
            if self._refresh(final, written):
                os.unlink(tmp)
                self.counters.deduplicated_puts += 1
                return key, written
            final.parent.mkdir(parents=True, exist_ok=True)
        if lost:
            os.unlink(tmp)
            self.counters.lost_puts += 1
        else:
            os.rename(tmp, final)
        return key, written

    def _refresh(self, path: Path, size: int) -> bool:
        """True if an intact object of *size* bytes is at *path*; it becomes most recently used.

        Pinning and unpinning it makes a new purge unit, which is purged last.
        """
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, with the pin)
        except FileNotFoundError:
            return False
        with f:
            if os.fstat(f.fileno()).st_size != size:
                return False  # cannot be (names are hashes); overwrite it
            with self._pinned(f.fileno()) as lost:
                if lost:
                    self._discard(path, f.fileno())
                    return False
        return True

    # -- reading ----------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The object's bytes, verified against its key; None on a miss.

        A miss is an absent object, one the filesystem purged (removed here, so the next
        :meth:`contains` says no), one that fails with EIO while read, or one whose content
        does not hash to *key* (removed too).  Afterwards the object is volatile again and
        most recently used.
        """
        with self._open(key) as opened:
            if opened is None:
                return None
            f, path = opened
            try:
                data = f.readall()
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self._purged_miss(path, f.fileno())
                return None
            if key_of(data) != key:
                self._corrupt_miss(path, f.fileno())
                return None
        self.counters.hits += 1
        return data

    def get_to(self, key: str, dest: StrPath) -> bool:
        """Copy the object to the file *dest* (streamed, verified); False on a miss.

        *dest* appears complete or not at all (written next to it, then renamed).
        """
        dest = Path(dest)
        with self._open(key) as opened:
            if opened is None:
                return False
            f, path = opened
            tmp = dest.with_name(f"{TEMP_PREFIX}{dest.name}-{secrets.token_hex(4)}")
            try:
                digest = hashlib.sha256()
                with open(tmp, "xb") as out:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                ok = digest.hexdigest() == key
                if ok:
                    os.rename(tmp, dest)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self._purged_miss(path, f.fileno())
                return False
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            if not ok:
                self._corrupt_miss(path, f.fileno())
                return False
        self.counters.hits += 1
        return True

    @contextmanager
    def open(self, key: str) -> Iterator[io.FileIO | None]:
        """The object, opened for reading and pinned for the whole block; None on a miss.

        For large objects read piecemeal, or mmap-ed.  The content is *not* verified (use
        :meth:`get` or :meth:`get_to` for that) but cannot be purged while the block runs.
        Counts a hit if the object is intact.
        """
        with self._open(key) as opened:
            if opened is None:
                yield None
                return
            self.counters.hits += 1
            yield opened[0]

    @contextmanager
    def _open(self, key: str) -> Iterator[tuple[io.FileIO, Path] | None]:
        """Open and pin the object; yield (file, path) if intact, else count a miss.

        Order matters: open, pin, then ask what was purged.  A purge between open and pin
        is therefore seen; after the pin nothing can purge the object.
        """
        path = self.path_of(key)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, after unpinning)
        except FileNotFoundError:
            self.counters.misses += 1
            yield None
            return
        with f, self._pinned(f.fileno()) as lost:
            if lost:
                self._purged_miss(path, f.fileno())
                yield None
            else:
                yield f, path

    @contextmanager
    def _pinned(self, fd: int) -> Iterator[list[tuple[int, int]]]:
        """Keep the open object non-volatile inside the block; yield its purged ranges.

        Every pinner holds a shared flock; leaving, it makes the object volatile again only
        if it can take the lock exclusively, that is when no other process still reads.  A
        pinner that cannot leaves that to the other one, which does the same when it leaves,
        so the last one out always re-marks.  Nothing to do on a non-volatile cache.
        """
        if not self.volatile:
            yield []
            return
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield client.mark_nonvolatile(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another reader holds it: it re-marks when it leaves
            else:
                try:
                    client.mark_volatile(fd)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _purged_miss(self, path: Path, fd: int) -> None:
        self.counters.misses += 1
        self.counters.purged_misses += 1
        self._discard(path, fd)

    def _corrupt_miss(self, path: Path, fd: int) -> None:
        self.counters.misses += 1
        self.counters.corrupt_misses += 1
        self._discard(path, fd)

    def _discard(self, path: Path, fd: int) -> None:
        """Remove the damaged object open as *fd* from *path*, and nothing else.

        Another process may have published a fresh copy under *path* since we opened it; a
        plain unlink would then destroy good data.  So: rename whatever is there aside
        (atomic), and if it is not our inode, link it back (``link`` never replaces an
        existing name, so a still newer copy wins) before removing the aside name.
        Meanwhile a reader of *path* sees a miss, which a cache may always give.
        """
        ours = os.fstat(fd)
        aside = path.with_name(f"{TRASH_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # deleted meanwhile
        moved = os.lstat(aside)
        if (moved.st_dev, moved.st_ino) != (ours.st_dev, ours.st_ino):
            with suppress(FileExistsError):
                os.link(aside, path)
        os.unlink(aside)

    # -- the rest ---------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """Whether the object is there and (on vrangefs) nothing of it was purged.

        Cheap (one stat, one getxattr) and only a hint: it may be purged right after.
        """
        path = self.path_of(key)
        try:
            if self.volatile:
                return not client.purged(path)
            return path.is_file()
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> bool:
        """Remove the object; False if it was not there.  Readers that have it open finish."""
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            return False
        self.counters.deletes += 1
        return True

    def stats(self) -> CacheStats:
        """This instance's counters and the mount's statistics."""
        if self.volatile:
            mount = client.stats(self.mount)
        else:
            st = os.statvfs(self.mount)
            mount = {
                "size_bytes": st.f_blocks * st.f_frsize,
                "used_bytes": (st.f_blocks - st.f_bfree) * st.f_frsize,
            }
        return CacheStats(**asdict(self.counters), volatile=self.volatile, mount=mount)

    def usage(self) -> Usage:
        """Walk the cache: how many objects, their bytes, and how much of that is resident."""
        usage = Usage()
        for directory in (self.scratch, *self._fanout()):
            with suppress(FileNotFoundError), os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        usage.scratch_files += 1
                        continue
                    with suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        usage.objects += 1
                        usage.bytes += st.st_size
                        usage.resident_bytes += st.st_blocks * 512
        return usage

    def sweep(self) -> int:
        """Remove temporary and trash files left by processes that no longer exist.

        Returns how many.  Only useful after a crash (the names say which process wrote
        them, and pids are local, so run it on the machine that uses the cache).
        """
        removed = 0
        for directory in (self.scratch, *self._fanout()):
            names: list[str] = []
            with suppress(FileNotFoundError), os.scandir(directory) as entries:
                names = [e.name for e in entries]
            for name in names:
                match = _SCRATCH_RE.fullmatch(name)
                if match is None or _alive(int(match[1])):
                    continue
                with suppress(FileNotFoundError):
                    os.unlink(directory / name)
                    removed += 1
        return removed

    def _fanout(self) -> list[Path]:
        with os.scandir(self.objects) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
