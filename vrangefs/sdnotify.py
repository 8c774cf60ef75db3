"""systemd's readiness protocol (sd_notify), in the few lines it takes.

With ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` and waits for a datagram
``READY=1`` on it; ``@`` at the start of the path names an abstract socket.
Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send *state* (e.g. ``READY=1``) to the service manager; False if there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", path, e)
        return False
    return True
