"""The daemon's composition root: build the store, volume and adapter, mount, serve.

Readiness is reported through a callback once the kernel mount exists; the
CLI passes a pipe so that ``vrangefs mount`` returns only when the filesystem
is mounted.  SIGINT and SIGTERM end the main loop and unmount; SIGUSR1 dumps
every thread's stack (faulthandler) for a daemon that seems hung.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO, cast

import pyfuse3
import trio

from vrangefs import pressure, sdnotify
from vrangefs.config import MountConfig
from vrangefs.memory import MemoryProbe
from vrangefs.operations import Operations
from vrangefs.pagestore import PageStore
from vrangefs.volume import Volume

log = logging.getLogger(__name__)

MAX_REQUEST_TASKS = 2**31 - 1  # pyfuse3 takes a C int: in effect, no limit


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options.add("fsname=vrangefs")
    options.add("subtype=vrangefs")
    options.update(config.fuse_options)
    return options


def build(config: MountConfig) -> Operations:
    store = PageStore(config.memory_cap)
    volume = Volume(
        store,
        root_mode=config.root_mode,
        root_uid=config.root_uid,
        root_gid=config.root_gid,
        purged_reads_zeros=config.purged_reads_zeros,
        high_watermark=config.high_watermark,
        low_watermark=config.low_watermark,
    )
    return Operations(volume, on_init=_served)


def _served() -> None:
    log.info("serving requests")
    sdnotify.notify("READY=1\nSTATUS=serving")


async def _serve(ops: Operations, config: MountConfig) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(ops.invalidator.run)
        if config.pressure is not None:
            nursery.start_soon(
                pressure.watch,
                ops.volume.reclaim,
                MemoryProbe(),
                config.pressure,
                ops.invalidator,
            )
        # No cap on request tasks: a request waiting for an invalidation must
        # never keep a READ that the invalidation waits for from being served.
        # Tasks are bounded by the requests the kernel has in flight.
        await pyfuse3.main(min_tasks=1, max_tasks=MAX_REQUEST_TASKS)
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted or signalled; returns an exit status.

    *ready* is called once: with None when the mount exists, or with an error
    message when mounting failed.
    """
    faulthandler.register(signal.SIGUSR1, file=_log_stream(), all_threads=True)
    ops = build(config)
    try:
        pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except (RuntimeError, OSError) as e:
        ready(f"cannot mount {config.mountpoint}: {e}")
        return 1
    log.info(
        "mounted %s (pid %d, memory cap %d bytes)",
        config.mountpoint,
        os.getpid(),
        config.memory_cap,
    )
    ready(None)
    try:
        trio.run(_serve, ops, config)
    except BaseException:
        log.exception("main loop failed")
        pyfuse3.close(unmount=True)
        raise
    sdnotify.notify("STOPPING=1")
    pyfuse3.close(unmount=True)
    log.info("unmounted %s", config.mountpoint)
    return 0


def _log_stream() -> TextIO:
    """Where the log goes, so that stack dumps land next to it."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            return cast(TextIO, stream)
    return sys.stderr


def setup_logging(debug: bool, log_file: str | None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(process)d %(name)s %(levelname)s: %(message)s",
            "%Y-%m-%d %H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
