"""The ``vrangefs`` command: mount, umount and the volatile-range tools.

Every subcommand reports user errors as one line on stderr naming the thing
that is wrong and exits non-zero, without a traceback (:class:`UserError`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vrangefs.memory import meminfo
from vrangefs.protocol import parse_size

if TYPE_CHECKING:
    from vrangefs.config import MountConfig

log = logging.getLogger(__name__)

DEFAULT_CAP = "50%"
READY_TIMEOUT = 30.0


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def memory_cap(text: str) -> int:
    try:
        return parse_size(text, meminfo()["MemTotal"])
    except ValueError as e:
        raise UserError(f"invalid --memory-cap {text!r}: {e}") from None


def is_mounted(path: str) -> bool:
    """True if *path* is a mount point, dead FUSE mounts included."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if _unescape_mountinfo(line.split()[4]) == real:
                return True
    return False


def _unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/self/mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def check_mountpoint(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(
            f"mountpoint {path} does not exist (create it with mkdir -p {path})"
        ) from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UserError(
                f"mountpoint {path} is a dead FUSE mount (its daemon died); "
                f"clean it up with: vrangefs umount {path}"
            ) from None
        raise UserError(f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {path} is not a directory")
    if is_mounted(path):
        raise UserError(
            f"{path} is already a mount point (unmount it first: vrangefs umount {path})"
        )
    return os.path.abspath(path)


def check_fuse_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UserError(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3"
        )
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        raise UserError(f"cannot open /dev/fuse: {e.strerror}") from None
    os.close(fd)


def split_options(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(o for o in value.split(",") if o)
    return out


# -- mount ----------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    from vrangefs.config import MountConfig

    fuse_opts, root = apply_mount_options(args)
    cap = memory_cap(args.memory_cap)
    purged_reads = args.purged_reads
    if purged_reads not in ("eio", "zeros"):
        raise UserError(f"invalid purged_reads={purged_reads!r}: expected 'eio' or 'zeros'")
    high = _fraction("--high-watermark", args.high_watermark)
    low = _fraction("--low-watermark", args.low_watermark)
    if low > high:
        raise UserError(
            f"--low-watermark {args.low_watermark} is above --high-watermark "
            f"{args.high_watermark}: expected low <= high"
        )
    if args.pressure_purge not in ("on", "off"):
        raise UserError(f"invalid pressure_purge={args.pressure_purge!r}: expected 'on' or 'off'")
    pressure_config = None
    if args.pressure_purge == "on":
        from vrangefs.config import PressureConfig
        from vrangefs.memory import MemoryProbe

        try:
            min_free = parse_size(args.min_free, MemoryProbe().total())
        except ValueError as e:
            raise UserError(f"invalid --min-free {args.min_free!r}: {e}") from None
        pressure_config = PressureConfig(min_free=min_free, interval=args.pressure_interval)
    mountpoint = check_mountpoint(args.mountpoint)
    check_fuse_device()
    config = MountConfig(
        mountpoint=mountpoint,
        memory_cap=cap,
        fuse_options=fuse_opts,
        purged_reads_zeros=purged_reads == "zeros",
        workers=args.workers,
        high_watermark=high,
        low_watermark=low,
        pressure=pressure_config,
        root_mode=root.get("mode", 0o1777),
        root_uid=root.get("uid"),
        root_gid=root.get("gid"),
    )
    if args.foreground:
        return run_foreground(config, args)
    return spawn_daemon(args, mountpoint)


# -o options that set a vrangefs option (tmpfs's names where it has one).
_OPTION_ALIASES = {
    "size": "memory_cap",
    "memory_cap": "memory_cap",
    "purged_reads": "purged_reads",
    "high_watermark": "high_watermark",
    "low_watermark": "low_watermark",
    "pressure_purge": "pressure_purge",
    "min_free": "min_free",
}
# mount(8) and fstab options that mean nothing to the daemon.
_IGNORED_OPTIONS = frozenset(
    (
        "defaults",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "user",
        "users",
        "owner",
        "group",
        "rw",
        "nouser",
        "sw",
        "xx",
    )
)


def apply_mount_options(args: argparse.Namespace) -> tuple[list[str], dict[str, int]]:
    """Sort ``-o`` options: vrangefs settings go into *args*, root ownership
    (``mode``, ``uid``, ``gid``, as tmpfs has them) into the returned dict,
    mount(8)'s own options are dropped, and the rest go to FUSE."""
    fuse_opts: list[str] = []
    root: dict[str, int] = {}
    for opt in split_options(args.options):
        key, sep, value = opt.partition("=")
        if key in _OPTION_ALIASES and sep:
            setattr(args, _OPTION_ALIASES[key], value)
        elif key == "debug" and not sep:
            args.debug = True
        elif key in ("mode", "uid", "gid") and sep:
            try:
                root[key] = int(value, 8) if key == "mode" else int(value)
            except ValueError:
                kind = "an octal mode such as 1777" if key == "mode" else "a number"
                raise UserError(f"invalid option {opt!r}: expected {kind}") from None
            if root[key] < 0 or (key == "mode" and root[key] > 0o7777):
                raise UserError(f"invalid option {opt!r}: out of range")
        elif key in _IGNORED_OPTIONS or key.startswith(("x-", "comment")):
            continue
        else:
            fuse_opts.append(opt)
    return fuse_opts, root


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.vrangefs SOURCE DIR [-sfnv] [-o OPTIONS]``, as mount(8) calls it.

    This is what makes ``mount -t vrangefs -o size=512M vrangefs /mnt/cache``
    and the fstab line ``vrangefs /mnt/cache vrangefs size=512M 0 0`` work.
    """
    parser = argparse.ArgumentParser(prog="mount.vrangefs")
    parser.add_argument("source", help="ignored (by convention: vrangefs)")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-s", action="store_true", help="sloppy: accepted, ignored")
    parser.add_argument(
        "-f", dest="fake", action="store_true", help="fake: do everything but mount"
    )
    parser.add_argument("-n", action="store_true", help="no mtab: accepted, ignored")
    parser.add_argument("-v", action="store_true", help="verbose: accepted, ignored")
    args = parser.parse_args(argv)
    if args.fake:
        return 0
    mount_args = ["mount", args.mountpoint]
    for opt in args.options:
        mount_args += ["-o", opt]
    return main(mount_args)


def _fraction(option: str, text: str) -> float:
    """A percentage such as ``95%`` (or a fraction such as ``0.95``) as a fraction."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise UserError(f"invalid {option} {text!r}: expected a percentage above 0% and up to 100%")
    return value


def run_foreground(config: MountConfig, args: argparse.Namespace) -> int:
    from vrangefs.mount import run, setup_logging

    setup_logging(args.debug, args.log_file)
    ready_fd: int | None = args.ready_fd

    def ready(error: str | None) -> None:
        nonlocal ready_fd
        if error is not None:
            log.error("%s", error)
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n" if error is None else f"error {error}\n".encode())
            os.close(ready_fd)
            ready_fd = None

    return run(config, ready)


# Options the background daemon gets as they were given.
_PASSED_ON = (
    "memory_cap",
    "purged_reads",
    "workers",
    "high_watermark",
    "low_watermark",
    "pressure_purge",
    "min_free",
    "pressure_interval",
)


def spawn_daemon(args: argparse.Namespace, mountpoint: str) -> int:
    """Start the daemon in its own session; return once it is mounted or failed."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "vrangefs", "mount", mountpoint, "--foreground"]
    cmd += ["--ready-fd", str(write_fd)]
    for option in _PASSED_ON:
        cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    for opt in args.options:
        cmd += ["-o", opt]
    if args.debug:
        cmd.append("--debug")
    if args.log_file:
        cmd += ["--log-file", os.path.abspath(args.log_file)]
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
        proc = subprocess.Popen(
            cmd,
            stdin=devnull_in,
            stdout=devnull_out,
            stderr=devnull_out if not args.debug or args.log_file else None,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
        )
    os.close(write_fd)
    message = _read_ready(read_fd, proc)
    if message != "ok":
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if is_mounted(mountpoint):
            _fusermount_unmount(mountpoint)
        raise UserError(message)
    # The kernel answers this stat only once the daemon has served INIT.
    os.stat(mountpoint)
    print(f"vrangefs: mounted {mountpoint} (daemon pid {proc.pid})", file=sys.stderr)
    return 0


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                return f"daemon did not report readiness within {READY_TIMEOUT:.0f}s"
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    text = data.decode(errors="replace").strip()
    if text == "ok":
        return "ok"
    if text.startswith("error "):
        return text[len("error ") :]
    code = proc.wait(timeout=10)
    return (
        f"daemon exited with status {code} before mounting"
        " (run with --foreground --debug to see why)"
    )


# -- umount ---------------------------------------------------------------------
def _fusermount_unmount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] if tool else ["umount"]
    if lazy:
        cmd.append("-z" if tool else "-l")
    return subprocess.run([*cmd, mountpoint], capture_output=True, text=True, check=False)


def daemon_pid(mountpoint: str) -> int | None:
    from vrangefs.protocol import STATS, parse_stats

    try:
        stats = parse_stats(os.getxattr(mountpoint, STATS))
    except OSError:
        return None
    pid = stats.get("pid")
    return int(pid) if pid is not None else None


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if not is_mounted(mountpoint):
        raise UserError(f"{mountpoint} is not mounted")
    dead = False
    try:
        os.stat(mountpoint)
    except OSError as e:
        dead = e.errno == errno.ENOTCONN
    pid = None if dead else daemon_pid(mountpoint)
    result = _fusermount_unmount(mountpoint, lazy=dead)
    if result.returncode != 0:
        raise UserError(
            f"cannot unmount {mountpoint}: {result.stderr.strip() or result.stdout.strip()}"
        )
    if dead:
        print(
            f"vrangefs: {mountpoint} was a dead mount (its daemon had died); cleaned up."
            " Data held in it is lost.",
            file=sys.stderr,
        )
    if pid is not None:
        _wait_for_exit(pid, 10.0)
    return 0


def _running(pid: int) -> bool:
    """True while *pid* runs; an exited process its parent has not reaped yet counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.02)
    log.warning("daemon %d still running %.0fs after unmount", pid, timeout)


# -- volatile ranges ----------------------------------------------------------------
def _range_args(args: argparse.Namespace) -> tuple[int, int]:
    """OFFSET and LENGTH from the command line (suffixes allowed), whole file by default."""
    from vrangefs import protocol

    text = f"{args.offset},{args.length}"
    try:
        return protocol.parse_range(text.encode())
    except protocol.RangeError as e:
        raise UserError(f"{args.file}: {e}") from None


def _os_error(what: str, path: str, e: OSError) -> UserError:
    return UserError(f"cannot {what} {path}: {e.strerror or e}")


def cmd_volatile(args: argparse.Namespace) -> int:
    from vrangefs import client

    offset, length = _range_args(args)
    try:
        client.mark_volatile(args.file, offset, length)
    except OSError as e:
        raise _os_error("mark volatile", args.file, e) from None
    return 0


def cmd_nonvolatile(args: argparse.Namespace) -> int:
    from vrangefs import client

    offset, length = _range_args(args)
    try:
        lost = client.mark_nonvolatile(args.file, offset, length)
    except OSError as e:
        raise _os_error("mark non-volatile", args.file, e) from None
    if not lost:
        print(f"{args.file}: nothing purged")
        return 0
    for start, size in lost:
        print(f"{args.file}: purged {start},{size} ({_size(size)})")
    return 1 if args.check else 0


def _size(n: int) -> str:
    import humanize

    return str(humanize.naturalsize(n, binary=True, format="%.1f"))


def cmd_status(args: argparse.Namespace) -> int:
    from vrangefs import client

    status = 0
    for path in args.files:
        try:
            units = client.volatile_ranges(path)
            lost = client.purged(path)
            st = os.stat(path)
        except OSError as e:
            print(f"vrangefs: cannot read the status of {path}: {e.strerror or e}", file=sys.stderr)
            status = 1
            continue
        print(
            f"{path}: size {st.st_size} ({_size(st.st_size)}), "
            f"resident {_size(st.st_blocks * 512)}, {len(units)} volatile unit(s), "
            f"{len(lost)} purged range(s)"
        )
        rows = [("volatile", start, size) for start, size in units]
        rows += [("purged", start, size) for start, size in lost]
        if rows:
            print(f"  {'kind':<9} {'offset':>14} {'length':>14}  size")
            for kind, start, size in sorted(rows, key=lambda r: (r[1], r[0])):
                print(f"  {kind:<9} {start:>14} {size:>14}  {_size(size)}")
    return status


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from vrangefs import client

    try:
        stats = client.stats(args.mountpoint)
    except OSError as e:
        raise _os_error("read statistics of", args.mountpoint, e) from None
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    if args.prometheus:
        sys.stdout.write(prometheus_text(stats, os.path.abspath(args.mountpoint)))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        shown = str(value)
        if isinstance(value, int) and (
            key.endswith("_bytes") or key.endswith("_total") or key == "memory_cap"
        ):
            shown = f"{value} ({_size(value)})"
        print(f"{key:<{width}}  {shown}")
    return 0


_CAUSES = ("cap", "pressure", "explicit")
_RENAMED = {"memory_cap": "memory_cap_bytes"}


def prometheus_text(stats: dict[str, int | str], mountpoint: str) -> str:
    """The statistics in Prometheus text exposition format, labelled by mount point.

    Purges are counters labelled by cause; everything else is a gauge. For
    node_exporter's textfile collector, e.g. from a timer:
    ``vrangefs stats --prometheus /mnt/cache > /var/lib/node_exporter/vrangefs.prom``.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    class StatsCollector(Collector):
        def collect(self) -> list[Metric]:
            metrics: list[Metric] = []
            for prefix, what in (
                ("purged_bytes", "bytes purged"),
                ("purge_events", "units purged"),
            ):
                counter = CounterMetricFamily(
                    f"vrangefs_{prefix}",
                    f"{what} since mount, by cause",
                    labels=["mountpoint", "cause"],
                )
                for cause in _CAUSES:
                    value = stats.get(f"{prefix}_{cause}")
                    if isinstance(value, int):
                        counter.add_metric([mountpoint, cause], value)
                metrics.append(counter)
            for key, value in stats.items():
                if (
                    not isinstance(value, int)
                    or key == "pid"
                    or key.startswith(("purged_bytes", "purge_events"))
                ):
                    continue
                gauge = GaugeMetricFamily(
                    f"vrangefs_{_RENAMED.get(key, key)}",
                    f"vrangefs statistic {key}",
                    labels=["mountpoint"],
                )
                gauge.add_metric([mountpoint], value)
                metrics.append(gauge)
            return metrics

    registry = CollectorRegistry()
    registry.register(StatsCollector())
    return generate_latest(registry).decode()


def cmd_purge(args: argparse.Namespace) -> int:
    from vrangefs import client

    try:
        before = client.stats(args.mountpoint)
        client.purge_all(args.mountpoint)
        after = client.stats(args.mountpoint)
    except OSError as e:
        raise _os_error("purge", args.mountpoint, e) from None
    freed = int(after.get("purged_bytes_total", 0)) - int(before.get("purged_bytes_total", 0))
    units = int(after.get("purge_events", 0)) - int(before.get("purge_events", 0))
    print(f"{args.mountpoint}: purged {units} unit(s), {_size(freed)}")
    return 0


# -- argument parsing -------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vrangefs", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="mount a vrangefs filesystem")
    p.add_argument("mountpoint")
    p.add_argument(
        "--memory-cap",
        default=DEFAULT_CAP,
        help="cap on resident data: bytes, K/M/G/T suffix or %% of RAM (default %(default)s)",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        help="mount options (FUSE options such as allow_other, and purged_reads=eio|zeros)",
    )
    p.add_argument(
        "--purged-reads",
        choices=("eio", "zeros"),
        default="eio",
        help="what reading a purged page gives (default: eio)",
    )
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--log-file", help="write the daemon's log here")
    p.add_argument(
        "--high-watermark",
        default="100%",
        help="purge volatile units when resident data would exceed this share of "
        "the cap (default %(default)s)",
    )
    p.add_argument(
        "--low-watermark",
        default="95%",
        help="...and purge down to this share (default %(default)s)",
    )
    p.add_argument(
        "--pressure-purge",
        choices=("on", "off"),
        default="on",
        help="purge volatile units when the machine or cgroup runs short of memory "
        "(default %(default)s)",
    )
    p.add_argument(
        "--min-free",
        default="5%",
        help="available memory below which pressure purging starts: bytes with "
        "K/M/G suffix or %% of RAM (or of the cgroup limit) (default %(default)s)",
    )
    p.add_argument("--pressure-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount a vrangefs filesystem")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    range_help = "bytes, K/M/G suffixes allowed; LENGTH 0 = through the end of the file"
    for name, func, text in (
        ("volatile", cmd_volatile, "let the filesystem purge a range of FILE"),
        ("nonvolatile", cmd_nonvolatile, "protect a range of FILE again; print what was purged"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("file")
        p.add_argument("offset", nargs="?", default="0", help=f"OFFSET ({range_help})")
        p.add_argument("length", nargs="?", default="0", help=f"LENGTH ({range_help})")
        if name == "nonvolatile":
            p.add_argument(
                "--check",
                action="store_true",
                help="exit with status 1 if anything in the range was purged",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="show the volatile units and purged ranges of files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stats", help="show a mount's statistics")
    p.add_argument("mountpoint")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON for machines")
    fmt.add_argument(
        "--prometheus",
        action="store_true",
        help="print Prometheus text format (for node_exporter's textfile collector)",
    )
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("purge", help="purge every volatile page of a mount now")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
