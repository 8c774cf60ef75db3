"""Command line for the cache store.

    python -m examples.cachestore ROOT put FILE|-          prints the key
    python -m examples.cachestore ROOT get KEY [-o OUT]    the bytes to stdout (or OUT)
    python -m examples.cachestore ROOT contains KEY
    python -m examples.cachestore ROOT delete KEY
    python -m examples.cachestore ROOT stats [--json]
    python -m examples.cachestore ROOT sweep               remove what dead writers left

``--remote redis://HOST:PORT/DB`` (before the command) adds the fleet tier: put pushes to Redis
too, get/contains fall back to it, delete removes it there too, stats shows the server.

Exit status: 0 success; 1 a miss (get), absent (contains, delete); 2 bad usage or a malformed
key; 3 an I/O error (e.g. ENOSPC: the filesystem is full and nothing is purgeable).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from examples.cachestore.store import BadKeyError, CacheStore

EXIT_OK, EXIT_MISS, EXIT_USAGE, EXIT_IO = 0, 1, 2, 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.cachestore",
        description="A content-addressed blob cache; volatile (purgeable) on vrangefs.",
    )
    p.add_argument("root", help="the cache directory (created if missing)")
    p.add_argument(
        "--plain", action="store_true", help="plain files even on vrangefs (never purged)"
    )
    p.add_argument("--remote", metavar="URL", help="Redis behind the cache: redis://HOST:PORT/DB")
    p.add_argument(
        "--remote-ttl", type=float, metavar="SECONDS", help="expire remote copies after this"
    )
    p.add_argument(
        "--remote-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="bound on every remote call (default 1)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    put = sub.add_parser("put", help="store a file ('-': standard input); prints its key")
    put.add_argument("file")
    get = sub.add_parser("get", help="write an object to stdout or -o OUT; exit 1 on a miss")
    get.add_argument("key")
    get.add_argument("-o", "--output", help="write here (atomically) instead of stdout")
    for name, what in (("contains", "exit 0 if present and intact"), ("delete", "remove")):
        sub.add_parser(name, help=what).add_argument("key")
    stats = sub.add_parser("stats", help="the mount's statistics and what the cache holds")
    stats.add_argument("--json", action="store_true")
    sub.add_parser("sweep", help="remove temporary files of writers that died")
    return p


def run(args: argparse.Namespace) -> int:
    with CacheStore(
        args.root,
        volatile=False if args.plain else None,
        remote=args.remote,
        remote_ttl=args.remote_ttl,
        remote_timeout=args.remote_timeout,
    ) as store:
        return command(store, args)


def command(store: CacheStore, args: argparse.Namespace) -> int:
    if args.command == "put":
        key = store.put_file(sys.stdin.buffer if args.file == "-" else args.file)
        print(key)
        return EXIT_OK
    if args.command == "get":
        if args.output is not None:
            return EXIT_OK if store.get_to(args.key, args.output) else EXIT_MISS
        data = store.get(args.key)
        if data is None:
            print(f"miss: {args.key}", file=sys.stderr)
            return EXIT_MISS
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    if args.command == "contains":
        return EXIT_OK if store.contains(args.key) else EXIT_MISS
    if args.command == "delete":
        return EXIT_OK if store.delete(args.key) else EXIT_MISS
    if args.command == "sweep":
        print(store.sweep())
        return EXIT_OK
    stats = store.stats()
    sections: dict[str, dict[str, object]] = {
        "usage": asdict(store.usage()),
        "mount": dict(stats.mount),
    }
    if stats.remote:
        sections["remote"] = dict(stats.remote)
    if args.json:
        print(json.dumps({"root": str(store.root), "volatile": store.volatile, **sections}))
    else:
        print(f"root={store.root}\nvolatile={int(store.volatile)}")
        for section, values in sections.items():
            for k, v in values.items():
                print(f"{section}.{k}={v}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except BadKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
