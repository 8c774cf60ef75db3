"""The event stream: one JSON line per purge or eviction, sent to subscribers as it happens.

Reclaim calls :class:`EventHub` (its ``observer``) synchronously, inside the step that
purged a unit or evicted a file.  The hub never blocks and never awaits there: it looks
up the path while the names still exist, formats the line once, and appends it to the
bounded queue of every subscriber.  A subscriber whose queue is full loses the event;
the loss is counted (``events_dropped`` in the mount statistics) and, once that
subscriber's queue has room again, it is sent one ``{"event": "dropped", "count": N}``
line in the place of the events it missed.  So a slow or stopped reader costs the
daemon at most its queue, never a wait.

Transport: a Unix stream socket in the abstract namespace, named by the kernel
(autobind: nothing on disk, no name anyone could take first), published in the stats as
``events_socket`` (``@`` and the abstract name).  One trio task accepts; each subscriber
has a task that writes its queue out and one that notices the peer going away.  Only
root and the daemon's own user may subscribe (lines name files by path, which other
users may not be allowed to see): the peer's credentials come from ``SO_PEERCRED``.

Every line is one JSON object with an ``event`` key:

- ``subscribed``: the first line; everything from then on is reported;
- ``purge``: a volatile unit was purged (``ranges`` holds its byte range);
- ``evict``: a cache-directory file was evicted (``paths`` holds all its former names);
- ``dropped``: ``count`` events were lost here because this subscriber read too slowly;
- ``error``: the subscription was refused (``message``); the connection is then closed.

Paths are relative to the mount root (``/a/b``); bytes that are not UTF-8 become lone
surrogates (:func:`os.fsdecode`), which JSON writes as ``\\udc80``..``\\udcff`` escapes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii

import trio

from vrangefs.protocol import EVENTS_SOCKET, PAGE_SIZE, PurgeCause, event_socket_name
from vrangefs.reclaim import Link
from vrangefs.vrange import PurgeUnit

log = logging.getLogger(__name__)

QUEUE_LIMIT = 4096  # events one subscriber may have waiting before further ones are dropped
MAX_SUBSCRIBERS = 64
REFUSAL_TIMEOUT = 1.0  # seconds to hand a refused peer its one error line
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

PathOf = Callable[[int], bytes | None]


_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps with
# arguments builds a new one per call, a third of an event's cost


def _line(record: dict[str, object]) -> bytes:
    return _encode(record).encode() + b"\n"


_PURGE_LINE = (
    b'{"time":%r,"event":"purge","cause":"%s","ino":%d,"path":%s,"bytes":%d,"ranges":[[%d,%d]]}\n'
)
_CAUSES = {cause: cause.value.encode() for cause in PurgeCause}


def _string(path: bytes) -> bytes:
    """A path as a JSON string, as the encoder writes it (ASCII, surrogates escaped)."""
    return encode_basestring_ascii(os.fsdecode(path)).encode()


def _dropped_line(count: int) -> bytes:
    return _line({"event": "dropped", "count": count})


def _error_line(message: str) -> bytes:
    return _line({"event": "error", "message": message})


@dataclass(eq=False)
class Subscriber:
    """One reader of the stream: its queue of lines, and what it missed."""

    pid: int
    uid: int
    limit: int = QUEUE_LIMIT
    queue: deque[bytes] = field(default_factory=deque)
    missed: int = 0  # events dropped since its last dropped line
    wakeup: trio.Event | None = None

    def push(self, line: bytes) -> bool:
        """Queue a line; False if the queue is full and the event is dropped."""
        queue = self.queue
        if len(queue) >= self.limit:
            self.missed += 1
            return False
        if self.missed:
            queue.append(_dropped_line(self.missed))
            self.missed = 0
        queue.append(line)
        if self.wakeup is not None:
            self.wakeup.set()
            self.wakeup = None
        return True

    def take(self) -> bytes:
        """Everything queued, then the dropped line for events missed after it, if any."""
        lines = b"".join(self.queue)
        self.queue.clear()
        if self.missed:
            lines += _dropped_line(self.missed)
            self.missed = 0
        return lines

    def pending(self) -> bool:
        return bool(self.queue or self.missed)


class EventHub:
    """Reclaim's observer: fans purge and eviction events out to the subscribers.

    The observer methods are synchronous and cheap when nobody listens (one test of
    a list); with subscribers, an event costs a path lookup, one ``json.dumps`` and
    one append per subscriber.
    """

    def __init__(
        self,
        path_of: PathOf,
        *,
        queue_limit: int = QUEUE_LIMIT,
        max_subscribers: int = MAX_SUBSCRIBERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path_of = path_of
        self.queue_limit = queue_limit
        self.max_subscribers = max_subscribers
        self._clock = clock
        self.subscribers: list[Subscriber] = []
        self.dropped = 0  # events lost by any subscriber since mount
        self.socket_name = ""  # "@" + the abstract name once listening

    # -- reclaim's observer -------------------------------------------------------------
    def purged(self, unit: PurgeUnit, cause: PurgeCause, pages: int) -> None:
        """Formatted by hand, the hot case (a purge-all makes one per unit): a third of
        what the JSON encoder costs, for the same line (the adapter tests compare)."""
        if not self.subscribers:
            return
        path = self._path_of(unit.ino)
        self.publish_line(
            _PURGE_LINE
            % (
                self._clock(),
                _CAUSES[cause],
                unit.ino,
                b"null" if path is None else _string(path),
                pages * PAGE_SIZE,
                unit.start * PAGE_SIZE,
                (unit.end - unit.start) * PAGE_SIZE,
            )
        )

    def evicted(self, ino: int, cause: PurgeCause, pages: int, names: list[Link]) -> None:
        if not self.subscribers:
            return
        paths = []
        for parent, name in names:
            directory = self._path_of(parent)
            if directory is not None:
                paths.append(os.fsdecode(directory.rstrip(b"/") + b"/" + name))
        self.publish(
            {
                "time": self._clock(),
                "event": "evict",
                "cause": cause.value,
                "ino": ino,
                "path": paths[0] if paths else None,
                "bytes": pages * PAGE_SIZE,
                "ranges": None,
                "paths": paths,
            }
        )

    def statistics(self) -> dict[str, int | str]:
        """What the mount statistics show of the stream."""
        return {
            EVENTS_SOCKET: self.socket_name,
            "events_subscribers": len(self.subscribers),
            "events_dropped": self.dropped,
        }

    def publish(self, record: dict[str, object]) -> None:
        """Send one event to every subscriber that has room for it."""
        self.publish_line(_line(record))

    def publish_line(self, line: bytes) -> None:
        for subscriber in self.subscribers:
            if not subscriber.push(line):
                self.dropped += 1

    # -- subscribers ------------------------------------------------------------------
    def admit(self, pid: int, uid: int) -> Subscriber | str:
        """A new subscriber with these credentials, or why it is refused."""
        if uid not in (0, os.geteuid()):
            return (
                f"uid {uid} may not subscribe: events name files by path, so only root and "
                f"the daemon's user (uid {os.geteuid()}) may read them"
            )
        if len(self.subscribers) >= self.max_subscribers:
            return f"too many subscribers (at most {self.max_subscribers})"
        subscriber = Subscriber(pid, uid, self.queue_limit)
        subscriber.push(_line({"time": self._clock(), "event": "subscribed"}))
        self.subscribers.append(subscriber)
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        self.subscribers.remove(subscriber)

    # -- the socket ---------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an autobound abstract socket and serve subscribers until cancelled.

        Started with ``nursery.start``: the socket's name is published before the
        daemon answers its first request.
        """
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            plain.bind(b"")  # autobind: the kernel picks a unique abstract name
            plain.listen(self.max_subscribers)
        except OSError:
            plain.close()
            raise
        listener = trio.socket.from_stdlib_socket(plain)
        with listener:
            self.socket_name = event_socket_name(listener.getsockname())
            log.info("event stream listening on %s", self.socket_name)
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    while True:
                        try:
                            conn, _ = await listener.accept()
                        except OSError as e:  # EMFILE and the like: keep serving
                            log.warning("event stream: accept failed: %s", e)
                            await trio.sleep(0.1)
                            continue
                        nursery.start_soon(self._connection, conn)
            finally:
                self.socket_name = ""

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        """One peer: admitted and served until it goes, or told why not and closed."""
        stream = trio.SocketStream(conn)
        try:
            async with stream:
                pid, uid, _ = _PEERCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
                admitted = self.admit(pid, uid)
                if isinstance(admitted, str):
                    log.info("event stream: refused pid %d (uid %d): %s", pid, uid, admitted)
                    with trio.move_on_after(REFUSAL_TIMEOUT):
                        await stream.send_all(_error_line(admitted))
                    return
                log.info("event stream: pid %d (uid %d) subscribed", pid, uid)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, admitted, stream, nursery.cancel_scope)
                        await _until_closed(stream)
                        nursery.cancel_scope.cancel()
                finally:
                    self.leave(admitted)
                log.info("event stream: pid %d left", pid)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("event stream: connection ended: %s", e)
        except Exception:  # a bug here must cost one subscriber, not the daemon
            log.exception("event stream: subscriber failed")

    @staticmethod
    async def _pump(
        subscriber: Subscriber, stream: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        """Write the subscriber's queue out as it fills; end the connection if the peer
        cannot take it any more."""
        try:
            while True:
                if not subscriber.pending():
                    subscriber.wakeup = trio.Event()
                    await subscriber.wakeup.wait()
                await stream.send_all(subscriber.take())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


async def _until_closed(stream: trio.SocketStream) -> None:
    """Return when the peer closes its end (what it sends is ignored)."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
