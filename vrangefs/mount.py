"""The daemon's composition root: build the store, volume and adapter, mount, serve.

Readiness is reported through a callback once the kernel mount exists; the
CLI passes a pipe so that ``vrangefs mount`` returns only when the filesystem
is mounted.  SIGINT and SIGTERM end the main loop and unmount; SIGUSR1 dumps
every thread's stack (faulthandler) for a daemon that seems hung.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import TextIO, cast

import pyfuse3
import trio

from vrangefs import mountinfo, pressure, sdnotify
from vrangefs.collector import collector
from vrangefs.config import MountConfig
from vrangefs.memory import MemoryProbe
from vrangefs.operations import Operations
from vrangefs.pagestore import PageStore, pool_bytes_for
from vrangefs.volume import Volume

log = logging.getLogger(__name__)

MAX_REQUEST_TASKS = 2**31 - 1  # pyfuse3 takes a C int: in effect, no limit

# Readahead window of the mount, in KiB: FUSE's largest READ (libfuse 3.14 negotiates
# max_pages = 256, i.e. 1 MiB).  The kernel gives a FUSE mount 128 KiB and caps it at
# that in the INIT exchange (neither pyfuse3 nor libfuse can offer more), so a cold
# sequential read reaches the daemon as 128 KiB READs.  Root can raise it afterwards
# through the mount's backing device in sysfs; then each READ is 1 MiB.  Larger windows
# (2-8 MiB: several READs in flight) and a larger max_background were measured and read no
# faster: see bench/results/issue13-datapath/.
READ_AHEAD_KB = 1024


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options.add("fsname=vrangefs")
    options.add("subtype=vrangefs")
    options.update(config.fuse_options)
    return options


def build(config: MountConfig) -> Operations:
    pool = pool_bytes_for(config.memory_cap)
    store = PageStore(config.memory_cap, pool)
    log.info("keeping up to %d bytes of freed pages faulted in for the next writes", pool)
    volume = Volume(
        store,
        root_mode=config.root_mode,
        root_uid=config.root_uid,
        root_gid=config.root_gid,
        purged_reads_zeros=config.purged_reads_zeros,
        high_watermark=config.high_watermark,
        low_watermark=config.low_watermark,
        pin_limit=config.pin_limit,
        cache_dir=config.cache_dir,
        metadata_cap=config.metadata_cap,
    )
    return Operations(
        volume,
        on_init=functools.partial(_served, config.mountpoint),
        mountpoint=config.mountpoint,
    )


def _served(mountpoint: str) -> None:
    log.info("serving requests")
    sdnotify.notify("READY=1\nSTATUS=serving")
    # Called while libfuse answers INIT, before the reply reaches the kernel, which then
    # sets the readahead window from it: raise the window once this request is done.
    trio.lowlevel.current_trio_token().run_sync_soon(_raise_readahead, mountpoint)


def _raise_readahead(mountpoint: str) -> None:
    """Run from trio's loop, where an exception would end the daemon: only log."""
    try:
        log.info("%s", raise_readahead(mountpoint))
    except Exception:
        log.exception("raising the readahead window of %s failed", mountpoint)


def raise_readahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> str:
    """Raise the readahead window of the FUSE mount at *mountpoint* to *kb* KiB (never
    lower it); returns what was done, or why not (not root, read-only sysfs: the
    window then stays as the kernel set it).  Touches the mount table and sysfs only,
    never the mount, so the daemon that serves it may call it.

    Safe for the stale-read rule: it only changes how many pages one READ fetches;
    every purge still drops the inode's whole cache, and a READ touching a purged page
    still fails as a whole, after which the kernel reads the page it needs alone.
    """
    entry = mountinfo.find(mountpoint)
    if entry is None:
        return f"readahead unchanged: {mountpoint} is not in the mount table"
    path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(path) as f:
            current = int(f.read())
    except (OSError, ValueError) as e:
        return f"readahead unchanged: cannot read {path}: {e}"
    if current >= kb:
        return f"readahead {current} KiB (as it was; {path})"
    try:
        with open(path, "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        return f"readahead stays {current} KiB: cannot write {path} ({why}; it needs root)"
    return f"readahead raised from {current} to {kb} KiB ({path})"


async def _serve(ops: Operations, config: MountConfig) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(ops.invalidator.run)
        await nursery.start(ops.events.serve)  # its socket is named before requests are served
        nursery.start_soon(ops.processes.run)
        nursery.start_soon(ops.reap)
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
    _raise_fd_limit()
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
    fuse_fd = _fuse_device()
    if fuse_fd is not None:
        ops.watch_requests(fuse_fd)
    else:
        log.warning("no /dev/fuse descriptor found: big requests yield every 1 ms only")
    ready(None)
    collector.install()
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


def _fuse_device() -> int | None:
    """Our descriptor of /dev/fuse, which pyfuse3 opened and does not tell."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def _raise_fd_limit() -> None:
    """Take all the file descriptors allowed: the daemon holds one per process that holds
    pins (its pidfd), and the usual soft limit of 1024 would refuse the 1000th."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, hard, e)


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
