"""Push several times the memory cap through the cache store, on vrangefs and on tmpfs.

    .venv/bin/python -m examples.cachestore_demo          (as root; needs matplotlib:
    .venv/bin/python examples/cachestore_demo.py           .venv/bin/pip install -e '.[bench]')

An application caches generated 1 MiB objects (think rendered pages or decoded images) in a
:class:`~examples.cachestore.CacheStore`.  A quarter of its requests are for new objects; the
rest re-get earlier ones with a Zipf-like preference for recent ones (the k-th most recently
introduced object is wanted with weight 1/k^s), so the working set moves on as time passes.
On a miss it regenerates the object and puts it again.  The run goes on until the cache has
been handed ``--factor`` times the memory cap.

The same request sequence then runs against a kernel tmpfs of the same size.  The store works
there too (plain files; vrangefs is never called), but tmpfs cannot shed anything: once full,
every put fails with ENOSPC and the cache is frozen with whatever came first.

Both mounts are made in a temporary directory and always unmounted.  Results: the text on
stdout, ``examples/results/cachestore-demo.json`` and ``.png`` (memory, hit rate, purges and
failed puts over the requests).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from examples.cachestore import CacheStore, key_of
from vrangefs import client

MIB = 1 << 20
HERE = Path(__file__).resolve().parent
_VENV_CLI = Path(sys.executable).with_name("vrangefs")
VRANGEFS = [str(_VENV_CLI)] if _VENV_CLI.exists() else [sys.executable, "-m", "vrangefs"]


@dataclass
class Config:
    cap_mib: int = 128
    object_kib: int = 1024
    factor: float = 4.0
    """Stop once the vrangefs run has put this many times the cap."""
    new_fraction: float = 0.25
    """Share of requests for objects never asked for before."""
    zipf: float = 1.0
    """Skew of the re-gets over recency rank."""
    seed: int = 1
    sample_every: int = 20


@dataclass
class Sample:
    request: int
    seconds: float
    hits: int
    misses: int
    puts: int
    failed_puts: int
    used_bytes: int
    """vrangefs: resident data (user.vrange.stats); tmpfs: statvfs used."""
    daemon_rss_bytes: int = 0
    purge_events: int = 0
    purged_bytes: int = 0


@dataclass
class Run:
    backend: str
    requests: int = 0
    hits: int = 0
    cold_misses: int = 0
    """First requests of an object: no cache could have it."""
    store_misses: int = 0
    purged_misses: int = 0
    puts: int = 0
    put_bytes: int = 0
    failed_puts: int = 0
    seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    final_mount_stats: dict[str, int | str] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def warm_hit_rate(self) -> float:
        """Hits among requests for objects seen before (what a cache can influence)."""
        warm = self.requests - self.cold_misses
        return self.hits / warm if warm else 0.0


def request_stream(cfg: Config) -> Iterator[int]:
    """Object ids: new ones (0, 1, 2, ...) or re-gets Zipf-distributed over recency; seeded."""
    rng = random.Random(cfg.seed)
    cum: list[float] = []  # cum[k] = sum of 1/(j+1)^s for j <= k, grown as objects appear
    introduced = 0
    while True:
        if introduced == 0 or rng.random() < cfg.new_fraction:
            cum.append((cum[-1] if cum else 0.0) + 1 / (introduced + 1) ** cfg.zipf)
            introduced += 1
            yield introduced - 1
        else:
            rank = bisect.bisect_right(cum, rng.random() * cum[-1], hi=introduced - 1)
            yield introduced - 1 - rank


def generate(obj: int, size: int) -> bytes:
    """The object's content (deterministic, incompressible): what a miss must recompute."""
    return hashlib.shake_256(obj.to_bytes(8, "little")).digest(size)


def workload(
    store: CacheStore,
    cfg: Config,
    backend: str,
    sample: Callable[[], tuple[int, int, int, int]],
    *,
    requests: int | None = None,
) -> Run:
    """Run requests until *requests*, or until factor x cap has been put.

    *sample* returns (used_bytes, daemon_rss_bytes, purge_events, purged_bytes).
    """
    size = cfg.object_kib * 1024
    target = int(cfg.factor * cfg.cap_mib * MIB)
    index: dict[int, str] = {}  # the application's own table: object -> key
    run = Run(backend)
    start = time.monotonic()

    def take_sample(i: int) -> None:
        used, rss, events, purged = sample()
        c = store.counters
        run.samples.append(
            Sample(
                i,
                time.monotonic() - start,
                run.hits,
                i - run.hits,
                c.puts,
                c.failed_puts,
                used,
                rss,
                events,
                purged,
            )
        )

    take_sample(0)
    for i, obj in enumerate(request_stream(cfg), 1):
        key = index.get(obj)
        data = None if key is None else store.get(key)
        if data is not None:
            run.hits += 1
        else:
            run.cold_misses += key is None
            data = generate(obj, size)
            try:
                index[obj] = store.put(data)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                index[obj] = key_of(data)
        if i % cfg.sample_every == 0:
            take_sample(i)
        done = store.counters.put_bytes >= target if requests is None else i >= requests
        if done:
            run.requests = i
            break
    take_sample(run.requests)
    c = store.counters
    run.store_misses, run.purged_misses = c.misses, c.purged_misses
    run.puts, run.put_bytes, run.failed_puts = c.puts, c.put_bytes, c.failed_puts
    run.seconds = time.monotonic() - start
    run.final_mount_stats = store.stats().mount
    return run


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def vrangefs_mount(path: Path, cap_mib: int, log: Path) -> Iterator[Path]:
    cmd = [*VRANGEFS, "mount", str(path), "--memory-cap", f"{cap_mib}M", "--log-file", str(log)]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield path
    finally:
        done = subprocess.run([*VRANGEFS, "umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0 and os.path.ismount(path):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


@contextlib.contextmanager
def tmpfs_mount(path: Path, cap_mib: int) -> Iterator[Path]:
    opts = f"size={cap_mib}M,mode=0755"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "cachestore-demo", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def run_vrangefs(cfg: Config, base: Path) -> Run:
    mnt = base / "vrangefs"
    mnt.mkdir()
    with vrangefs_mount(mnt, cfg.cap_mib, base / "daemon.log"):
        store = CacheStore(mnt / "cache")
        assert store.volatile
        pid = int(client.stats(mnt)["pid"])

        def sample() -> tuple[int, int, int, int]:
            s = client.stats(mnt)
            return (
                int(s["resident_bytes"]),
                rss_of(pid),
                int(s["purge_events"]),
                int(s["purged_bytes_total"]),
            )

        return workload(store, cfg, "vrangefs", sample)


def run_tmpfs(cfg: Config, base: Path, requests: int) -> Run:
    mnt = base / "tmpfs"
    mnt.mkdir()
    with tmpfs_mount(mnt, cfg.cap_mib):
        store = CacheStore(mnt / "cache")
        assert not store.volatile

        def sample() -> tuple[int, int, int, int]:
            st = os.statvfs(mnt)
            return (st.f_blocks - st.f_bfree) * st.f_frsize, 0, 0, 0

        return workload(store, cfg, "tmpfs", sample, requests=requests)


def summary(cfg: Config, runs: list[Run]) -> str:
    lines = [
        f"cache store demo: {cfg.cap_mib} MiB cap, {cfg.object_kib} KiB objects, "
        f"{cfg.new_fraction:.0%} new objects, re-gets Zipf s={cfg.zipf} over recency, "
        f"seed {cfg.seed}",
    ]
    for r in runs:
        last = r.samples[-1]
        peak_used = max(s.used_bytes for s in r.samples)
        lines += [
            f"\n{r.backend}: {r.requests} requests in {r.seconds:.1f} s",
            f"  hit rate {r.hit_rate:.1%} ({r.hits} hits; {r.warm_hit_rate:.1%} of requests "
            f"for objects seen before; {r.cold_misses} first requests)",
            f"  puts {r.puts} ok ({r.put_bytes / MIB:.0f} MiB = "
            f"{r.put_bytes / (cfg.cap_mib * MIB):.1f} x cap), {r.failed_puts} failed (ENOSPC)",
            f"  misses in the store {r.store_misses} ({r.purged_misses} found purged)",
            f"  data held: peak {peak_used / MIB:.1f} MiB, end {last.used_bytes / MIB:.1f} MiB",
        ]
        if r.backend == "vrangefs":
            rss = [s.daemon_rss_bytes for s in r.samples]
            lines += [
                f"  purges: {last.purge_events} units, {last.purged_bytes / MIB:.0f} MiB",
                f"  daemon RSS: start {rss[0] / MIB:.1f} MiB, peak {max(rss) / MIB:.1f} MiB, "
                f"end {rss[-1] / MIB:.1f} MiB",
            ]
    return "\n".join(lines)


def plot(cfg: Config, runs: list[Run], path: Path) -> None:
    fig, (mem, hit, events) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    colour = {"vrangefs": "tab:blue", "tmpfs": "tab:orange"}
    for r in runs:
        c = colour.get(r.backend)
        x = [s.request for s in r.samples]
        mem.plot(x, [s.used_bytes / MIB for s in r.samples], c=c, label=f"{r.backend}: data held")
        hits = [s.hits / s.request if s.request else 0 for s in r.samples]
        hit.plot(x, hits, c=c, label=f"{r.backend} (final {r.hit_rate:.1%})")
        if r.backend == "vrangefs":
            rss = [s.daemon_rss_bytes / MIB for s in r.samples]
            mem.plot(x, rss, c=c, linestyle=":", label="vrangefs: daemon RSS")
            purges = [s.purge_events for s in r.samples]
            events.plot(x, purges, c=c, label="vrangefs: units purged (1 object each)")
        else:
            fails = [s.failed_puts for s in r.samples]
            events.plot(x, fails, c=c, label=f"{r.backend}: puts failed (ENOSPC)")
    mem.axhline(cfg.cap_mib, color="grey", linestyle="--", label="cap / tmpfs size")
    mem.set_ylabel("MiB")
    mem.set_title(
        f"CacheStore: {cfg.factor:g} x a {cfg.cap_mib} MiB cap of {cfg.object_kib} KiB objects, "
        f"{cfg.new_fraction:.0%} new, Zipf s={cfg.zipf} by recency"
    )
    hit.set_ylabel("cumulative hit rate")
    hit.set_ylim(0, 1)
    events.set_ylabel("count (cumulative)")
    events.set_xlabel("requests")
    for ax in (mem, hit, events):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = Config()
    p.add_argument("--cap-mib", type=int, default=defaults.cap_mib)
    p.add_argument("--object-kib", type=int, default=defaults.object_kib)
    p.add_argument("--factor", type=float, default=defaults.factor)
    p.add_argument("--new-fraction", type=float, default=defaults.new_fraction)
    p.add_argument("--zipf", type=float, default=defaults.zipf)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", type=Path, default=HERE / "results" / "cachestore-demo")
    args = p.parse_args(argv)
    cfg = Config(
        args.cap_mib, args.object_kib, args.factor, args.new_fraction, args.zipf, args.seed
    )
    if os.geteuid() != 0:
        print("needs root (it mounts a tmpfs)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cachestore-demo-") as tmp:
        base = Path(tmp)
        vr = run_vrangefs(cfg, base)
        tm = run_tmpfs(cfg, base, vr.requests)
    runs = [vr, tm]
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
        "runs": [
            {**asdict(r), "hit_rate": r.hit_rate, "warm_hit_rate": r.warm_hit_rate} for r in runs
        ],
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(cfg, runs, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
