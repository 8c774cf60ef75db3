"""ccache, unmodified, with its cache in memory: a vrangefs cache directory against tmpfs and disk.

    .venv/bin/python examples/ccache_demo.py               (as root: it mounts; needs ccache,
    .venv/bin/python -m examples.ccache_demo                gcc and matplotlib; sh tools/setup.sh
                                                            installs them)

A few hundred C modules are generated (seeded: each a few random ``uint32_t`` tables and
loops over them, so each compiled result is tens of KiB in ccache) and a Zipf-distributed
sequence of compilations is drawn from them (the k-th most popular module with weight 1/k^s,
popularity a seeded shuffle).  With ``--edits F``, a share F of the compilations come after
an edit of their module (a new version, as a developer's change makes: ccache sees a new
source, and the old versions' results are never wanted again).  The same sequence runs as
``ccache gcc -O1 -c MODULE.c`` with ``CCACHE_DIR`` on three setups whose size is the same
*cap*:

* **vrangefs**: a mount made with ``--memory-cap CAP --cache-dir``: ccache's files are
  evicted whole, least recently opened first, when a write needs room;
* **tmpfs**: a kernel tmpfs with ``size=CAP``;
* **disk**: an ordinary directory under ``/var/tmp`` with ccache's own limit, ``ccache -M CAP``.

ccache is not configured otherwise (its default 5 GB limit on the two memory setups; its
temporary files go to ``CCACHE_DIR/tmp``, as they do when ``XDG_RUNTIME_DIR`` is unset).
The cap defaults to half of ccache's working set, measured first: the size of a cache
directory on disk (whole 4 KiB blocks) after every module version of the sequence was
compiled once with no limit.  That first pass also gives each module's object file as gcc
makes it; every compilation of the three runs is checked against it byte for byte.

Per setup: compilations that failed (exit status or wrong object file), hits and misses from
ccache's stats log (``CCACHE_STATSLOG``, one record per compilation, kept outside the cache),
ccache's own counters at the end (``ccache --print-stats``, which live *in* the cache), the
error lines of ccache's log (``CCACHE_LOGFILE``, outside too), and the bytes the cache holds
after each compilation (vrangefs: ``resident_bytes``, also sampled every 20 ms in between;
tmpfs: statvfs; disk: allocated blocks).  On vrangefs, ``vrangefs events`` records every
eviction, so the evicted files can be sorted by what they were to ccache.

Exit status 1 if a compilation failed or gave a wrong object on vrangefs, or its resident
data ever exceeded the cap; 2 if it cannot run.  Every mount is made in a temporary directory
and unmounted on the way out, Ctrl-C and SIGTERM included.  Results: the text on stdout,
``examples/results/ccache.json`` and ``examples/results/ccache-hitrate.png``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vrangefs import client
from vrangefs.protocol import parse_size

KIB = 1024
MIB = 1 << 20
PAGE = 4096
HERE = Path(__file__).resolve().parent
_VENV_CLI = Path(sys.executable).with_name("vrangefs")
VRANGEFS = [str(_VENV_CLI)] if _VENV_CLI.exists() else [sys.executable, "-m", "vrangefs"]
SETUPS = ("vrangefs", "tmpfs", "disk")
CFLAGS = ["-O1"]
Unit = tuple[int, int]
"""A module and its version (how many times it was edited)."""
HIT_COUNTERS = ("direct_cache_hit", "preprocessed_cache_hit")
ERROR_WORDS = re.compile(r"error|fail|no space|cannot|could not|unable", re.IGNORECASE)


@dataclass
class Config:
    sources: int = 300
    compilations: int = 800
    seed: int = 1
    zipf: float = 1.0
    edits: float = 0.0
    """Share of compilations preceded by an edit of their module (a new version of it)."""
    cap: int = 0
    """Bytes; 0: half the measured working set."""


@dataclass
class Run:
    setup: str
    cap: int
    compilations: int = 0
    hits: int = 0
    misses: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    """Compilations whose exit status was not 0."""
    wrong_output: list[int] = field(default_factory=list)
    """Compilations that exited 0 with an object file other than gcc's."""
    fallbacks: int = 0
    """Compilations that were neither a hit nor a miss to ccache: it gave up on its cache
    (the stats log says why, e.g. ``preprocessor_error`` after ENOSPC) and ran gcc itself."""
    seconds: float = 0.0
    hits_cum: list[int] = field(default_factory=list)
    bytes_held: list[int] = field(default_factory=list)
    evicted_files_cum: list[int] = field(default_factory=list)
    statslog_counters: dict[str, int] = field(default_factory=dict)
    """Every counter of the stats log, summed over the run (ccache's view, kept outside)."""
    ccache_stats: dict[str, int] = field(default_factory=dict)
    """``ccache --print-stats`` at the end (non-zero counters; kept inside the cache)."""
    log_errors: dict[str, int] = field(default_factory=dict)
    """Error-like lines of ccache's log, digits and paths blurred, with their counts."""
    files_at_end: dict[str, int] = field(default_factory=dict)
    peak_bytes_held: int = 0
    vrangefs: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.compilations if self.compilations else 0.0


# --- the workload ---------------------------------------------------------------------------


def module_source(seed: int, index: int) -> str:
    """A C module: 2-4 tables of random words and 4-10 loops over them; deterministic."""
    rng = random.Random(f"{seed}:{index}")
    name = f"m{index:04d}"
    out = [f"/* generated module {name} */", "#include <stddef.h>", "#include <stdint.h>", ""]
    sizes = [rng.randint(600, 3000) for _ in range(rng.randint(2, 4))]
    for t, n in enumerate(sizes):
        words = ",".join(f"{rng.getrandbits(32)}u" for _ in range(n))
        out.append(f"const uint32_t {name}_t{t}[{n}] = {{{words}}};")
    ops = ["+", "-", "^", "|", "&", "*"]
    for f in range(rng.randint(4, 10)):
        out += [
            f"uint32_t {name}_f{f}(uint32_t x, uint32_t y) {{",
            "    uint32_t a = x, b = y, c = 0;",
            f"    for (size_t i = 0; i < {rng.randint(3, 40)}u; i++) {{",
        ]
        for _ in range(rng.randint(3, 8)):
            t = rng.randrange(len(sizes))
            v, w = rng.choice("abc"), rng.choice("abc")
            out.append(
                f"        {v} = ({v} {rng.choice(ops)} {name}_t{t}[({w} + i * "
                f"{rng.randint(1, 999)}u) % {sizes[t]}u]) {rng.choice(ops)} "
                f"({w} >> {rng.randint(1, 31)});"
            )
        out.append("        switch ((a ^ b) & 7) {")
        for k in range(rng.randint(2, 8)):
            out.append(f"        case {k}: c += {rng.getrandbits(16)}u * a; break;")
        out += ["        default: c ^= b;", "        }", "    }", "    return a ^ b ^ c;", "}"]
    return "\n".join(out) + "\n"


def version_source(seed: int, unit: Unit) -> str:
    """The module as it is after *version* edits: one more line per edit."""
    module, version = unit
    text = module_source(seed, module)
    if version:
        text += f"uint32_t m{module:04d}_version(void) {{ return {version}u; }}\n"
    return text


def compilation_sequence(cfg: Config) -> list[Unit]:
    """(module, version) pairs: modules Zipf-distributed over a seeded popularity order; with
    probability *edits* a compilation is of a new version of its module (an edit before it)."""
    rng = random.Random(cfg.seed)
    by_popularity = list(range(cfg.sources))
    rng.shuffle(by_popularity)
    weights = [1 / (rank + 1) ** cfg.zipf for rank in range(cfg.sources)]
    modules = rng.choices(by_popularity, weights, k=cfg.compilations)
    edit_rng = random.Random(f"{cfg.seed}:edits")
    versions: collections.Counter[int] = collections.Counter()
    sequence = []
    for m in modules:
        if edit_rng.random() < cfg.edits:
            versions[m] += 1
        sequence.append((m, versions[m]))
    return sequence


class SourceTree:
    """The modules on disk, each at the version the next compilation wants."""

    OLD = 1_500_000_000  # mtime of every source (2017): never "too new" for ccache

    def __init__(self, path: Path, seed: int, modules: int) -> None:
        self.path, self.seed = path, seed
        self.versions: dict[int, int] = {}
        path.mkdir()
        for m in range(modules):
            self.put((m, 0))

    def put(self, unit: Unit) -> str:
        """Make the module's file hold *unit*'s version; its name."""
        name = f"m{unit[0]:04d}.c"
        if self.versions.get(unit[0]) != unit[1]:
            (self.path / name).write_text(version_source(self.seed, unit))
            os.utime(self.path / name, (self.OLD, self.OLD))
            self.versions[unit[0]] = unit[1]
        return name


def no_limit_hits(sequence: list[Unit]) -> list[int]:
    """Cumulative hits of a cache that never loses anything: every repeat is a hit."""
    seen: set[Unit] = set()
    hits, out = 0, []
    for m in sequence:
        hits += m in seen
        seen.add(m)
        out.append(hits)
    return out


# --- ccache ---------------------------------------------------------------------------------


class Ccache:
    """Runs ``ccache gcc`` with one cache directory, its stats log and log kept in *work*."""

    def __init__(self, cache_dir: Path, work: Path, sources: SourceTree, name: str) -> None:
        self.cache_dir, self.sources = cache_dir, sources
        self.statslog, self.logfile = work / f"{name}.statslog", work / f"{name}.log"
        self.obj = work / f"{name}.o"
        self._statslog_offset = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CCACHE_")}
        self.env.pop("XDG_RUNTIME_DIR", None)  # temporary files in CCACHE_DIR/tmp
        self.env.update(
            CCACHE_DIR=str(cache_dir),
            CCACHE_STATSLOG=str(self.statslog),
            CCACHE_LOGFILE=str(self.logfile),
        )

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ccache", *args], env=self.env, capture_output=True, text=True, check=False
        )

    def compile(self, unit: Unit) -> tuple[subprocess.CompletedProcess[str], str | None, list[str]]:
        """Compile one module: (the process, the object's sha256 or None, its stats-log lines)."""
        self.obj.unlink(missing_ok=True)
        source = self.sources.put(unit)
        done = subprocess.run(
            ["ccache", "gcc", *CFLAGS, "-c", source, "-o", str(self.obj)],
            cwd=self.sources.path,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        digest = None
        if done.returncode == 0 and self.obj.exists():
            digest = hashlib.sha256(self.obj.read_bytes()).hexdigest()
        return done, digest, self.new_statslog_lines()

    def new_statslog_lines(self) -> list[str]:
        try:
            with open(self.statslog, "rb") as f:
                f.seek(self._statslog_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._statslog_offset += len(data)
        return [ln for ln in data.decode().splitlines() if ln and not ln.startswith("#")]

    def print_stats(self) -> dict[str, int]:
        done = self.command("--print-stats")
        stats = {}
        for line in done.stdout.splitlines():
            key, _, value = line.partition("\t")
            if value.strip().isdigit() and int(value) and not key.endswith("_timestamp"):
                stats[key] = int(value)
        return stats

    def log_errors(self) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return {}
        for line in text.splitlines():
            message = line.split("] ", 1)[-1]  # drop "[time pid] "
            if ERROR_WORDS.search(message):
                message = re.sub(r"/\S+", "PATH", message)
                counts[re.sub(r"\d+", "N", message)] += 1
        return dict(counts.most_common(20))


def file_kind(path: str) -> str:
    """What a file in a ccache directory is to ccache (4.x layout)."""
    name = path.rsplit("/", 1)[-1]
    if "/tmp/" in path:
        return "temporary (tmp/)"
    if name in ("stats", "CACHEDIR.TAG", "ccache.conf"):
        return name
    if name.endswith(".lock") or ".lock." in name or name.endswith(".alive"):
        return "lock"
    if name.endswith("R"):
        return "result (R)"
    if name.endswith("M"):
        return "manifest (M)"
    return "other"


def census(cache_dir: Path) -> dict[str, int]:
    """Files in a ccache directory by kind, and their allocated bytes."""
    counts: collections.Counter[str] = collections.Counter()
    for root, _, files in os.walk(cache_dir):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            counts[f"{file_kind('/' + os.path.relpath(path, cache_dir))} files"] += 1
            counts["total bytes"] += st.st_blocks * 512
    return dict(sorted(counts.items()))


def allocated_bytes(cache_dir: Path) -> int:
    return census(cache_dir).get("total bytes", 0)


def tmpfs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# --- mounts ---------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(path: Path, mount: list[str], umount: list[str]) -> Iterator[Path]:
    """Mount with *mount*; on the way out *umount*, or detach it lazily if that fails."""
    subprocess.run(mount, check=True, capture_output=True)
    try:
        yield path
    finally:
        done = subprocess.run(umount, capture_output=True, check=False)
        if done.returncode != 0 and os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def vrangefs_mount(path: Path, cap: int, log: Path) -> contextlib.AbstractContextManager[Path]:
    cmd = ["mount", str(path), "--memory-cap", str(cap), "--cache-dir", "--log-file", str(log)]
    return mounted(path, [*VRANGEFS, *cmd], [*VRANGEFS, "umount", str(path)])


def tmpfs_mount(path: Path, cap: int) -> contextlib.AbstractContextManager[Path]:
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={cap},mode=0755", "ccache-demo", str(path)]
    return mounted(path, cmd, ["umount", str(path)])


class ResidentSampler:
    """Reads resident_bytes every *interval* seconds in a thread; keeps the peak."""

    def __init__(self, mountpoint: Path, interval: float = 0.02) -> None:
        self.mountpoint, self.interval = mountpoint, interval
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.take()

    def take(self) -> dict[str, int | str]:
        s = client.stats(self.mountpoint)
        self.peak = max(self.peak, int(s["resident_bytes"]))
        self.samples += 1
        return s

    def __enter__(self) -> ResidentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def eviction_events(mountpoint: Path, out: Path) -> Iterator[Path]:
    """``vrangefs events MOUNTPOINT`` into *out* while the block runs."""
    with open(out, "wb") as f:
        proc = subprocess.Popen([*VRANGEFS, "events", str(mountpoint)], stdout=f)
    try:
        deadline = time.monotonic() + 10
        while b"subscribed" not in out.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vrangefs events did not subscribe (status {proc.poll()})")
            time.sleep(0.01)
        yield out
        time.sleep(0.2)  # let the last lines arrive
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def evictions_by_kind(events: Path, mountpoint: Path) -> dict[str, dict[str, int]]:
    kinds: dict[str, dict[str, int]] = {}
    for line in events.read_text().splitlines():
        ev = json.loads(line)
        if ev["event"] == "dropped":
            kinds.setdefault("(dropped events)", {"files": 0, "bytes": 0})["files"] += ev["count"]
        if ev["event"] not in ("evict", "purge"):
            continue
        path = ev["path"] or ""
        kind = file_kind(path[len(str(mountpoint)) :])
        k = kinds.setdefault(kind, {"files": 0, "bytes": 0})
        k["files"] += 1
        k["bytes"] += ev["bytes"]
    return dict(sorted(kinds.items()))


# --- the runs -------------------------------------------------------------------------------


def calibrate(
    sequence: list[Unit], base: Path, sources: SourceTree
) -> tuple[dict[Unit, str], dict[str, int]]:
    """Compile each module version of the sequence once into an unlimited cache on disk.

    Returns gcc's object file digest per module and the cache's census (its working set).
    """
    cache_dir = base / "calibration"
    cc = Ccache(cache_dir, base, sources, "calibration")
    cc.env["CCACHE_MAXSIZE"] = "0"  # no limit
    reference = {}
    for unit in dict.fromkeys(sequence):
        done, digest, _ = cc.compile(unit)
        if done.returncode != 0 or digest is None:
            raise RuntimeError(f"module {unit} does not compile: {done.stderr[-2000:]}")
        reference[unit] = digest
    return reference, census(cache_dir)


def run_setup(
    setup: str,
    cache_dir: Path,
    base: Path,
    sources: SourceTree,
    sequence: list[Unit],
    reference: dict[Unit, str],
    cap: int,
    held: Callable[[], int] | ResidentSampler,
) -> Run:
    """The compilation sequence with CCACHE_DIR=*cache_dir*; *held* gives the bytes held."""
    cc = Ccache(cache_dir, base, sources, setup)
    if setup == "disk":
        cc.command("-M", f"{cap // KIB}Ki").check_returncode()
    run = Run(setup, cap)
    counters: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    for i, unit in enumerate(sequence, 1):
        done, digest, lines = cc.compile(unit)
        counters.update(lines)
        if done.returncode != 0:
            run.failed.append(
                {
                    "compilation": i,
                    "module": unit,
                    "status": done.returncode,
                    "stderr": done.stderr[-500:],
                }
            )
        elif digest != reference[unit]:
            run.wrong_output.append(i)
        if any(c in lines for c in HIT_COUNTERS):
            run.hits += 1
        elif "cache_miss" in lines:
            run.misses += 1
        else:
            run.fallbacks += 1
        run.compilations = i
        run.hits_cum.append(run.hits)
        if isinstance(held, ResidentSampler):
            s = held.take()
            run.bytes_held.append(int(s["resident_bytes"]))
            run.evicted_files_cum.append(int(s["evicted_files"]))
        else:
            run.bytes_held.append(held())
        if i % 100 == 0:
            print(
                f"  {setup}: {i}/{len(sequence)} compilations, hit rate {run.hit_rate:.1%}",
                flush=True,
            )
    run.seconds = time.monotonic() - start
    run.peak_bytes_held = max(run.bytes_held)
    run.statslog_counters = dict(sorted(counters.items()))
    run.ccache_stats = cc.print_stats()
    run.log_errors = cc.log_errors()
    run.files_at_end = census(cache_dir)
    return run


def run_vrangefs(
    base: Path, sources: SourceTree, sequence: list[Unit], reference: dict[Unit, str], cap: int
) -> Run:
    mnt = base / "vrangefs"
    mnt.mkdir()
    with vrangefs_mount(mnt, cap, base / "daemon.log"):
        with eviction_events(mnt, base / "events.jsonl") as events:
            with ResidentSampler(mnt) as sampler:
                run = run_setup("vrangefs", mnt, base, sources, sequence, reference, cap, sampler)
            # census and --print-stats above opened files; take the stats after them
            stats = client.stats(mnt)
        run.vrangefs = {
            "peak_resident_bytes": max(sampler.peak, run.peak_bytes_held),
            "resident_samples": sampler.samples + run.compilations,
            "stats_at_end": {
                k: stats[k]
                for k in sorted(stats)
                if k.startswith(
                    (
                        "evicted_",
                        "cache_dir_",
                        "resident",
                        "memory_cap",
                        "daemon_rss",
                        "purge_events",
                        "events_dropped",
                    )
                )
            },
            "evictions_by_kind": evictions_by_kind(events, mnt),
        }
    return run


def run_on(
    setup: str,
    base: Path,
    sources: SourceTree,
    sequence: list[Unit],
    reference: dict[Unit, str],
    cap: int,
) -> Run:
    """The sequence on one setup, its cache directory made (and mounted) in *base*."""
    if setup == "vrangefs":
        return run_vrangefs(base, sources, sequence, reference, cap)
    cache_dir = base / setup
    if setup == "disk":
        held = functools.partial(allocated_bytes, cache_dir)
        return run_setup(setup, cache_dir, base, sources, sequence, reference, cap, held)
    cache_dir.mkdir()
    with tmpfs_mount(cache_dir, cap):
        held = functools.partial(tmpfs_used, cache_dir)
        return run_setup(setup, cache_dir, base, sources, sequence, reference, cap, held)


# --- report ---------------------------------------------------------------------------------


def summary(
    cfg: Config, cap: int, working_set: dict[str, int], distinct: int, runs: list[Run]
) -> str:
    unlimited = no_limit_hits(compilation_sequence(cfg))[-1] / cfg.compilations
    lines = [
        f"ccache demo: {cfg.compilations} compilations of {distinct} distinct module versions "
        f"({cfg.sources} modules, Zipf s={cfg.zipf}, {cfg.edits:.0%} after an edit), "
        f"seed {cfg.seed}, gcc {' '.join(CFLAGS)}",
        f"working set {working_set['total bytes'] / MIB:.1f} MiB "
        f"({working_set.get('result (R) files', 0)} results, "
        f"{working_set.get('manifest (M) files', 0)} manifests); "
        f"cap {cap / MIB:.2f} MiB ({cap / working_set['total bytes']:.0%} of it); "
        f"a cache with no limit would hit {unlimited:.1%}",
    ]
    for r in runs:
        lines += [
            f"\n{r.setup}: {r.compilations} compilations in {r.seconds:.0f} s",
            f"  hit rate {r.hit_rate:.1%} ({r.hits} hits, {r.misses} misses"
            + (f", {r.fallbacks} fell back to plain gcc" if r.fallbacks else "")
            + ")",
            f"  failed compilations {len(r.failed)}, wrong object files {len(r.wrong_output)}",
            f"  bytes held: peak {r.peak_bytes_held / MIB:.2f} MiB, "
            f"end {r.bytes_held[-1] / MIB:.2f} MiB (cap {r.cap / MIB:.2f} MiB)",
            f"  ccache --print-stats hits {sum(r.ccache_stats.get(c, 0) for c in HIT_COUNTERS)}, "
            f"misses {r.ccache_stats.get('cache_miss', 0)}, "
            f"cleanups {r.ccache_stats.get('cleanups_performed', 0)}",
        ]
        odd = {
            k: v
            for k, v in r.statslog_counters.items()
            if k not in HIT_COUNTERS
            and not k.startswith(
                ("cache_miss", "direct_cache_miss", "preprocessed_cache_miss", "local_storage")
            )
        }
        if odd:
            lines.append(f"  other stats-log counters: {odd}")
        for message, count in list(r.log_errors.items())[:5]:
            lines.append(f"  log x{count}: {message[:150]}")
        if r.vrangefs:
            v = r.vrangefs
            s = v["stats_at_end"]
            lines += [
                f"  resident: peak {v['peak_resident_bytes'] / MIB:.2f} MiB over "
                f"{v['resident_samples']} samples",
                f"  evicted {s['evicted_files']} files, {int(s['evicted_bytes']) / MIB:.1f} MiB "
                f"(cap {s.get('evicted_files_cap', 0)}, pressure "
                f"{s.get('evicted_files_pressure', 0)})",
                "  evicted by kind: "
                + ", ".join(
                    f"{k} {n['files']} ({n['bytes'] / MIB:.1f} MiB)"
                    for k, n in v["evictions_by_kind"].items()
                ),
            ]
        lines.append(f"  files at the end: {r.files_at_end}")
    return "\n".join(lines)


def plot(cfg: Config, cap: int, runs: list[Run], path: Path) -> None:
    fig, (hit, mem) = plt.subplots(
        2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    colour = {"vrangefs": "tab:blue", "tmpfs": "tab:orange", "disk": "tab:green"}
    label = {
        "vrangefs": "vrangefs --cache-dir",
        "tmpfs": "tmpfs size=cap",
        "disk": "disk, ccache -M cap",
    }
    x = list(range(1, cfg.compilations + 1))
    ideal = no_limit_hits(compilation_sequence(cfg))
    hit.plot(
        x,
        [h / i for i, h in zip(x, ideal, strict=True)],
        c="grey",
        linestyle="--",
        label=f"no limit ({ideal[-1] / cfg.compilations:.1%})",
    )
    for r in runs:
        c = colour[r.setup]
        n = range(1, r.compilations + 1)
        hit.plot(
            n,
            [h / i for i, h in zip(n, r.hits_cum, strict=True)],
            c=c,
            label=f"{label[r.setup]} ({r.hit_rate:.1%}; {len(r.failed)} failed"
            + (f", {r.fallbacks} ccache fallbacks to plain gcc" if r.fallbacks else "")
            + ")",
        )
        mem.plot(n, [b / MIB for b in r.bytes_held], c=c, label=label[r.setup])
    mem.axhline(cap / MIB, color="grey", linestyle="--", label="cap")
    hit.set_ylabel("cumulative hit rate")
    hit.set_ylim(0, 1)
    hit.set_title(
        f"ccache: {cfg.compilations} compilations of {cfg.sources} modules (Zipf s={cfg.zipf}"
        + (f", {cfg.edits:.0%} after an edit" if cfg.edits else "")
        + f"), cap {cap / MIB:.2f} MiB"
    )
    mem.set_ylabel("MiB held by the cache")
    mem.set_xlabel("compilations")
    for ax in (hit, mem):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Config()
    p.add_argument(
        "--cap",
        default="auto",
        help="size of each setup: bytes with K/M/G, or auto: half the working set",
    )
    p.add_argument("--sources", type=int, default=d.sources, help="modules generated")
    p.add_argument("--compilations", type=int, default=d.compilations)
    p.add_argument("--zipf", type=float, default=d.zipf, help="skew of module popularity")
    p.add_argument(
        "--edits",
        type=float,
        default=d.edits,
        help="share of compilations preceded by an edit of their module",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS)
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "ccache",
        help="writes OUT.json and OUT-hitrate.png",
    )
    args = p.parse_args(argv)
    setups = args.setups.split(",")
    if not setups or set(setups) - set(SETUPS):
        p.error(f"--setups: choose from {','.join(SETUPS)}")
    cap = 0 if args.cap == "auto" else parse_size(args.cap)
    cfg = Config(args.sources, args.compilations, args.seed, args.zipf, args.edits, cap)
    if os.geteuid() != 0:
        print("needs root (it mounts)", file=sys.stderr)
        return 2
    for tool in ("ccache", "gcc"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (apt-get install {tool})", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    sequence = compilation_sequence(cfg)
    runs: list[Run] = []
    # On disk (/var/tmp, not a tmpfs /tmp): the "disk" setup and the calibration live here.
    with tempfile.TemporaryDirectory(prefix="ccache-demo-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        sources = SourceTree(base / "src", cfg.seed, cfg.sources)
        distinct = len(set(sequence))
        print(
            f"compiling the {distinct} distinct module versions once to measure the working set",
            flush=True,
        )
        reference, working_set = calibrate(sequence, base, sources)
        if not cap:
            cap = working_set["total bytes"] // 2 // PAGE * PAGE
        print(
            f"working set {working_set['total bytes'] / MIB:.2f} MiB, cap {cap / MIB:.2f} MiB",
            flush=True,
        )
        for setup in setups:
            print(f"{setup}:", flush=True)
            runs.append(run_on(setup, base, sources, sequence, reference, cap))
        daemon_log = (base / "daemon.log").read_text() if "vrangefs" in setups else ""
    text = summary(cfg, cap, working_set, distinct, runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            **asdict(cfg),
            "cap": cap,
            "cflags": CFLAGS,
            "ccache": subprocess.run(
                ["ccache", "--version"], capture_output=True, check=False, text=True
            ).stdout.splitlines()[0],
        },
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "load_average_at_end": os.getloadavg(),
        },
        "distinct_modules": distinct,
        "working_set": working_set,
        "no_limit_hit_rate": no_limit_hits(sequence)[-1] / cfg.compilations,
        "summary": text,
        "runs": [{**asdict(r), "hit_rate": r.hit_rate} for r in runs],
    }
    json_path = args.out.with_suffix(".json")
    png_path = args.out.with_name(args.out.name + "-hitrate.png")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(cfg, cap, runs, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    bad = [
        r
        for r in runs
        if r.setup == "vrangefs"
        and (r.failed or r.wrong_output or r.vrangefs["peak_resident_bytes"] > cap)
    ]
    if bad:
        print(
            "FAILED on vrangefs: failed compilations, wrong objects or resident data above "
            "the cap; the daemon's log ends:\n" + "\n".join(daemon_log.splitlines()[-30:]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted (the mounts were unmounted)", file=sys.stderr)
        sys.exit(130)
