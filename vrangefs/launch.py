"""``vrangefs mount``: check everything first, then run the daemon, here or in the background.

Every option value, the mount point and /dev/fuse are checked before anything is started,
so a mistake costs one line on stderr and exit status 1, never a half-made mount.  In the
background (the default) the daemon is this same command re-run with ``--foreground
--ready-fd N`` in its own session; it reports on that pipe once the kernel mount exists
(``ok``) or why it could not mount (``error ...``), and ``vrangefs mount`` returns only then.
This is the only command-line module that imports the daemon (:mod:`vrangefs.mount`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import stat
import subprocess
import sys
import time

from vrangefs import config, mountinfo
from vrangefs.config import Machine, MountConfig, UserError
from vrangefs.memory import MemoryProbe, meminfo
from vrangefs.unmount import fusermount

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0


def this_machine() -> Machine:
    """RAM, and the memory the daemon may use (RAM, or its cgroup's limit if lower)."""
    return Machine(ram=meminfo()["MemTotal"], memory=MemoryProbe().total())


def check_mountpoint(path: str) -> str:
    """The absolute mount point, if it is an existing directory and not mounted yet."""
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
    if mountinfo.is_mounted(path):
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


class Readiness:
    """The pipe on which a background daemon tells ``vrangefs mount`` how mounting went."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.reported = False

    def report(self, error: str | None) -> None:
        """``ok``, or ``error MESSAGE``; only the first report counts."""
        if self.reported:
            return
        self.reported = True
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, b"ok\n" if error is None else f"error {error}\n".encode())
            os.close(self.fd)
            self.fd = None


def configure(args: argparse.Namespace) -> tuple[MountConfig, list[str]]:
    """The daemon's configuration from the command line, and warnings; or UserError."""
    sorted_options = config.sort_options(args.options)
    given = {name: getattr(args, name) for name in config.DEFAULTS}
    settings = config.settings_of(given, sorted_options)
    if sorted_options.debug:
        args.debug = True
    if args.cache_dir:
        sorted_options.cache_dir = True
    mount_config, warnings = config.build_config(
        os.path.abspath(args.mountpoint), settings, sorted_options, this_machine()
    )
    check_mountpoint(args.mountpoint)
    check_fuse_device()
    return mount_config, warnings


def cmd_mount(args: argparse.Namespace) -> int:
    ready = Readiness(args.ready_fd)
    try:
        mount_config, warnings = configure(args)
    except UserError as e:
        ready.report(str(e))  # a background daemon: ``vrangefs mount`` prints it
        raise
    if args.ready_fd is None:  # warn once: here, not again in the background daemon
        for warning in warnings:
            print(f"vrangefs: {warning}", file=sys.stderr)
    if args.foreground:
        return run_foreground(mount_config, args, ready)
    return spawn_daemon(args, mount_config.mountpoint)


def run_foreground(mount_config: MountConfig, args: argparse.Namespace, ready: Readiness) -> int:
    """Serve the mount in this process until it is unmounted or signalled."""
    # The daemon's own imports (pyfuse3, trio) cost every other command ~0.3 s of
    # start-up, so only the process that serves loads them.
    from vrangefs.mount import run, setup_logging  # noqa: PLC0415

    setup_logging(args.debug, args.log_file)

    def mounted(error: str | None) -> None:
        if error is not None:
            log.error("%s", error)
        ready.report(error)

    try:
        return run(mount_config, mounted)
    except OSError as e:  # before mounting, e.g. the arena could not be mapped after all
        if ready.reported:
            raise
        mounted(f"cannot start the daemon for {mount_config.mountpoint}: {e}")
        return 1


def spawn_daemon(args: argparse.Namespace, mountpoint: str) -> int:
    """Start the daemon in its own session; return once it is mounted or failed."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "vrangefs", "mount", mountpoint, "--foreground"]
    cmd += ["--ready-fd", str(write_fd)]
    for name in config.DEFAULTS:  # as they were given: the daemon checks them again
        cmd += [config.option_name(name), str(getattr(args, name))]
    for opt in args.options:
        cmd += ["-o", opt]
    if args.debug:
        cmd.append("--debug")
    if args.cache_dir:
        cmd.append("--cache-dir")
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
    message = read_ready(read_fd, proc)
    if message == "ok":
        try:  # the kernel answers this stat only once the daemon has served INIT
            os.stat(mountpoint)
        except OSError as e:
            message = (
                f"the daemon mounted {mountpoint} but failed at once ({e.strerror}); "
                "run with --foreground --debug to see why"
            )
    if message != "ok":
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if mountinfo.is_mounted(mountpoint):
            fusermount(mountpoint, lazy=True)
        raise UserError(message)
    print(f"vrangefs: mounted {mountpoint} (daemon pid {proc.pid})", file=sys.stderr)
    return 0


def read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    """``ok``, or why the daemon did not mount (its report, or how it ended)."""
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
