"""The ``vrangefs`` and ``mount.vrangefs`` commands: their arguments and their entry points.

The work is done elsewhere, one module per job: :mod:`vrangefs.config` (option values),
:mod:`vrangefs.launch` (mounting and running the daemon), :mod:`vrangefs.unmount`,
:mod:`vrangefs.rangetools` (the volatile-range tools), :mod:`vrangefs.subscribe` (the
event stream) and :mod:`vrangefs.output`.
Every command reports a user error as one line on stderr naming what is wrong, and exits 1
without a traceback (:class:`~vrangefs.config.UserError`); argparse itself exits 2 on a
command line it cannot parse.  The man pages vrangefs(1) and mount.vrangefs(8) are generated
from :func:`build_parser` and :func:`build_mount_helper_parser`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vrangefs import config, launch, rangetools, subscribe, unmount
from vrangefs.config import DEFAULTS, UserError

__all__ = ["UserError", "build_mount_helper_parser", "build_parser", "main", "mount_helper"]

DESCRIPTION = (
    "vrangefs is a memory filesystem like tmpfs, in user space (FUSE), under a memory cap. "
    "Any process may mark byte ranges of a file volatile: the filesystem may then purge "
    "those pages when it needs memory, and marking them non-volatile again tells what was "
    "lost."
)
_SIZE = "bytes with an optional K, M, G or T suffix (powers of 1024), or a percentage"
_RANGE = "bytes, K/M/G/T suffixes allowed"
_OPTIONS_HELP = (
    "comma-separated mount options; may be repeated. size=SIZE (or memory_cap=), "
    "purged_reads=, high_watermark=, low_watermark=, pressure_purge=, min_free=, pin_limit=, "
    "metadata_cap=, cache_dir and debug "
    "set the options of the same names (an -o setting wins over the long option); "
    "mode=OCTAL, uid=N and gid=N set the root directory's mode (default 1777) and owner, as "
    "on tmpfs; mount(8)'s own options (defaults, noauto, nofail, _netdev, user, x-*, ...) "
    "are ignored; anything else, such as allow_other, goes to FUSE"
)
_HELPER_OPTIONS_HELP = (
    "comma-separated mount options; may be repeated. size=SIZE: the memory cap, bytes with "
    "an optional K, M, G or T suffix or a percentage of RAM (default 50%%); "
    "purged_reads=eio|zeros; high_watermark=PCT; low_watermark=PCT; pressure_purge=on|off; "
    "min_free=SIZE; pin_limit=SIZE; metadata_cap=SIZE; cache_dir; debug: as the vrangefs mount "
    "options of these "
    "names, see "
    "vrangefs(1). "
    "mode=OCTAL, uid=N and gid=N set the root directory's mode (default 1777) and owner, as "
    "on tmpfs. mount(8)'s own options (defaults, auto, noauto, nofail, _netdev, user, "
    "users, owner, group, rw, x-*, comment=...) are ignored; anything else, such as "
    "allow_other, goes to FUSE"
)


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory to mount on"
    )
    p.add_argument(
        "--memory-cap",
        metavar="SIZE",
        default=DEFAULTS["memory_cap"],
        help=f"cap on resident file data: {_SIZE} of RAM; at least one page (4096 bytes) and "
        "at most what one mapping can take; a cap above RAM is accepted with a warning "
        "(default %(default)s)",
    )
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="serve in the foreground until unmounted or signalled, instead of returning "
        "once mounted with the daemon in the background",
    )
    p.add_argument(
        "-o", dest="options", metavar="OPTIONS", action="append", default=[], help=_OPTIONS_HELP
    )
    p.add_argument(
        "--purged-reads",
        metavar="{eio,zeros}",
        default=DEFAULTS["purged_reads"],
        help="what reading a purged page gives: the error EIO (SIGBUS through mmap), or "
        "zeros (default %(default)s)",
    )
    p.add_argument(
        "--high-watermark",
        metavar="PCT",
        default=DEFAULTS["high_watermark"],
        help="a write that would take resident data above this share of the cap purges "
        "volatile units first: a percentage above 0%% and up to 100%% (default %(default)s)",
    )
    p.add_argument(
        "--low-watermark",
        metavar="PCT",
        default=DEFAULTS["low_watermark"],
        help="the share of the cap such a write purges down to; not above the high "
        "watermark (default %(default)s)",
    )
    p.add_argument(
        "--pressure-purge",
        metavar="{on,off}",
        default=DEFAULTS["pressure_purge"],
        help="purge volatile units when the machine or the daemon's memory cgroup runs "
        "short of memory (default %(default)s)",
    )
    p.add_argument(
        "--min-free",
        metavar="SIZE",
        default=DEFAULTS["min_free"],
        help=f"available memory below which pressure purging starts: {_SIZE} of RAM or of "
        "the cgroup limit, whichever is lower (default %(default)s)",
    )
    p.add_argument(
        "--pressure-interval",
        metavar="SECONDS",
        default=DEFAULTS["pressure_interval"],
        help=f"seconds between readings of available memory, from {config.MIN_INTERVAL} to "
        f"{config.MAX_INTERVAL:.0f}; a PSI memory stall wakes the watcher sooner "
        "(default %(default)s)",
    )
    p.add_argument(
        "--pin-limit",
        metavar="SIZE",
        default=DEFAULTS["pin_limit"],
        help="the bytes one user may keep pinned (user.vrange.pin), each process's pin of a "
        "range counted once: bytes with an optional K, M, G or T suffix, or a percentage of "
        "the memory cap; a pin past it fails with EDQUOT (default %(default)s)",
    )
    p.add_argument(
        "--metadata-cap",
        metavar="SIZE",
        default=DEFAULTS["metadata_cap"],
        help="cap on what the daemon holds besides file data (inodes, names, xattrs, volatile "
        "units, pins, page tables), like tmpfs's nr_inodes but in bytes: bytes with an optional "
        "K, M, G or T suffix (at least 1M), a percentage of the memory cap, or auto: the larger "
        "of 64M and 10%% of the memory cap; what would pass it fails with ENOSPC (default "
        "%(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        action="store_true",
        help="make the whole mount a cache directory: a regular file no process holds open "
        "is evicted whole, least recently opened first, when the cap needs room or memory "
        "runs short, instead of writes failing with ENOSPC (also -o cache_dir; see "
        "vrangefs cachedir)",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="append the daemon's log to FILE (a background daemon's log is discarded otherwise)",
    )
    p.add_argument(
        "--debug", action="store_true", help="log every request (very verbose; also -o debug)"
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # launch.spawn_daemon's


def build_parser() -> argparse.ArgumentParser:
    """The ``vrangefs`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="vrangefs", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    text = "mount a new, empty vrangefs; returns once it is mounted and answering"
    p = sub.add_parser("mount", help=text, description=text)
    _add_mount_options(p)
    p.set_defaults(func=launch.cmd_mount)

    text = (
        "unmount a vrangefs and wait for its daemon to exit; a mount whose daemon died, is "
        "stopped or does not answer is unmounted (lazily if busy, aborting its FUSE "
        "connection if processes wait on it), saying what was done and lost"
    )
    p = sub.add_parser("umount", help="unmount a vrangefs", description=text)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where it is mounted")
    p.set_defaults(func=unmount.cmd_umount)

    for name, func, text in (
        (
            "volatile",
            rangetools.cmd_volatile,
            "let the filesystem purge the pages wholly inside a range of FILE",
        ),
        (
            "nonvolatile",
            rangetools.cmd_nonvolatile,
            "protect every page touching a range of FILE again; print what was purged",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("file", metavar="FILE", help="a file on a vrangefs mount")
        p.add_argument(
            "offset", metavar="OFFSET", nargs="?", default="0", help=f"{_RANGE} (default 0)"
        )
        p.add_argument(
            "length",
            metavar="LENGTH",
            nargs="?",
            default="0",
            help=f"{_RANGE}; 0 means through the end of the file (default 0)",
        )
        if name == "nonvolatile":
            p.add_argument(
                "--check",
                action="store_true",
                help="exit with status 1 if anything in the range was purged",
            )
        p.set_defaults(func=func)

    text = "show the size, resident data, volatile units, purged ranges and pins of files"
    p = sub.add_parser("status", help=text, description=text)
    p.add_argument("files", nargs="+", metavar="FILE", help="files on a vrangefs mount")
    p.set_defaults(func=rangetools.cmd_status)

    text = (
        "show the live pins of files (user.vrange.pins): the pinned range, the pid of the "
        "process holding it and how many times it holds it"
    )
    p = sub.add_parser("pins", help=text, description=text)
    p.add_argument("files", nargs="+", metavar="FILE", help="files on a vrangefs mount")
    p.set_defaults(func=rangetools.cmd_pins)

    text = "show a mount's statistics (user.vrange.stats), byte counts also in binary units"
    p = sub.add_parser("stats", help=text, description=text)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the root of a vrangefs mount")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object, for machines")
    fmt.add_argument(
        "--prometheus",
        action="store_true",
        help="print Prometheus text format (for node_exporter's textfile collector)",
    )
    p.set_defaults(func=rangetools.cmd_stats)

    text = (
        "make DIR and every directory below it cache directories: a regular file there "
        "that no process holds open is evicted whole, least recently opened first, when "
        "memory is needed (directories created later inherit it); with --off, make them "
        "ordinary again (their files are kept)"
    )
    p = sub.add_parser("cachedir", help=text, description=text)
    p.add_argument("directory", metavar="DIR", help="a directory on a vrangefs mount")
    p.add_argument("--off", action="store_true", help="make them ordinary directories again")
    p.set_defaults(func=rangetools.cmd_cachedir)

    text = "purge every volatile page of a mount now; print how much was purged"
    p = sub.add_parser("purge", help=text, description=text)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the root of a vrangefs mount")
    p.set_defaults(func=rangetools.cmd_purge)

    text = (
        "print one JSON line per purge or eviction on a mount as it happens (time, cause, "
        "paths, byte ranges, bytes freed), until interrupted; root and the daemon's user only"
    )
    p = sub.add_parser("events", help=text, description=text)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the root of a vrangefs mount")
    p.add_argument(
        "--count",
        metavar="N",
        type=int,
        help="exit with status 0 after N purge or evict lines (default: run until interrupted)",
    )
    p.set_defaults(func=subscribe.cmd_events)
    return parser


def build_mount_helper_parser() -> argparse.ArgumentParser:
    """``mount.vrangefs SOURCE MOUNTPOINT [-o OPTIONS] [-f] [-n] [-s] [-v]``, as mount(8) runs it.

    Parsed with argparse, so the man page mount.vrangefs(8) comes from this same definition.
    """
    parser = argparse.ArgumentParser(
        prog="mount.vrangefs",
        description="The helper mount(8) runs for filesystems of type vrangefs, so that "
        "'mount -t vrangefs -o size=512M vrangefs /mnt/cache', the fstab line 'vrangefs "
        "/mnt/cache vrangefs size=512M 0 0' and systemd .mount units work. It mounts as "
        "'vrangefs mount MOUNTPOINT -o OPTIONS' does, and returns once the filesystem is "
        "mounted, with its daemon in the background.",
    )
    parser.add_argument("source", metavar="SOURCE", help="ignored; by convention: vrangefs")
    parser.add_argument(
        "mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory to mount on"
    )
    parser.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        action="append",
        default=[],
        help=_HELPER_OPTIONS_HELP,
    )
    parser.add_argument(
        "-f",
        dest="fake",
        action="store_true",
        help="fake: do nothing and exit 0 (mount -f, e.g. to record the mount in /etc/mtab)",
    )
    parser.add_argument("-n", action="store_true", help="no mtab: accepted and ignored")
    parser.add_argument("-s", action="store_true", help="sloppy: accepted and ignored")
    parser.add_argument("-v", action="store_true", help="verbose: accepted and ignored")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vrangefs`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="vrangefs: %(message)s")
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"vrangefs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.vrangefs SOURCE DIR [-sfnv] [-o OPTIONS]``, as mount(8) calls it."""
    args = build_mount_helper_parser().parse_args(argv)
    if args.fake:
        return 0
    mount_args = ["mount", args.mountpoint]
    for opt in args.options:
        mount_args += ["-o", opt]
    return main(mount_args)


if __name__ == "__main__":
    sys.exit(main())
