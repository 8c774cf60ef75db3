"""Three "hosts" share one Redis behind their own vrangefs caches: the fleet tier at work.

    .venv/bin/python -m examples.cachestore_fleet_demo     (as root: it mounts vrangefs;
                                                            needs redis-server, redis, matplotlib:
                                                            sh tools/setup.sh installs them)

Each host is a vrangefs mount with its own memory cap (16, 24 and 32 MiB by default) and a
client process with a :class:`~examples.cachestore.CacheStore` on it; all three share one
``redis-server`` on loopback (started here, persistence off, killed at the end).  The hosts
serve requests for a catalogue of objects (64 KiB, 4000 of them: 250 MiB, eight times the
largest cap) with the same Zipf popularity (s = 0.9) and their own random streams.  They know
the content keys of the catalogue up front (a manifest, as a build system's action cache gives
them); a lookup that no tier answers is a *miss*: the host regenerates the object and puts it.

The same request streams run three ways:

* **fleet**: local vrangefs copy, then Redis (``CacheStore(root, remote=URL)``);
* **Redis alone**: every request goes to Redis (the remote tier with no local copy);
* **local only**: each host's vrangefs cache by itself (``CacheStore(root)``).

Halfway through each run host 3 comes under memory pressure: its whole local cache is purged
(``vrangefs purge``, what a memory-hungry neighbour causes).  In the fleet its local hit rate
drops and recovers from Redis without a single extra miss; local-only has to regenerate.

Redis is flushed between runs.  Results: the text on stdout,
``examples/results/cachestore-fleet.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from examples.cachestore import CacheStore, Counters, key_of
from examples.cachestore.remote import RemoteError, RemoteMiss, RemoteTier
from examples.cachestore.server import RedisServer, int_info
from vrangefs import client

KIB, MIB = 1 << 10, 1 << 20
HERE = Path(__file__).resolve().parent
_VENV_CLI = Path(sys.executable).with_name("vrangefs")
VRANGEFS = [str(_VENV_CLI)] if _VENV_CLI.exists() else [sys.executable, "-m", "vrangefs"]
MODES = ("fleet", "redis", "local")
LABEL = {"fleet": "fleet (vrangefs + Redis)", "redis": "Redis alone", "local": "local only"}
COLOUR = {"fleet": "tab:blue", "redis": "tab:red", "local": "tab:green"}


@dataclass
class Config:
    caps_mib: tuple[int, ...] = (16, 24, 32)
    objects: int = 4000
    object_kib: int = 64
    zipf: float = 0.9
    requests: int = 6000
    """Per host and run."""
    window: int = 200
    """Requests per sample (the hit-rate curves are rates per window)."""
    pressure_host: int = 2
    """Which host (0-based) is purged at half the run."""
    seed: int = 1


@dataclass
class Sample:
    request: int
    seconds: float
    local_hits: int
    remote_hits: int
    misses: int
    remote_calls: int
    bytes_fetched: int
    bytes_pushed: int
    remote_errors: int


@dataclass
class HostRun:
    mode: str
    host: int
    cap_mib: int
    requests: int = 0
    seconds: float = 0.0
    purged_at: int | None = None
    wrong: int = 0
    samples: list[Sample] = field(default_factory=list)


# -- the workload -------------------------------------------------------------------------
def content(obj: int, size: int) -> bytes:
    """Object *obj*'s bytes (deterministic, incompressible): what a miss must regenerate."""
    return hashlib.shake_256(obj.to_bytes(8, "little")).digest(size)


def zipf_stream(cfg: Config, host: int) -> Iterator[int]:
    """Object ids by Zipf popularity (the same ranking on every host, its own seed)."""
    cum: list[float] = []
    total = 0.0
    for rank in range(cfg.objects):
        total += 1 / (rank + 1) ** cfg.zipf
        cum.append(total)
    rng = random.Random(cfg.seed * 1000 + host)
    while True:
        yield bisect.bisect_left(cum, rng.random() * total)


class RedisOnly:
    """The "Redis alone" client: the remote tier with no local copy."""

    def __init__(self, url: str) -> None:
        self.counters = Counters()
        self.remote = RemoteTier(url, self.counters)

    def get(self, key: str) -> bytes | None:
        try:
            data = self.remote.read_all(key)
        except (RemoteError, RemoteMiss):
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.counters.remote_hits += 1
        return data

    def put(self, data: bytes) -> str:
        key = key_of(data)
        with contextlib.suppress(RemoteError):
            self.remote.push(key, len(data), [data])
        return key

    def close(self) -> None:
        self.remote.close()


def host_main(
    cfg: Config,
    mode: str,
    host: int,
    root: str,
    url: str,
    barrier: Any,
    out: Any,
) -> None:
    """One host's client process: run the requests, send back its samples."""
    size = cfg.object_kib * KIB
    keys = [key_of(content(i, size)) for i in range(cfg.objects)]  # the manifest
    store: CacheStore | RedisOnly
    if mode == "redis":
        store = RedisOnly(url)
    else:
        store = CacheStore(root, remote=url if mode == "fleet" else None)
        assert store.volatile
    run = HostRun(mode, host, cfg.caps_mib[host])
    c = store.counters
    barrier.wait()
    start = time.monotonic()

    def sample(i: int) -> None:
        run.samples.append(
            Sample(
                i,
                time.monotonic() - start,
                c.local_hits,
                c.remote_hits,
                c.misses,
                c.remote_calls,
                c.remote_bytes_fetched,
                c.remote_bytes_pushed,
                c.remote_errors,
            )
        )

    sample(0)
    stream = zipf_stream(cfg, host)
    for i in range(1, cfg.requests + 1):
        obj = next(stream)
        data = store.get(keys[obj])
        if data is None:
            store.put(content(obj, size))
        elif hashlib.sha256(data).hexdigest() != keys[obj]:
            run.wrong += 1
        if host == cfg.pressure_host and i == cfg.requests // 2 and mode != "redis":
            client.purge_all(Path(root).parent)  # memory pressure: everything local goes
            run.purged_at = i
        if i % cfg.window == 0:
            sample(i)
    run.requests = cfg.requests
    run.seconds = time.monotonic() - start
    store.close()
    out.put(asdict(run))


# -- the runs -------------------------------------------------------------------------------
@contextlib.contextmanager
def mounted(base: Path, caps: tuple[int, ...]) -> Iterator[list[Path]]:
    points: list[Path] = []
    try:
        for i, cap in enumerate(caps):
            point = base / f"host{i + 1}"
            point.mkdir()
            log = base / f"host{i + 1}.log"
            subprocess.run(
                [*VRANGEFS, "mount", str(point), "--memory-cap", f"{cap}M", "--log-file", str(log)],
                check=True,
                capture_output=True,
            )
            points.append(point)
        yield points
    finally:
        for point in points:
            done = subprocess.run(
                [*VRANGEFS, "umount", str(point)], capture_output=True, check=False
            )
            if done.returncode != 0 and os.path.ismount(point):
                subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False)


def run_mode(cfg: Config, mode: str, mounts: list[Path], server: RedisServer) -> dict[str, Any]:
    """All hosts at once; Redis INFO sampled every 0.25 s meanwhile."""
    with server.client() as r:
        r.flushall()
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(len(mounts) + 1)
        out = ctx.Queue()
        roots = [m / f"cache-{mode}" for m in mounts]
        procs = [
            ctx.Process(target=host_main, args=(cfg, mode, i, str(root), server.url, barrier, out))
            for i, root in enumerate(roots)
        ]
        for p in procs:
            p.start()
        redis_samples: list[dict[str, float]] = []
        done = threading.Event()
        barrier.wait()
        start = time.monotonic()

        def watch() -> None:
            while not done.is_set():
                info = int_info(r)
                redis_samples.append(
                    {
                        "seconds": time.monotonic() - start,
                        "commands": info["total_commands_processed"],
                        "bytes_in": info["total_net_input_bytes"],
                        "bytes_out": info["total_net_output_bytes"],
                        "used_memory": info["used_memory"],
                    }
                )
                done.wait(0.25)

        watcher = threading.Thread(target=watch)
        watcher.start()
        hosts = [out.get(timeout=1800) for _ in procs]
        done.set()
        watcher.join()
        for p in procs:
            p.join()
        seconds = time.monotonic() - start
        final = int_info(r)
    for root in roots:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    hosts.sort(key=lambda h: h["host"])
    base = redis_samples[0]
    return {
        "mode": mode,
        "seconds": seconds,
        "hosts": hosts,
        "redis": redis_samples,
        "redis_commands": final["total_commands_processed"] - base["commands"],
        "redis_bytes": final["total_net_input_bytes"]
        - base["bytes_in"]
        + final["total_net_output_bytes"]
        - base["bytes_out"],
    }


def totals(run: dict[str, Any]) -> dict[str, int]:
    t = {"requests": 0, "local_hits": 0, "remote_hits": 0, "misses": 0, "wrong": 0}
    for h in run["hosts"]:
        last = h["samples"][-1]
        t["requests"] += h["requests"]
        t["wrong"] += h["wrong"]
        for k in ("local_hits", "remote_hits", "misses"):
            t[k] += last[k]
    return t


def around_purge(host: dict[str, Any], span: int) -> tuple[int, int]:
    """Misses of *host* in the *span* requests before and after its purge."""
    at = host["purged_at"]
    by_request = {s["request"]: s["misses"] for s in host["samples"]}
    return by_request[at] - by_request[at - span], by_request[at + span] - by_request[at]


def summary(cfg: Config, runs: list[dict[str, Any]]) -> str:
    lines = [
        f"fleet demo: {len(cfg.caps_mib)} hosts, caps {'/'.join(map(str, cfg.caps_mib))} MiB, "
        f"{cfg.objects} objects of {cfg.object_kib} KiB "
        f"({cfg.objects * cfg.object_kib / 1024:.0f} MiB), Zipf s={cfg.zipf}, "
        f"{cfg.requests} requests per host, host {cfg.pressure_host + 1} purged at half-time",
    ]
    span = cfg.window * max(1, cfg.requests // (4 * cfg.window))
    for run in runs:
        t = totals(run)
        n = t["requests"]
        lines += [
            f"\n{LABEL[run['mode']]}: {n} requests in {run['seconds']:.1f} s "
            f"({n / run['seconds']:.0f}/s over the fleet)",
            f"  local hits {t['local_hits'] / n:.1%}, remote hits {t['remote_hits'] / n:.1%}, "
            f"misses (regenerated) {t['misses'] / n:.1%}; wrong bytes {t['wrong']}",
            f"  Redis: {run['redis_commands']} commands "
            f"({run['redis_commands'] / run['seconds']:.0f}/s), "
            f"{run['redis_bytes'] / MIB:.0f} MiB moved",
        ]
        for h in run["hosts"]:
            last, k = h["samples"][-1], h["requests"]
            lines.append(
                f"  host {h['host'] + 1} ({h['cap_mib']} MiB): local {last['local_hits'] / k:.1%}, "
                f"remote {last['remote_hits'] / k:.1%}, misses {last['misses'] / k:.1%}, "
                f"{k / h['seconds']:.0f} requests/s"
            )
        if run["mode"] != "redis":
            host = run["hosts"][cfg.pressure_host]
            before, after = around_purge(host, span)
            lines.append(
                f"  host {cfg.pressure_host + 1}: {before} misses in the {span} requests "
                f"before its purge, {after} in the {span} after"
            )
    return "\n".join(lines)


def windowed(host: dict[str, Any], field_name: str) -> tuple[list[int], list[float]]:
    s = host["samples"]
    xs, ys = [], []
    for a, b in itertools.pairwise(s):
        n = b["request"] - a["request"]
        xs.append(b["request"])
        ys.append((b[field_name] - a[field_name]) / n if n else 0.0)
    return xs, ys


def plot(cfg: Config, runs: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (bars, rate), (moved, pressure) = axes
    by_mode = {r["mode"]: r for r in runs}

    # Fleet hit rates: where the answers came from.
    names = [LABEL[r["mode"]] for r in runs]
    local = [totals(r)["local_hits"] / totals(r)["requests"] for r in runs]
    remote = [totals(r)["remote_hits"] / totals(r)["requests"] for r in runs]
    miss = [totals(r)["misses"] / totals(r)["requests"] for r in runs]
    bars.bar(names, local, color="tab:blue", label="local hit (vrangefs)")
    bars.bar(names, remote, bottom=local, color="tab:orange", label="remote hit (Redis)")
    tops = [a + b for a, b in zip(local, remote, strict=True)]
    bars.bar(names, miss, bottom=tops, color="tab:grey", label="miss (regenerated)")
    for i, (lo, re_, mi) in enumerate(zip(local, remote, miss, strict=True)):
        for bottom, value in ((0, lo), (lo, re_), (lo + re_, mi)):
            if value > 0.04:
                bars.text(i, bottom + value / 2, f"{value:.0%}", ha="center", va="center")
    bars.set_ylabel("share of requests (all hosts)")
    bars.set_title("where the answers came from")
    bars.legend(loc="upper right", fontsize="small")

    # Redis requests per second over time.
    for r in runs:
        if r["mode"] == "local":
            continue
        steps = [
            (a, b) for a, b in itertools.pairwise(r["redis"]) if b["seconds"] - a["seconds"] > 0.2
        ]
        xs = [b["seconds"] for _, b in steps]
        ys = [(b["commands"] - a["commands"]) / (b["seconds"] - a["seconds"]) for a, b in steps]
        per_request = r["redis_commands"] / totals(r)["requests"]
        label = f"{LABEL[r['mode']]}: {per_request:.2f} commands per request"
        rate.plot(xs, ys, color=COLOUR[r["mode"]], label=label)
    rate.set_xlabel("seconds (the fleet's local reads go through FUSE: slower than loopback)")
    rate.set_ylabel("Redis commands/s (INFO every 0.25 s)")
    rate.set_title("load on Redis (local only: none)")
    rate.legend(fontsize="small")

    # Bytes through Redis, cumulative, against the requests served (machine-independent).
    for r in runs:
        if r["mode"] == "local":
            continue
        hosts = r["hosts"]
        n = min(len(h["samples"]) for h in hosts)
        xs = [sum(h["samples"][k]["request"] for h in hosts) for k in range(n)]
        for what, style in (("bytes_fetched", "-"), ("bytes_pushed", "--")):
            ys = [sum(h["samples"][k][what] for h in hosts) / MIB for k in range(n)]
            label = f"{LABEL[r['mode']]}: {what.replace('bytes_', '')}"
            moved.plot(xs, ys, style, color=COLOUR[r["mode"]], label=label)
    moved.set_xlabel("requests served by the fleet")
    moved.set_ylabel("object MiB from / to Redis (cumulative)")
    moved.set_title("bytes moved through Redis")
    moved.legend(fontsize="small")

    # The host under pressure.
    h = cfg.pressure_host
    fleet_host = by_mode["fleet"]["hosts"][h]
    for name, style, label in (
        ("local_hits", "-", "fleet: local hits"),
        ("remote_hits", "-", "fleet: remote hits"),
        ("misses", "-", "fleet: misses"),
    ):
        xs, ys = windowed(fleet_host, name)
        colour = {"local_hits": "tab:blue", "remote_hits": "tab:orange", "misses": "tab:grey"}
        pressure.plot(xs, ys, style, color=colour[name], label=label)
    if "local" in by_mode:
        xs, ys = windowed(by_mode["local"]["hosts"][h], "misses")
        pressure.plot(xs, ys, "--", color="tab:green", label="local only: misses")
    pressure.axvline(fleet_host["purged_at"], color="black", linestyle=":", label="purge-all")
    pressure.set_ylim(0, 1)
    pressure.set_xlabel(f"requests of host {h + 1} ({cfg.caps_mib[h]} MiB cap)")
    pressure.set_ylabel(f"rate per {cfg.window} requests")
    pressure.set_title(f"host {h + 1} loses its whole local cache at half-time")
    pressure.legend(fontsize="small", loc="center right")

    for ax in (rate, moved, pressure):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{len(cfg.caps_mib)} hosts (vrangefs caps {'/'.join(map(str, cfg.caps_mib))} MiB) + "
        f"one redis-server; {cfg.objects} x {cfg.object_kib} KiB objects, Zipf s={cfg.zipf}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Config()
    p.add_argument("--caps-mib", default=",".join(map(str, d.caps_mib)))
    p.add_argument("--objects", type=int, default=d.objects)
    p.add_argument("--object-kib", type=int, default=d.object_kib)
    p.add_argument("--zipf", type=float, default=d.zipf)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--modes", default=",".join(MODES), help="of: fleet, redis, local")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cachestore-fleet")
    args = p.parse_args(argv)
    caps = tuple(int(c) for c in args.caps_mib.split(","))
    cfg = Config(
        caps,
        args.objects,
        args.object_kib,
        args.zipf,
        args.requests,
        args.window,
        min(2, len(caps) - 1),
        args.seed,
    )
    modes = [m for m in args.modes.split(",") if m]
    if cfg.requests % (2 * cfg.window) or "fleet" not in modes:
        p.error("--requests must be a multiple of 2 x --window, and fleet must run")
    if os.geteuid() != 0:
        print("needs root (it mounts vrangefs)", file=sys.stderr)
        return 2
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp,
        RedisServer() as server,
        mounted(Path(tmp), cfg.caps_mib) as mounts,
    ):
        for mode in modes:
            print(f"running {LABEL[mode]} ...", file=sys.stderr, flush=True)
            runs.append(run_mode(cfg, mode, mounts, server))
    text = summary(cfg, runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": asdict(cfg),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "load_average_at_end": os.getloadavg(),
        },
        "summary": text,
        "runs": runs,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(cfg, runs, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
