"""``vrangefs events MOUNTPOINT``: print a mount's purges and evictions as they happen.

The daemon's event stream (:mod:`vrangefs.events`) is a Unix socket in the abstract
namespace, named in the mount statistics (``events_socket``) next to the daemon's pid.
This command reads both, connects, and trusts the socket only if ``SO_PEERCRED`` says
the daemon's pid holds the other end (anyone could bind an abstract name the daemon
once had).  It then copies the stream to standard output one line at a time, flushed,
with paths made absolute under MOUNTPOINT.  It blocks on the socket: no polling.

Plain sockets only: nothing of the daemon, trio or pyfuse3 is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import IO, Any

from vrangefs import client, protocol
from vrangefs.config import UserError

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
COUNTED = frozenset(("purge", "evict"))
"""The event lines ``--count`` counts (``subscribed`` and ``dropped`` lines are not)."""


def _absolute(root: str, path: object) -> object:
    """A mount-relative path of the daemon's (``/a/b``) as a path under *root*."""
    if not isinstance(path, str):
        return path
    return root if path == "/" else root.rstrip("/") + path


def rewrite(event: dict[str, Any], root: str) -> dict[str, Any]:
    """The event with its paths under the mount point *root* instead of the mount root."""
    if "path" in event:
        event["path"] = _absolute(root, event["path"])
    if isinstance(event.get("paths"), list):
        event["paths"] = [_absolute(root, p) for p in event["paths"]]
    return event


def connect(mountpoint: str) -> socket.socket:
    """A connection to the event stream of the vrangefs mounted at *mountpoint*."""
    try:
        stats = client.stats(mountpoint)
    except client.NotVrangefsError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        if e.errno == errno.ENODATA:
            raise UserError(f"{mountpoint} is not the root of a vrangefs mount") from None
        raise UserError(f"cannot read statistics of {mountpoint}: {e.strerror or e}") from None
    name, pid = stats.get(protocol.EVENTS_SOCKET), stats.get("pid")
    if not isinstance(name, str) or not name or not isinstance(pid, int):
        raise UserError(f"{mountpoint}: this vrangefs daemon offers no event stream")
    try:
        address = protocol.event_socket_address(name)
    except ValueError as e:
        raise UserError(f"{mountpoint}: {e}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
        peer, _, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot connect to the event stream of {mountpoint} ({name}): {e.strerror or e}"
        ) from None
    if peer != pid:
        sock.close()
        raise UserError(
            f"{mountpoint}: the event socket {name} is held by pid {peer}, not by the "
            f"daemon (pid {pid}); not trusted"
        )
    return sock


def relay(lines: Iterable[bytes], out: IO[str], root: str, count: int | None) -> bool:
    """Copy event lines to *out*, flushed one by one, paths under *root*.

    Returns True once *count* purge or evict lines were written, False if the stream
    ended first; raises UserError if the daemon refused or sent something unreadable.
    """
    seen = 0
    for raw in lines:
        try:
            event = json.loads(raw)
            kind = event["event"]
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{root}: unreadable line from the daemon: {raw[:80]!r}") from None
        if kind == "error":
            raise UserError(f"{root}: the daemon refused: {event.get('message')}")
        out.write(json.dumps(rewrite(event, root)) + "\n")
        out.flush()
        if kind in COUNTED:
            seen += 1
            if count is not None and seen >= count:
                return True
    return False


def cmd_events(args: argparse.Namespace) -> int:
    count: int | None = args.count
    if count is not None and count < 1:
        raise UserError(f"--count must be at least 1, not {count}")
    root = os.path.abspath(args.mountpoint)
    with connect(args.mountpoint) as sock, sock.makefile("rb") as stream:
        try:
            if relay(stream, sys.stdout, root, count):
                return 0
        except BrokenPipeError:  # the reader went (| head): end quietly
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except ConnectionResetError:
            pass
    raise UserError(f"{args.mountpoint}: the event stream ended (the filesystem was unmounted)")
