"""The event hub without a mount: queueing, dropping and counting, admission, line format,
and the socket served under trio."""

from __future__ import annotations

import json
import os
import socket

import trio
import trio.testing

from tests.adapter.harness import run
from vrangefs.events import EventHub, Subscriber
from vrangefs.protocol import PAGE_SIZE, PurgeCause, event_socket_address
from vrangefs.vrange import PurgeUnit

PATHS = {1: b"/", 2: b"/dir", 3: b"/dir/caf\xc3\xa9", 4: b"/dir/\xff"}


def hub(**kwargs: int) -> EventHub:
    return EventHub(PATHS.get, clock=lambda: 1000.5, **kwargs)


def unit(ino: int, start: int, end: int) -> PurgeUnit:
    return PurgeUnit(ino, start, end, seq=0)


def lines(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.splitlines()]


def test_a_full_queue_drops_and_counts_then_says_how_many() -> None:
    sub = Subscriber(pid=1, uid=0, limit=3)
    assert all(sub.push(b'{"n":%d}\n' % i) for i in range(3))
    assert not sub.push(b'{"n":3}\n') and not sub.push(b'{"n":4}\n')
    assert lines(sub.take()) == [{"n": 0}, {"n": 1}, {"n": 2}, {"event": "dropped", "count": 2}]
    assert not sub.pending()
    # Drops after some lines were taken: the dropped line comes before the next event.
    for i in range(5):
        sub.push(b'{"n":%d}\n' % i)
    sub.take()
    sub.push(b'{"n":9}\n')
    assert lines(sub.take()) == [{"n": 9}]
    for i in range(4):
        sub.push(b'{"n":%d}\n' % i)
    assert sub.missed == 1
    sub.queue.popleft()  # room again (as if part was sent)
    sub.push(b'{"n":7}\n')
    assert lines(sub.take())[-2:] == [{"event": "dropped", "count": 1}, {"n": 7}]


def test_nobody_listening_costs_no_lookup() -> None:
    looked: list[int] = []

    def path_of(ino: int) -> bytes | None:
        looked.append(ino)
        return None

    h = EventHub(path_of)
    h.purged(unit(3, 0, 1), PurgeCause.CAP, 1)
    h.evicted(3, PurgeCause.CAP, 1, [(2, b"x")])
    assert looked == [] and h.dropped == 0


def test_purge_and_evict_lines() -> None:
    h = hub()
    sub = h.admit(pid=10, uid=0)
    assert isinstance(sub, Subscriber)
    h.purged(unit(3, 2, 5), PurgeCause.PRESSURE, 2)
    h.purged(unit(9, 0, 1), PurgeCause.EXPLICIT, 1)  # no name any more
    h.evicted(4, PurgeCause.CAP, 3, [(2, b"\xff"), (1, b"top"), (77, b"gone")])
    subscribed, purge, nameless, evict = lines(sub.take())
    assert subscribed == {"time": 1000.5, "event": "subscribed"}
    assert purge == {
        "time": 1000.5,
        "event": "purge",
        "cause": "pressure",
        "ino": 3,
        "path": "/dir/caf\u00e9",
        "bytes": 2 * PAGE_SIZE,
        "ranges": [[2 * PAGE_SIZE, 3 * PAGE_SIZE]],
    }
    assert nameless["path"] is None
    assert evict == {
        "time": 1000.5,
        "event": "evict",
        "cause": "cap",
        "ino": 4,
        "path": "/dir/\udcff",
        "bytes": 3 * PAGE_SIZE,
        "ranges": None,
        "paths": ["/dir/\udcff", "/top"],
    }
    assert os.fsencode(evict["path"]) == b"/dir/\xff"  # type: ignore[arg-type]


def test_drops_are_counted_per_subscriber_and_in_total() -> None:
    h = hub(queue_limit=4)
    a, b = h.admit(1, 0), h.admit(2, os.geteuid())
    assert isinstance(a, Subscriber) and isinstance(b, Subscriber)
    for i in range(5):
        h.purged(unit(3, i, i + 1), PurgeCause.CAP, 1)
        a.take()  # a keeps up, b never reads
    assert h.dropped == 2  # b held "subscribed" + 3 events
    assert h.statistics() == {"events_socket": "", "events_subscribers": 2, "events_dropped": 2}
    h.leave(b)
    assert h.statistics()["events_subscribers"] == 1


def test_admission() -> None:
    h = hub(max_subscribers=2)
    other = 65534 if os.geteuid() != 65534 else 65533
    refused = h.admit(5, other)
    assert isinstance(refused, str) and f"uid {other}" in refused
    assert isinstance(h.admit(6, 0), Subscriber) and isinstance(h.admit(7, 0), Subscriber)
    full = h.admit(8, 0)
    assert isinstance(full, str) and "too many subscribers" in full
    assert len(h.subscribers) == 2


def test_the_socket_serves_subscribers_and_notices_them_leave() -> None:
    h = hub()

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.serve)
            assert h.socket_name.startswith("@") and len(h.socket_name) == 6
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(event_socket_address(h.socket_name))
            stream = trio.SocketStream(sock)
            received = b""
            while received.count(b"\n") < 1:
                received += await stream.receive_some()
            assert lines(received)[0]["event"] == "subscribed"
            await trio.testing.wait_all_tasks_blocked()
            h.purged(unit(3, 0, 1), PurgeCause.CAP, 1)
            while received.count(b"\n") < 2:
                received += await stream.receive_some()
            assert lines(received)[1]["path"] == "/dir/caf\u00e9"
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert h.subscribers == []
            nursery.cancel_scope.cancel()
        assert h.socket_name == ""

    run(body)


def test_purge_lines_are_what_the_json_encoder_writes() -> None:
    """Purge lines are formatted by hand (the hot case): byte for byte the encoder's."""
    h = hub()
    sub = h.admit(pid=10, uid=0)
    assert isinstance(sub, Subscriber)
    sub.take()
    for ino in (1, 3, 4, 99):  # the root, UTF-8, not UTF-8, no name
        h.purged(unit(ino, 7, 9), PurgeCause.EXPLICIT, 2)
    for raw in sub.take().splitlines(keepends=True):
        assert raw.isascii()
        assert raw == json.dumps(json.loads(raw), separators=(",", ":")).encode() + b"\n"
