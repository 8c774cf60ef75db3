"""A content-addressed blob cache that lets the filesystem shed it: :class:`CacheStore`.

Objects live one per file under ``ROOT/objects/ab/cdef...`` (the sha256 of the content, split
after two hex digits so no directory grows huge).  On a vrangefs mount every object is volatile
and pinned only while read, so the filesystem may purge it whenever nobody reads it, least
recently used first, when it needs memory: the cache never fills up and never gets its owner
killed.  A purged object is found out when it is next read (it is then a miss, and removed).
On any other filesystem (tmpfs, ext4, ...) the same code stores plain files and calls nothing
of vrangefs.

Several processes may use one cache at once.  What makes that safe:

* **Publishing is atomic.**  An object is written to a temporary file (``.tmp-PID-RANDOM``) in
  the same directory and renamed into place only when complete, so no reader ever finds a
  partial object under its final name.  A reader that opened the previous file of the same
  key keeps reading that inode (same content: the name is its hash).
* **Objects are volatile from their first byte.**  The temporary file is sized and marked
  volatile before anything is written.  A writer that dies at any point leaves nothing that
  the filesystem cannot purge; :meth:`CacheStore.sweep` removes the names it leaves.  If the
  filesystem purges the object while it is being written, it is not published.
* **Readers pin.**  A reader holds a real pin of its process on the object while it reads
  (``system.vrange.pin``, through :func:`vrangefs.client.pinned`): nothing purges a pinned
  page, and pins are counted and owned by processes, so readers in several processes never
  unpin the object under each other, and the pins of a reader that dies go with it.  The
  object stays volatile throughout (pins, not non-volatile marks, protect the read).  Pins
  are taken *after* opening, and what was purged is read *after* pinning, so a purge between
  open and pin is seen; after the pin nothing can purge the object.  A reader that found it
  intact marks it volatile again before unpinning, which makes it the newest purge unit:
  the filesystem purges the least recently *used* objects first.
* **Everything is checked.**  A purged object, a read that fails with EIO, a vanished file
  (ENOENT at any point) and content whose hash is not its name are all misses.  A damaged
  object is removed without ever removing a fresh one that another process published under
  the same name meanwhile (see :meth:`CacheStore._discard`).

**The fleet tier.**  With ``remote="redis://HOST:PORT/DB"`` the local directory becomes the
self-shrinking first tier in front of a Redis server that several hosts share (remote.py has
the wire format, the timeouts and the back-off).  ``put`` writes the local copy and the
remote one; a lookup tries the local copy, then Redis, and on a remote hit refills the local
copy, so a purged or evicted local copy is only a local miss.  Keys being content addresses,
hosts never disagree about a key's bytes, and what comes from Redis is verified before it is
kept or returned.  Redis being down or slow never raises to the caller: a failed remote call
is a miss (or a put kept only locally), counted and logged.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from vrangefs import client, mountinfo

if TYPE_CHECKING:
    import redis

    from examples.cachestore.remote import Fetched, RemoteTier

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
    """What one :class:`CacheStore` instance did (per process, not shared).

    Every lookup (get, get_to, open) counts once in ``hits`` or ``misses``: a hit is
    ``local_hits + remote_hits``, a miss is what no tier had.  Without a remote tier
    ``local_misses == misses``.
    """

    hits: int = 0
    """Lookups answered, by the local copy or by the remote tier."""
    misses: int = 0
    """Lookups nobody could answer (the caller got None or False)."""
    local_hits: int = 0
    local_misses: int = 0
    """Lookups the local copy could not answer: absent, purged or corrupt there."""
    purged_misses: int = 0
    """The local object was there but the filesystem had purged (part of) it."""
    corrupt_misses: int = 0
    """The local object's content did not hash to its name."""
    puts: int = 0
    put_bytes: int = 0
    deduplicated_puts: int = 0
    """The object was already there, intact: it was only made most recently used."""
    lost_puts: int = 0
    """A local write (put or refill) purged while being written, so not published."""
    failed_puts: int = 0
    """The put raised (ENOSPC on a full tmpfs, for instance)."""
    deletes: int = 0
    unpinned_reads: int = 0
    """Objects read without a pin: the mount's per-user pin limit refused one (EDQUOT)."""
    # -- the remote tier (all zero without one) --
    remote_hits: int = 0
    """Local misses answered by the remote tier (verified)."""
    remote_misses: int = 0
    """The remote tier was asked and did not have it (or it vanished while read)."""
    remote_corrupt: int = 0
    """Remote bytes that did not hash to their key: a miss; they are deleted there."""
    remote_errors: int = 0
    """Remote calls that failed (refused, timed out, an error answer): each one a miss."""
    remote_skipped: int = 0
    """Remote calls not made because the tier was backing off after a failure."""
    remote_calls: int = 0
    """Round trips to the remote tier that succeeded (a pipeline is one)."""
    remote_bytes_fetched: int = 0
    remote_bytes_pushed: int = 0
    remote_puts: int = 0
    """Objects written to the remote tier."""
    remote_deduplicated_puts: int = 0
    """Puts the remote tier already had (not sent again; the TTL renewed)."""
    unpushed_puts: int = 0
    """put_file objects not pushed because the local copy they are read from was lost."""
    refills: int = 0
    """Remote hits copied into the local tier."""
    failed_refills: int = 0
    """Remote hits the local tier could not keep (purged while written, ENOSPC)."""


@dataclass
class CacheStats(Counters):
    """:class:`Counters` plus what the filesystem says about the whole mount.

    ``mount`` is vrangefs' ``user.vrange.stats`` (``resident_bytes``, ``purge_events``,
    ``purged_bytes_total``, ``daemon_rss_bytes``, ...) when the cache is volatile, else
    ``size_bytes`` and ``used_bytes`` from statvfs.
    """

    volatile: bool = False
    mount: dict[str, int | str] = field(default_factory=dict)
    remote: dict[str, int | str] = field(default_factory=dict)
    """The remote tier: ``url`` (no password), ``state`` (up, backing off, probing) and some
    of the server's INFO figures; empty without a remote tier."""

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def local_hit_rate(self) -> float:
        return self.local_hits / self.lookups if self.lookups else 0.0

    @property
    def remote_hit_rate(self) -> float:
        return self.remote_hits / self.lookups if self.lookups else 0.0


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

    *remote*: a Redis URL (``redis://HOST:PORT/DB``), a redis-py client, or a ready
    :class:`~examples.cachestore.remote.RemoteTier` (which then counts into this store's
    counters): the shared tier behind the local one.
    *remote_ttl* (seconds, None for none) applies when *remote* is a URL or a client,
    *remote_timeout* (seconds, bounding every remote call) when it is a URL (a client keeps
    its own socket timeouts).  Needs the ``redis`` package.
    """

    def __init__(
        self,
        root: StrPath,
        *,
        volatile: bool | None = None,
        fsync: bool = False,
        remote: str | redis.Redis | RemoteTier | None = None,
        remote_ttl: float | None = None,
        remote_timeout: float = 1.0,
    ):
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
        self.remote: RemoteTier | None = None
        if remote is not None:
            from examples.cachestore.remote import RemoteTier  # noqa: PLC0415 (optional: redis)

            if isinstance(remote, RemoteTier):
                self.remote = remote
                remote.counters = self.counters
            else:
                self.remote = RemoteTier(
                    remote, self.counters, ttl=remote_ttl, timeout=remote_timeout
                )

    def __repr__(self) -> str:
        remote = "" if self.remote is None else f", remote={self.remote.url!r}"
        return f"CacheStore({str(self.root)!r}, volatile={self.volatile}{remote})"

    def close(self) -> None:
        """Close the connection to the remote tier, if any (the local cache needs nothing)."""
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

        With a remote tier the object is also pushed there (in chunks, without copying
        *data*) unless it is there already; a remote failure is counted, never raised, and
        the remote copy is pushed even when the local write raised.
        """
        key = key_of(data)
        path = self.path_of(key)
        failure: OSError | None = None
        try:
            if self._refresh(path, len(data)):
                self.counters.deduplicated_puts += 1
            else:
                self._publish(path.parent, [data], len(data), path)
        except OSError as e:
            self.counters.failed_puts += 1
            failure = e
        if self.remote is not None:
            from examples.cachestore.remote import RemoteError, chunks_of  # noqa: PLC0415

            with suppress(RemoteError):
                self.remote.push(key, len(data), chunks_of(data, self.remote.chunk))
        if failure is not None:
            raise failure
        self.counters.puts += 1
        self.counters.put_bytes += len(data)
        return key

    def put_file(self, source: StrPath | BinaryIO) -> str:
        """Store the content of a file (a path, or a binary file object read to its end).

        Streams in :data:`CHUNK` pieces, so objects larger than memory are fine; the key is
        known only at the end, so the temporary file lives in ``ROOT/tmp`` (same filesystem:
        the rename is still atomic).  With a remote tier, the object is then pushed from the
        local copy (pinned meanwhile), chunk by chunk.
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
            key, n, _ = self._publish(self.scratch, chunks, size, None)
        except OSError:
            self.counters.failed_puts += 1
            raise
        if self.remote is not None:
            self._push_local(key, n)
        self.counters.puts += 1
        self.counters.put_bytes += n
        return key

    def _push_local(self, key: str, size: int) -> None:
        """Push the local copy of *key* to the remote tier, pinned while it is read."""
        from examples.cachestore.remote import RemoteError  # noqa: PLC0415

        assert self.remote is not None
        remote = self.remote
        try:
            f = open(self.path_of(key), "rb", buffering=0)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            self.counters.unpushed_puts += 1  # lost while written, or purged since
            return
        with f, self._pinned(f.fileno()) as lost:
            if lost or os.fstat(f.fileno()).st_size != size:
                self.counters.unpushed_puts += 1
                return
            try:
                with suppress(RemoteError):
                    remote.push(key, size, iter(lambda: f.read(remote.chunk), b""))
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self.counters.unpushed_puts += 1  # purged while read unpinned

    def _publish(
        self,
        directory: Path,
        chunks: Iterable[bytes | bytearray | memoryview],
        size: int | None,
        final: Path | None,
    ) -> tuple[str, int, bool]:
        """Write a temporary file in *directory*, then rename it to *final* (or to its key).

        Returns (key, bytes written, whether it is in place now).  The temporary file is
        volatile before its first byte (when the size is known up front; else as soon as it is
        complete), so a writer that dies leaves nothing unpurgeable behind.  An exception from
        *chunks* (a remote read that failed) leaves nothing behind either.
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
                return key, written, True
            final.parent.mkdir(parents=True, exist_ok=True)
        if lost:
            os.unlink(tmp)
            self.counters.lost_puts += 1
            return key, written, False
        os.rename(tmp, final)
        return key, written, True

    def _refresh(self, path: Path, size: int) -> bool:
        """True if an intact object of *size* bytes is at *path*; it becomes most recently used.

        It is pinned, checked and marked volatile again (:meth:`_pinned`): the newest unit.
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

        A local miss is an absent object, one the filesystem purged (removed here, so the next
        :meth:`contains` says no), one that fails with EIO while read, or one whose content
        does not hash to *key* (removed too).  Afterwards the object is volatile again and
        most recently used.  With a remote tier a local miss asks Redis; a remote hit is
        verified, refills the local copy and is returned.  An object larger than one chunk is
        streamed into the local copy and read back from it, so it is held once in memory
        (only if the local tier cannot keep it is it assembled from Redis chunk by chunk).
        """
        data = self._get_local(key)
        if data is not None:
            self._hit(local=True)
            return data
        if self.remote is not None:
            data = self._get_remote(key)
            if data is not None:
                self._hit(local=False)
                return data
        self.counters.misses += 1
        return None

    def _hit(self, *, local: bool) -> None:
        self.counters.hits += 1
        if local:
            self.counters.local_hits += 1
        else:
            self.counters.remote_hits += 1

    def _get_local(self, key: str, *, counting: bool = True) -> bytes | None:
        with self._open(key, counting=counting) as opened:
            if opened is None:
                return None
            f, path = opened
            try:
                data = f.readall()
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self._purged_miss(path, f.fileno(), counting)
                return None
            if key_of(data) != key:
                self._corrupt_miss(path, f.fileno(), counting)
                return None
        return data

    def _get_remote(self, key: str) -> bytes | None:
        from examples.cachestore.remote import RemoteError, RemoteMiss  # noqa: PLC0415

        assert self.remote is not None
        try:
            fetched = self.remote.fetch(key)
            if fetched.size <= self.remote.chunk:
                data = next(iter(fetched))  # verified: it is the last chunk
                self._refill(key, [data], len(data))
                return data
            if self._refill(key, fetched, fetched.size):
                kept = self._get_local(key, counting=False)
                if kept is not None:
                    return kept
            return self.remote.read_all(key)
        except (RemoteError, RemoteMiss):
            return None

    def _refill(self, key: str, chunks: Fetched | list[bytes], size: int) -> bool:
        """Write a remote hit into the local tier; False if it could not be kept there.

        Raises what iterating *chunks* raises (a remote failure, a corrupt object): the
        temporary file is then removed and nothing is published.
        """
        path = self.path_of(key)
        try:
            _, _, kept = self._publish(path.parent, chunks, size, path)
        except OSError:
            kept = False
        if kept:
            self.counters.refills += 1
        else:
            self.counters.failed_refills += 1
        return kept

    def get_to(self, key: str, dest: StrPath) -> bool:
        """Copy the object to the file *dest* (streamed, verified); False on a miss.

        *dest* appears complete or not at all (written next to it, then renamed).  With a
        remote tier a local miss is streamed from Redis into the local copy and copied from
        there (or, if the local tier cannot keep it, streamed from Redis into *dest*).
        """
        dest = Path(dest)
        if self._copy_local(key, dest):
            self._hit(local=True)
            return True
        if self.remote is not None and self._copy_remote(key, dest):
            self._hit(local=False)
            return True
        self.counters.misses += 1
        return False

    def _copy_remote(self, key: str, dest: Path) -> bool:
        from examples.cachestore.remote import RemoteError, RemoteMiss  # noqa: PLC0415

        assert self.remote is not None
        try:
            fetched = self.remote.fetch(key)
            if self._refill(key, fetched, fetched.size) and self._copy_local(
                key, dest, counting=False
            ):
                return True
            fetched = self.remote.fetch(key)
            tmp = dest.with_name(f"{TEMP_PREFIX}{dest.name}-{secrets.token_hex(4)}")
            try:
                with open(tmp, "xb") as out:
                    for chunk in fetched:  # the last chunk comes only once verified
                        out.write(chunk)
                os.rename(tmp, dest)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
        except (RemoteError, RemoteMiss):
            return False
        return True

    def _copy_local(self, key: str, dest: Path, *, counting: bool = True) -> bool:
        with self._open(key, counting=counting) as opened:
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
                self._purged_miss(path, f.fileno(), counting)
                return False
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            if not ok:
                self._corrupt_miss(path, f.fileno(), counting)
                return False
        return True

    @contextmanager
    def open(self, key: str) -> Iterator[io.FileIO | None]:
        """The object, opened for reading and pinned for the whole block; None on a miss.

        For large objects read piecemeal, or mmap-ed.  The local content is *not* verified
        (use :meth:`get` or :meth:`get_to` for that) but cannot be purged while the block
        runs (unless the per-user pin limit refused the pin: then reads may fail with EIO,
        and ``counters.unpinned_reads`` tells).  Counts a hit if the object is intact.  With a
        remote tier a local miss is streamed from Redis (verified) into the local copy, which
        is then opened.
        """
        with self._open(key) as opened:
            if opened is not None:
                self._hit(local=True)
                yield opened[0]
                return
        if self.remote is not None and self._refill_remote(key):
            with self._open(key, counting=False) as opened:
                if opened is not None:
                    self._hit(local=False)
                    yield opened[0]
                    return
        self.counters.misses += 1
        yield None

    def _refill_remote(self, key: str) -> bool:
        from examples.cachestore.remote import RemoteError, RemoteMiss  # noqa: PLC0415

        assert self.remote is not None
        try:
            fetched = self.remote.fetch(key)
            return self._refill(key, fetched, fetched.size)
        except (RemoteError, RemoteMiss):
            return False

    @contextmanager
    def _open(self, key: str, *, counting: bool = True) -> Iterator[tuple[io.FileIO, Path] | None]:
        """Open and pin the object; yield (file, path) if intact, else count a local miss.

        Order matters: open, pin, then ask what was purged.  A purge between open and pin
        is therefore seen; after the pin nothing can purge the object.
        """
        path = self.path_of(key)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, after unpinning)
        except FileNotFoundError:
            if counting:
                self.counters.local_misses += 1
            yield None
            return
        with f, self._pinned(f.fileno()) as lost:
            if lost:
                self._purged_miss(path, f.fileno(), counting)
                yield None
            else:
                yield f, path

    @contextmanager
    def _pinned(self, fd: int) -> Iterator[list[tuple[int, int]]]:
        """Pin the open object inside the block; yield its purged ranges (empty: intact).

        A counted pin of this process on the whole object (:func:`vrangefs.client.pinned`),
        dropped however the block is left; other processes' pins of the same object are
        theirs, so the object is purgeable again only once the last reader is out.  Its
        volatility is not changed, except that a block that ends normally on an intact object
        marks it volatile again, while still pinned: it becomes the newest purge unit, purged
        last (a reader without write permission on it cannot, and leaves it where it was).
        Nothing to do on a non-volatile cache.

        A pin that would take this user past the mount's pin limit (EDQUOT: many readers of
        large objects at once) is not taken: the object is then read unpinned, and a purge
        meanwhile shows as EIO (or, with ``--purged-reads zeros``, as a hash that does not
        match), a miss for :meth:`get` and :meth:`get_to`.
        """
        if not self.volatile:
            yield []
            return
        with ExitStack() as stack:
            try:
                pin = stack.enter_context(client.pinned(fd))
            except OSError as e:
                if e.errno != errno.EDQUOT:
                    raise
                pin = None
            if pin is None:  # past this user's pin limit: read unpinned (see unpinned_reads)
                self.counters.unpinned_reads += 1
                yield client.purged(fd)
                return
            yield pin.purged
            if pin.intact:
                with suppress(PermissionError):
                    client.mark_volatile(fd)

    def _purged_miss(self, path: Path, fd: int, counting: bool = True) -> None:
        if counting:
            self.counters.local_misses += 1
            self.counters.purged_misses += 1
        self._discard(path, fd)

    def _corrupt_miss(self, path: Path, fd: int, counting: bool = True) -> None:
        if counting:
            self.counters.local_misses += 1
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

        Cheap (one stat, one getxattr) and only a hint: it may be purged right after.  With a
        remote tier, an object only Redis has counts too (one EXISTS; False if Redis fails).
        """
        path = self.path_of(key)
        try:
            if self.volatile:
                if not client.purged(path):
                    return True
            elif path.is_file():
                return True
        except FileNotFoundError:
            pass
        if self.remote is None:
            return False
        from examples.cachestore.remote import RemoteError  # noqa: PLC0415

        try:
            return self.remote.exists(key)
        except RemoteError:
            return False

    def delete(self, key: str) -> bool:
        """Remove the object; False if it was not there.  Readers that have it open finish.

        With a remote tier it is removed there too (for every host: the next lookup
        anywhere misses); True if either tier had it.  A remote failure is counted, and the
        remote copy then stays until its TTL or an eviction.
        """
        try:
            os.unlink(self.path_of(key))
            found = True
        except FileNotFoundError:
            found = False
        if self.remote is not None:
            from examples.cachestore.remote import RemoteError  # noqa: PLC0415

            with suppress(RemoteError):
                found = self.remote.delete(key) or found
        if found:
            self.counters.deletes += 1
        return found

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
        remote = {} if self.remote is None else self.remote.info()
        return CacheStats(
            **asdict(self.counters), volatile=self.volatile, mount=mount, remote=remote
        )

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
