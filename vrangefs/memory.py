"""How much memory the machine (or the daemon's memory cgroup) has left.

:class:`MemoryProbe` reads ``MemAvailable`` from /proc/meminfo and, when the
daemon runs in a memory cgroup with a limit, the headroom below that limit
(v2: ``memory.max - memory.current``; v1: ``memory.limit_in_bytes -
memory.usage_in_bytes``).  The smaller of the two is what is available: a
daemon confined to 512 MiB on a 24 GiB machine is short of memory long before
the machine is.  Reading is cheap (two or three small files), so the pressure
watcher can poll it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 62  # v1 reports "no limit" as a huge number near 2**63


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 else 1)
    return out


@dataclass(frozen=True)
class CgroupFiles:
    """The files that give a memory cgroup's limit and usage."""

    limit: Path
    usage: Path
    pressure: Path | None  # v2 memory.pressure (PSI), if present


def find_cgroup(pid: int | str = "self") -> CgroupFiles | None:
    """The memory cgroup of *pid*, if it has a limit; None otherwise."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):  # cgroup v1
            base = CGROUP_ROOT / "memory" / rel
            files = CgroupFiles(
                base / "memory.limit_in_bytes", base / "memory.usage_in_bytes", None
            )
        elif controllers == "":  # cgroup v2 unified hierarchy
            base = CGROUP_ROOT / rel
            if not (base / "memory.max").exists():
                base = CGROUP_ROOT / "unified" / rel
            files = CgroupFiles(
                base / "memory.max", base / "memory.current", base / "memory.pressure"
            )
        else:
            continue
        if _read_int(files.limit) is not None and _read_int(files.usage) is not None:
            return files
    return None


class MemoryProbe:
    """Reads available memory: the least of MemAvailable and the cgroup's headroom."""

    def __init__(self, cgroup: CgroupFiles | None = None, use_cgroup: bool = True) -> None:
        self.cgroup = cgroup if cgroup is not None or not use_cgroup else find_cgroup()

    def total(self) -> int:
        """Memory the daemon may use at most: RAM, or the cgroup limit if lower."""
        ram = meminfo()["MemTotal"]
        if self.cgroup is not None:
            limit = _read_int(self.cgroup.limit)
            if limit is not None:
                return min(ram, limit)
        return ram

    def available(self) -> int:
        avail = meminfo().get("MemAvailable", 0)
        if self.cgroup is not None:
            limit = _read_int(self.cgroup.limit)
            usage = _read_int(self.cgroup.usage)
            if limit is not None and usage is not None:
                avail = min(avail, max(limit - usage, 0))
        return avail

    def describe(self) -> str:
        if self.cgroup is None:
            return "MemAvailable"
        return f"MemAvailable and cgroup {os.path.dirname(self.cgroup.limit)}"
