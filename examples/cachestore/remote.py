"""The fleet tier: Redis behind a :class:`~examples.cachestore.CacheStore`.

Every host keeps its own self-shrinking local copy (vrangefs); Redis is the copy they share.
Keys are content addresses (sha256), so two hosts can never disagree about a key's bytes, and
everything fetched is verified against its key before anyone sees it.

**One Redis string per object, moved in chunks.**  An object is one string under
``NAMESPACE:{KEY}``.  Reads are ``GETRANGE`` of :data:`CHUNK` bytes at a time, writes
``SETRANGE`` at increasing offsets into a temporary key (pre-sized by one ``SETRANGE`` at the
last byte, so Redis allocates the string once instead of growing it chunk by chunk), published
by an atomic ``RENAME`` once complete.  So neither side ever holds more than one chunk beyond
the object itself, no single command blocks the single-threaded server for long, and each call
moves a bounded amount (which is what makes a per-call timeout meaningful).  Why not one key
per chunk: Redis evicts (``maxmemory-policy allkeys-lru``) and expires (TTL) whole keys, and a
whole object is the right unit to lose (once part of an object is gone, the rest is worthless,
as with vrangefs' purge units); chunk keys would be evicted piecemeal, leaving orphans that
cost memory and can only be detected at read time.  The price is Redis' 512 MB limit on one
string (``proto-max-bulk-len``), which bounds the size of one object.  Objects up to one chunk
go in a single ``SET`` (atomic on its own, no temporary key).  The temporary key carries the
object's hash tag (``{KEY}``), so on Redis Cluster it lives in the same slot as the final key
and the ``RENAME`` stays legal.

**Failures are misses.**  Every call is bounded by *timeout* (connect, send and each receive;
a call moves at most one chunk).  A failed call raises :class:`RemoteError` inside this module
only; the store turns it into a miss.  Each failure is counted (``remote_errors``) and logged
in one line, and connection-level failures (refused, reset, timed out) start an exponential
back-off with jitter (*backoff_initial* doubling up to *backoff_max*): until it expires the
tier does not call the server at all (``remote_skipped``), so a dead or wedged Redis costs
the callers nothing and is not hammered by the fleet.  The first call after the back-off is
the probe; it reconnects by itself (redis-py opens a fresh connection; one immediate retry
covers a pooled connection that a restarted server closed).  Answers that show a server
alive but refusing (an ``OOM`` error under ``maxmemory``, say) are counted and logged (at most
one line per 10 s for the same kind) without a back-off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

if TYPE_CHECKING:
    from examples.cachestore.store import Counters

log = logging.getLogger("examples.cachestore")

CHUNK = 1 << 20
"""Bytes moved by one remote call (GETRANGE, SETRANGE)."""
NAMESPACE = "vrangefs:cas"
TEMP_TTL_MS = 3_600_000
"""A temporary key outlives a writer that died by at most this."""
QUIET_S = 10.0
"""The same non-connection error is logged at most once per this."""

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview


class RemoteError(Exception):
    """A remote call failed, or was not made during a back-off (already counted and logged)."""


class RemoteMiss(Exception):
    """The object was absent, vanished while read, or corrupt (counted)."""


class _Pipeline(Protocol):
    def execute(self) -> list[Any]: ...


def redact(url: str) -> str:
    """*url* without its password (for log lines and stats)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Fetched:
    """A remote object found by :meth:`RemoteTier.fetch`: its size, then its chunks.

    Iterating yields the chunks in order, each at most :data:`CHUNK` bytes; it raises
    :class:`RemoteError` if a call fails and :class:`RemoteMiss` if the object vanishes
    meanwhile or does not hash to its key (checked before the last chunk is yielded, so a
    consumer that publishes only after the loop never publishes wrong bytes).
    """

    key: str
    size: int
    first: bytes
    tier: RemoteTier

    def __iter__(self) -> Iterator[bytes]:
        return self.tier._chunks(self)


class RemoteTier:
    """A Redis server (or a client object) as the shared tier of a cache store.

    *remote* is a URL (``redis://HOST:PORT/DB``, ``rediss://`` for TLS, ``unix://PATH?db=N``;
    user and password in the URL) or a ready client (``redis.Redis``, or any object with the
    same commands and ``pipeline()``, such as ``redis.cluster.RedisCluster``; then its own
    timeouts and retries apply).  *ttl*: seconds an object lives in Redis after its last put
    (None: until Redis evicts it).  *counters* is where calls, errors and bytes are counted
    (the store's).  Not thread-safe, like the store.
    """

    def __init__(
        self,
        remote: str | redis.Redis,
        counters: Counters,
        *,
        ttl: float | None = None,
        timeout: float = 1.0,
        chunk: int = CHUNK,
        namespace: str = NAMESPACE,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError("the namespace must not contain braces (they make the hash tag)")
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        if isinstance(remote, str):
            self.url = redact(remote)
            self.client: redis.Redis = redis.Redis.from_url(
                remote,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # One immediate retry, on connection errors only: a pooled connection that a
                # restarted server closed fails at once and the retry opens a fresh one.
                # Timeouts are not retried, so a call never takes more than one timeout.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        else:
            self.url = type(remote).__name__
            self.client = remote
        self.counters = counters
        self.ttl_ms = None if ttl is None else max(1, round(ttl * 1000))
        self.timeout = timeout
        self.chunk = chunk
        self.namespace = namespace
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._failures = 0
        self._retry_at = 0.0
        self._down_since = 0.0
        self._last_logged: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"RemoteTier({self.url!r})"

    # -- names ------------------------------------------------------------------------
    def name_of(self, key: str) -> str:
        """The Redis key of object *key*: ``NAMESPACE:{KEY}`` (the braces are a hash tag)."""
        return f"{self.namespace}:{{{key}}}"

    def _temp_name(self, key: str) -> str:
        return f"{self.name_of(key)}:tmp:{os.getpid()}-{secrets.token_hex(6)}"

    # -- state --------------------------------------------------------------------------
    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self._retry_at

    @property
    def state(self) -> str:
        if self._failures == 0:
            return "up"
        return "backing off" if self.backing_off else "probing"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one remote call (a command or a pipeline: one round trip) under the rules."""
        c = self.counters
        if self.backing_off:
            c.remote_skipped += 1
            raise RemoteError(f"{self.url} backing off")
        try:
            result = fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            c.remote_errors += 1
            self._failures += 1
            if self._failures == 1:
                self._down_since = time.monotonic()
            doubled = self.backoff_initial * 2 ** min(self._failures - 1, 32)  # no overflow
            delay = min(self.backoff_max, doubled)
            delay *= random.uniform(0.5, 1.0)  # jitter: a fleet does not probe in step
            self._retry_at = time.monotonic() + delay
            log.warning(
                "cachestore: remote %s failed (%s: %s: %s); taken as a miss; "
                "no remote calls for %.2f s",
                self.url,
                what,
                type(e).__name__,
                e,
                delay,
            )
            raise RemoteError(str(e)) from e
        except RedisError as e:
            c.remote_errors += 1
            kind = f"{type(e).__name__}:{str(e)[:20]}"
            now = time.monotonic()
            if now - self._last_logged.get(kind, -QUIET_S) >= QUIET_S:
                self._last_logged[kind] = now
                log.warning(
                    "cachestore: remote %s refused %s (%s: %s); taken as a miss",
                    self.url,
                    what,
                    type(e).__name__,
                    e,
                )
            raise RemoteError(str(e)) from e
        c.remote_calls += 1
        if self._failures:
            log.warning(
                "cachestore: remote %s answers again (after %d failed calls in %.1f s)",
                self.url,
                self._failures,
                time.monotonic() - self._down_since,
            )
            self._failures = 0
            self._retry_at = 0.0
        return result

    def _pipeline(
        self, what: str, fill: Callable[[Any], None], *, atomic: bool = False
    ) -> list[Any]:
        def run() -> list[Any]:
            with self.client.pipeline(transaction=atomic) as pipe:
                fill(pipe)
                result: list[Any] = pipe.execute()
                return result

        return self._call(what, run)

    # -- reading ------------------------------------------------------------------------
    def fetch(self, key: str) -> Fetched:
        """Find the object: one round trip (its size and first chunk).

        Raises :class:`RemoteMiss` if it is not there, :class:`RemoteError` on a failure.
        """
        name = self.name_of(key)

        def fill(pipe: Any) -> None:
            pipe.exists(name)
            pipe.strlen(name)
            pipe.getrange(name, 0, self.chunk - 1)

        exists, size, first = self._pipeline("fetch", fill)
        if not exists:
            self.counters.remote_misses += 1
            raise RemoteMiss(key)
        self.counters.remote_bytes_fetched += len(first)
        return Fetched(key, int(size), bytes(first), self)

    def _chunks(self, fetched: Fetched) -> Iterator[bytes]:
        name = self.name_of(fetched.key)
        digest = hashlib.sha256()
        offset = 0
        chunk = fetched.first
        while True:
            if len(chunk) != min(self.chunk, fetched.size - offset):
                self.counters.remote_misses += 1  # replaced by a shorter value or gone
                raise RemoteMiss(fetched.key)
            digest.update(chunk)
            offset += len(chunk)
            if offset >= fetched.size:
                if digest.hexdigest() != fetched.key:
                    self._corrupt(fetched.key)
                yield chunk
                return
            yield chunk
            chunk = self._call("GETRANGE", partial(self._getrange, name, offset))
            self.counters.remote_bytes_fetched += len(chunk)

    def _getrange(self, name: str, offset: int) -> bytes:
        value = self.client.getrange(name, offset, offset + self.chunk - 1)
        assert isinstance(value, bytes)
        return value

    def _corrupt(self, key: str) -> None:
        """Bytes under *key* that are not the object: a miss; remove them (best effort).

        The delete may race with another host re-putting the right bytes; that costs a later
        miss, never wrong data (everything read is verified).
        """
        self.counters.remote_corrupt += 1
        log.warning(
            "cachestore: remote %s holds bytes under %s that do not hash to it: discarded, a miss",
            self.url,
            key,
        )
        with contextlib.suppress(RemoteError):
            self._call("DEL", lambda: self.client.delete(self.name_of(key)))
        raise RemoteMiss(key)

    def read_all(self, key: str) -> bytes:
        """The whole object, verified (in one buffer, filled chunk by chunk)."""
        fetched = self.fetch(key)
        if fetched.size <= self.chunk:
            return next(iter(fetched))
        buf = bytearray(fetched.size)
        view = memoryview(buf)
        offset = 0
        for chunk in fetched:
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        return bytes(buf)

    def exists(self, key: str) -> bool:
        """Whether Redis has the object (a hint: it may expire or be evicted right after)."""
        return bool(self._call("EXISTS", lambda: self.client.exists(self.name_of(key))))

    # -- writing ------------------------------------------------------------------------
    def push(self, key: str, size: int, chunks: Iterable[Buffer]) -> bool:
        """Store the object unless Redis has it already; True if it was written.

        *chunks* are consumed only if the object must be sent (at most :data:`CHUNK` bytes
        each: pass slices of a memoryview, or file reads).  An existing object of the right
        size is kept (its TTL renewed when a TTL is set).  Raises :class:`RemoteError`.
        """
        name = self.name_of(key)

        def check(pipe: Any) -> None:
            pipe.exists(name)
            pipe.strlen(name)
            if self.ttl_ms is not None:
                pipe.pexpire(name, self.ttl_ms)

        exists, length, *_ = self._pipeline("check", check)
        if exists and length == size:
            self.counters.remote_deduplicated_puts += 1
            return False
        pieces = iter(chunks)
        if size <= self.chunk:
            parts = list(pieces)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if len(data) != size:
                raise ValueError(f"pushed {len(data)} bytes of an object of {size}")
            self._call("SET", lambda: self.client.set(name, data, px=self.ttl_ms))
            self.counters.remote_bytes_pushed += len(data)
        else:
            self._push_large(key, size, pieces)
        self.counters.remote_puts += 1
        return True

    def _push_large(self, key: str, size: int, pieces: Iterator[Buffer]) -> None:
        name, temp = self.name_of(key), self._temp_name(key)

        def allocate(pipe: Any) -> None:
            pipe.setrange(temp, size - 1, b"\0")  # the whole string at once: no regrowth
            pipe.pexpire(temp, TEMP_TTL_MS)

        self._pipeline("SETRANGE", allocate)
        offset = 0
        try:
            for piece in pieces:
                self._call("SETRANGE", partial(self._setrange, temp, offset, piece))
                offset += len(piece)
                self.counters.remote_bytes_pushed += len(piece)
            if offset != size:
                raise ValueError(f"pushed {offset} bytes of an object of {size}")

            def publish(pipe: Any) -> None:
                if self.ttl_ms is None:
                    pipe.persist(temp)
                else:
                    pipe.pexpire(temp, self.ttl_ms)
                pipe.rename(temp, name)

            self._pipeline("RENAME", publish, atomic=True)
        except BaseException:
            if not self.backing_off:
                with contextlib.suppress(RemoteError):  # else it expires by itself
                    self._call("DEL", lambda: self.client.delete(temp))
            raise

    def _setrange(self, name: str, offset: int, piece: Buffer) -> None:
        self.client.setrange(name, offset, piece)

    def delete(self, key: str) -> bool:
        """Remove the object from Redis; True if it was there."""
        return bool(self._call("DEL", lambda: self.client.delete(self.name_of(key))))

    def info(self) -> dict[str, int | str]:
        """A few of the server's figures (empty if it does not answer)."""
        out: dict[str, int | str] = {"url": self.url, "state": self.state}
        try:
            info: dict[str, Any] = self._call("INFO", self.client.info)
        except RemoteError:
            return out
        for name in (
            "redis_version",
            "used_memory",
            "maxmemory",
            "maxmemory_policy",
            "evicted_keys",
            "expired_keys",
            "total_commands_processed",
            "total_net_input_bytes",
            "total_net_output_bytes",
        ):
            if name in info:
                value = info[name]
                out[name] = value if isinstance(value, int) else str(value)
        return out

    def close(self) -> None:
        self.client.close()


def chunks_of(data: Buffer, size: int = CHUNK) -> Iterator[memoryview]:
    """*data* as memoryview slices of at most *size* bytes (no copies)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), size):
        yield view[start : start + size]
