"""The range tools: ``vrangefs volatile``, ``nonvolatile``, ``status``, ``pins``, ``stats`` and
``purge``.

Each is a thin layer over :mod:`vrangefs.client`; failures become one-line
:class:`~vrangefs.config.UserError` messages naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vrangefs import client, output, protocol
from vrangefs.config import UserError


def _range_args(args: argparse.Namespace) -> tuple[int, int]:
    """OFFSET and LENGTH from the command line (suffixes allowed), whole file by default."""
    text = f"{args.offset},{args.length}"
    try:
        return protocol.parse_range(text.encode())
    except protocol.RangeError as e:
        raise UserError(f"{args.file}: {e}") from None


def _os_error(what: str, path: str, e: OSError) -> UserError:
    return UserError(f"cannot {what} {path}: {e.strerror or e}")


def cmd_volatile(args: argparse.Namespace) -> int:
    offset, length = _range_args(args)
    try:
        client.mark_volatile(args.file, offset, length)
    except OSError as e:
        raise _os_error("mark volatile", args.file, e) from None
    return 0


def cmd_nonvolatile(args: argparse.Namespace) -> int:
    offset, length = _range_args(args)
    try:
        lost = client.mark_nonvolatile(args.file, offset, length)
    except OSError as e:
        raise _os_error("mark non-volatile", args.file, e) from None
    if not lost:
        print(f"{args.file}: nothing purged")
        return 0
    for start, length_lost in lost:
        print(f"{args.file}: purged {start},{length_lost} ({output.size(length_lost)})")
    return 1 if args.check else 0


def cmd_status(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            units = client.volatile_ranges(path)
            lost = client.purged(path)
            pins = client.pins(path)
            st = os.stat(path)
        except OSError as e:
            print(f"vrangefs: cannot read the status of {path}: {e.strerror or e}", file=sys.stderr)
            status = 1
            continue
        print(
            f"{path}: size {st.st_size} ({output.size(st.st_size)}), "
            f"resident {output.size(st.st_blocks * 512)}, {len(units)} volatile unit(s), "
            f"{len(lost)} purged range(s), {sum(p.count for p in pins)} pin(s)"
        )
        rows = [("volatile", start, length, "") for start, length in units]
        rows += [("purged", start, length, "") for start, length in lost]
        rows += [("pinned", p.offset, p.length, _holder(p)) for p in pins]
        if rows:
            print(f"  {'kind':<9} {'offset':>14} {'length':>14}  size")
            for kind, start, length, note in sorted(rows, key=lambda r: (r[1], r[0], r[3])):
                line = f"  {kind:<9} {start:>14} {length:>14}  {output.size(length)}"
                print(f"{line:<52}{note}".rstrip())
    return status


def _holder(pin: protocol.PinLine) -> str:
    return f"pid {pin.pid}" + (f", {pin.count} times" if pin.count > 1 else "")


def cmd_pins(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            pins = client.pins(path)
        except OSError as e:
            print(f"vrangefs: cannot read the pins of {path}: {e.strerror or e}", file=sys.stderr)
            status = 1
            continue
        if not pins:
            print(f"{path}: no pins")
            continue
        print(f"{path}: {sum(p.count for p in pins)} pin(s)")
        print(f"  {'offset':>14} {'length':>14}  {'size':<10} {'pid':>8} {'count':>6}")
        for p in pins:
            print(
                f"  {p.offset:>14} {p.length:>14}  {output.size(p.length):<10} "
                f"{p.pid:>8} {p.count:>6}"
            )
    return status


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        stats = client.stats(args.mountpoint)
    except OSError as e:
        raise _os_error("read statistics of", args.mountpoint, e) from None
    if args.json:
        print(json.dumps(stats, indent=2))
    elif args.prometheus:
        sys.stdout.write(output.prometheus_text(stats, os.path.abspath(args.mountpoint)))
    else:
        sys.stdout.write(output.stats_table(stats))
    return 0


def cmd_cachedir(args: argparse.Namespace) -> int:
    """Set or clear the cache-directory flag of DIR and of every directory below it.

    The walk stays on DIR's mount and does not follow symbolic links.  Each
    directory is set by its own setxattr, so the kernel checks the caller's
    right to each one; those it refuses are named and make the exit status 1.
    """
    on = not args.off
    root = args.directory
    try:
        client.set_cache_dir(root, on)
        device = os.stat(root).st_dev
    except OSError as e:
        raise _os_error("set the cache-directory flag of", root, e) from None
    changed, failed = 1, 0
    for top, dirs, _files in os.walk(root, onerror=_walk_error):
        keep = []
        for name in dirs:
            path = os.path.join(top, name)
            try:
                if os.lstat(path).st_dev != device:
                    continue
                client.set_cache_dir(path, on)
            except OSError as e:
                print(f"vrangefs: {path}: {e.strerror or e}", file=sys.stderr)
                failed += 1
                continue
            changed += 1
            keep.append(name)
        dirs[:] = keep
    state = "a cache directory" if on else "an ordinary directory"
    print(f"{root}: {state} now ({changed} director{'y' if changed == 1 else 'ies'})")
    if failed:
        print(f"vrangefs: {failed} directories below {root} left unchanged", file=sys.stderr)
    return 1 if failed else 0


def _walk_error(e: OSError) -> None:
    print(f"vrangefs: {e.filename}: {e.strerror or e}", file=sys.stderr)


def cmd_purge(args: argparse.Namespace) -> int:
    try:
        before = client.stats(args.mountpoint)
        client.purge_all(args.mountpoint)
        after = client.stats(args.mountpoint)
    except OSError as e:
        raise _os_error("purge", args.mountpoint, e) from None
    freed = int(after.get("purged_bytes_total", 0)) - int(before.get("purged_bytes_total", 0))
    units = int(after.get("purge_events", 0)) - int(before.get("purge_events", 0))
    files = int(after.get("evicted_files", 0)) - int(before.get("evicted_files", 0))
    evicted = int(after.get("evicted_bytes", 0)) - int(before.get("evicted_bytes", 0))
    line = f"{args.mountpoint}: purged {units} unit(s), {output.size(freed)}"
    if files or int(after.get("cache_dir_files", 0)):
        line += f"; evicted {files} file(s), {output.size(evicted)}"
    print(line)
    return 0
