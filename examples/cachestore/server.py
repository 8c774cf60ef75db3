"""A throw-away ``redis-server`` for tests and demos: loopback only, nothing on disk.

    with RedisServer() as server:          # a free port on 127.0.0.1
        store = CacheStore(root, remote=server.url)
        server.kill()                      # SIGKILL, as a crash would
        server.start()                     # same port, empty again (no persistence)

Never the system service: the server runs as our child with ``--save "" --appendonly no``
(no RDB snapshots, no AOF), ``--bind 127.0.0.1`` and its working directory in a temporary
directory, and is killed when the block ends, however it ends.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

START_TIMEOUT = 10.0


class RedisServerMissing(RuntimeError):
    """redis-server is not installed (tools/setup.sh installs it)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` child process on a loopback port, restartable on the same port."""

    def __init__(
        self, port: int | None = None, *, maxmemory: str | None = None, log: Path | None = None
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerMissing("redis-server not found (apt-get install redis-server)")
        self.exe = exe
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.dir = Path(tempfile.mkdtemp(prefix="vrangefs-redis-"))
        self.log = log or self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain client for inspecting the server (not the store's)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        """Start the server (again) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        cmd = [
            self.exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log),
            "--daemonize",
            "no",
        ]
        if self.maxmemory is not None:
            cmd += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as probe:
            while True:
                try:
                    if probe.ping():
                        return self
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer")
                time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server (SIGKILL by default: a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=START_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped server cannot die of SIGTERM
            self.proc.kill()
            self.proc.wait(timeout=START_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def int_info(client: redis.Redis) -> dict[str, int]:
    """The server's integer INFO fields (commands processed, bytes in and out, memory...)."""
    raw = client.info()
    return {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
