"""Mount settings: the daemon's configuration and the parsing of every mount option.

Dependency-free (the standard library and :mod:`vrangefs.protocol`), so the command line,
the composition root and the pressure watcher share it without pulling in FUSE, and every
rule about option values can be tested in-process.

Settings come as text, from long options (``--memory-cap 512M``) or from ``-o`` (``-o
size=512M``, as tmpfs spells it); an ``-o`` setting wins whatever the order.
:func:`sort_options` sorts ``-o`` options, :func:`build_config` checks every value and
builds the :class:`MountConfig`.  A bad value raises :class:`UserError` with one line that
names the option as the user wrote it, the value and what is expected.
"""

from __future__ import annotations

import math
import mmap
import re
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vrangefs.protocol import PAGE_SIZE, parse_size


class UserError(Exception):
    """An error the user can fix; the command line prints it as one line, without a traceback."""


@dataclass(frozen=True)
class PressureConfig:
    """How the pressure watcher purges when the machine runs short of memory."""

    min_free: int  # bytes of available memory below which units are purged
    interval: float = 0.5  # seconds between readings


@dataclass
class MountConfig:
    """Everything the daemon needs; built and validated by :func:`build_config`."""

    mountpoint: str
    memory_cap: int
    fuse_options: list[str] = field(default_factory=list)
    purged_reads_zeros: bool = False
    root_mode: int = 0o1777
    root_uid: int | None = None
    root_gid: int | None = None
    high_watermark: float = 1.0
    low_watermark: float = 0.95
    pressure: PressureConfig | None = None
    pin_limit: int | None = None  # bytes one user may keep pinned; None: half the cap
    cache_dir: bool = False  # the whole mount is a cache directory
    metadata_cap: int | None = None  # bytes of daemon metadata; None: the default


@dataclass(frozen=True)
class Machine:
    """What the machine offers, for percentages and for sanity checks of the cap."""

    ram: int
    """MemTotal: the base of ``--memory-cap`` percentages."""
    memory: int
    """RAM, or the daemon's memory-cgroup limit if lower: the base of ``--min-free``."""


# -- the settings -------------------------------------------------------------------------
DEFAULTS: dict[str, str] = {
    "memory_cap": "50%",
    "purged_reads": "eio",
    "high_watermark": "100%",
    "low_watermark": "95%",
    "pressure_purge": "on",
    "min_free": "5%",
    "pressure_interval": "0.5",
    "pin_limit": "50%",
    "metadata_cap": "auto",
}
"""Every setting with its default, as text; the long option is ``--`` + the name with dashes."""

OPTION_ALIASES: dict[str, str] = {
    "size": "memory_cap",
    "memory_cap": "memory_cap",
    "purged_reads": "purged_reads",
    "high_watermark": "high_watermark",
    "low_watermark": "low_watermark",
    "pressure_purge": "pressure_purge",
    "min_free": "min_free",
    "pin_limit": "pin_limit",
    "metadata_cap": "metadata_cap",
}
"""``-o NAME=VALUE`` options that set a setting (tmpfs's names where it has one)."""

IGNORED_OPTIONS = frozenset(
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
"""mount(8) and fstab options that mean nothing to the daemon (and ``x-*``, ``comment*``)."""

ROOT_OPTIONS = ("mode", "uid", "gid")
"""``-o`` options for the root directory, as tmpfs has them."""

MAX_ID = 2**32 - 2
"""The largest uid or gid: 2**32 - 1 is (uid_t) -1, "no id", to the kernel."""

MIN_METADATA_CAP = 1 << 20  # the root and a few files need some

MIN_INTERVAL = 0.01
MAX_INTERVAL = 3600.0

_OCTAL = re.compile(r"[0-7]+")
_DECIMAL = re.compile(r"[0-9]+")


def option_name(name: str) -> str:
    """The long option of a setting: ``memory_cap`` -> ``--memory-cap``."""
    return "--" + name.replace("_", "-")


@dataclass
class Setting:
    """A setting's text and how the user spelled it (for error messages)."""

    text: str
    spelled: str

    def invalid(self, expected: str) -> UserError:
        return UserError(f"invalid {self.shown()}: {expected}")

    def shown(self) -> str:
        """``--memory-cap '1'`` or ``-o size='1'``."""
        space = "" if self.spelled.endswith("=") else " "
        return f"{self.spelled}{space}{self.text!r}"


def _size_problem(setting: Setting, error: ValueError) -> UserError:
    """parse_size's message without its own ``invalid size 'X': `` prefix."""
    message = str(error)
    prefix = f"invalid size {setting.text!r}: "
    return setting.invalid(message[len(prefix) :] if message.startswith(prefix) else message)


@dataclass
class SortedOptions:
    """``-o`` options sorted by what they are for."""

    settings: dict[str, Setting] = field(default_factory=dict)
    """vrangefs settings given with ``-o``, by setting name."""
    root: dict[str, int] = field(default_factory=dict)
    """``mode``, ``uid`` and ``gid`` of the root directory."""
    fuse: list[str] = field(default_factory=list)
    """Everything else: FUSE's options (``allow_other``, ...)."""
    debug: bool = False
    cache_dir: bool = False
    """``-o cache_dir``: the whole mount is a cache directory."""


def split_options(values: Sequence[str]) -> list[str]:
    """``-o`` values (each comma-separated) as one list of options; empty ones dropped."""
    out: list[str] = []
    for value in values:
        out.extend(o for o in value.split(",") if o)
    return out


def sort_options(values: Sequence[str]) -> SortedOptions:
    """Sort ``-o`` values: settings, root ownership, FUSE options; mount(8)'s are dropped.

    Raises :class:`UserError` for a bad ``mode``, ``uid`` or ``gid``.
    """
    out = SortedOptions()
    for opt in split_options(values):
        key, sep, value = opt.partition("=")
        if key in OPTION_ALIASES and sep:
            out.settings[OPTION_ALIASES[key]] = Setting(value, f"-o {key}=")
        elif key == "debug" and not sep:
            out.debug = True
        elif key == "cache_dir" and not sep:
            out.cache_dir = True
        elif key in ROOT_OPTIONS and sep:
            out.root[key] = parse_root_option(key, value)
        elif key in IGNORED_OPTIONS or key.startswith(("x-", "comment")):
            continue
        else:
            out.fuse.append(opt)
    return out


def parse_root_option(key: str, value: str) -> int:
    """``mode`` (octal, at most 7777) or ``uid``/``gid`` (decimal, 0 to 2**32 - 2)."""
    if key == "mode":
        if not _OCTAL.fullmatch(value) or int(value, 8) > 0o7777:
            raise UserError(
                f"invalid -o mode={value!r}: expected an octal mode from 0 to 7777, e.g. 1777"
            )
        return int(value, 8)
    if not _DECIMAL.fullmatch(value) or len(value) > 10 or int(value) > MAX_ID:
        raise UserError(f"invalid -o {key}={value!r}: expected a number from 0 to {MAX_ID}")
    return int(value)


# -- checking values ------------------------------------------------------------------------
def parse_memory_cap(setting: Setting, machine: Machine) -> int:
    """The cap in bytes: at least one page, and small enough to map as the daemon's arena."""
    try:
        cap = parse_size(setting.text, machine.ram)
    except ValueError as e:
        raise _size_problem(setting, e) from None
    if cap < PAGE_SIZE:
        raise setting.invalid(
            f"{cap} bytes is less than one page; expected at least {PAGE_SIZE} bytes"
        )
    problem = arena_problem(cap)
    if problem is not None:
        raise setting.invalid(problem)
    return cap


def arena_problem(size: int) -> str | None:
    """Why an arena of *size* bytes cannot be mapped here, or None if it can.

    The daemon maps its whole cap at once (anonymous, private, ``MAP_NORESERVE``), so this
    tries exactly that mapping and unmaps it again: it costs no memory, only address space
    for a moment.  What limits it: ``ulimit -v``, strict overcommit (``vm.overcommit_memory
    = 2``: the commit limit), or else the address space a process has (about 128 TiB on
    x86-64, less what is already mapped).
    """
    if _can_map(size):
        return None
    largest = _largest_mappable()
    return (
        f"the daemon maps its whole cap as one arena, and a mapping of "
        f"{_binary(size)} is impossible here ({_map_limit()}); "
        f"expected at most about {_binary(largest)} ({largest} bytes)"
    )


def _can_map(size: int) -> bool:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    try:
        arena = mmap.mmap(-1, size, flags=flags)
    except (OSError, OverflowError, ValueError):
        return False
    arena.close()
    return True


def _largest_mappable() -> int:
    """The largest arena that maps now, to within a MiB (a binary search of trial mappings)."""
    low, high = 0, 1 << 62  # low maps (or is 0), high does not
    while high - low > 1 << 20:
        middle = (low + high) // 2 // PAGE_SIZE * PAGE_SIZE
        if _can_map(middle):
            low = middle
        else:
            high = middle
    return low


def _map_limit() -> str:
    """What limits the size of a mapping here, in words."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        return f"ulimit -v (RLIMIT_AS) is {_binary(soft)}"
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            mode = f.read().strip()
    except OSError:
        mode = "?"
    if mode == "2":
        return "vm.overcommit_memory is 2: mappings count against the commit limit"
    return f"limited by the address space of a process; vm.overcommit_memory is {mode}"


def _binary(n: int) -> str:
    """A size in binary units with one decimal: ``85.7 TiB``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cap_warnings(cap: int, machine: Machine) -> list[str]:
    """Warnings about a valid cap: one above RAM (or the cgroup limit) cannot protect it."""
    if cap <= machine.memory:
        return []
    what = "RAM" if machine.memory >= machine.ram else "memory-cgroup limit"
    return [
        f"warning: the memory cap {_binary(cap)} is above this machine's {what} "
        f"({_binary(machine.memory)}): filling it can run the machine out of memory"
    ]


def parse_fraction(setting: Setting) -> float:
    """A percentage such as ``95%`` (or a fraction such as ``0.95``) as a fraction in (0, 1]."""
    text = setting.text
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise setting.invalid("expected a percentage above 0% and up to 100%, e.g. 95%")
    return value


def parse_choice(setting: Setting, choices: Sequence[str]) -> str:
    if setting.text not in choices:
        raise setting.invalid("expected " + " or ".join(repr(c) for c in choices))
    return setting.text


def parse_min_free(setting: Setting, machine: Machine) -> int:
    try:
        return parse_size(setting.text, machine.memory)
    except ValueError as e:
        raise _size_problem(setting, e) from None


def parse_pin_limit(setting: Setting, cap: int) -> int:
    """The bytes one user may keep pinned: a size, or a percentage of the memory cap."""
    try:
        return parse_size(setting.text, cap)
    except ValueError:
        raise setting.invalid(
            "expected a positive number of bytes with an optional K/M/G/T suffix (powers of "
            "1024), e.g. 256M, or a percentage of the memory cap above 0 and at most 100, "
            "e.g. 50%"
        ) from None


def parse_metadata_cap(setting: Setting, cap: int) -> int | None:
    """The metadata budget: ``auto`` (None: the larger of 64 MiB and 10% of the cap),
    a size, or a percentage of the memory cap."""
    if setting.text == "auto":
        return None
    try:
        value = parse_size(setting.text, cap)
    except ValueError:
        value = 0
    if value < MIN_METADATA_CAP:
        raise setting.invalid(
            "expected auto, a number of bytes of at least 1M with an optional K/M/G/T suffix "
            "(powers of 1024), e.g. 128M, or a percentage of the memory cap, e.g. 20%"
        ) from None
    return value


def parse_interval(setting: Setting) -> float:
    """Seconds between memory readings: a finite number from MIN_INTERVAL to MAX_INTERVAL."""
    try:
        value = float(setting.text)
    except ValueError:
        value = math.nan
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:  # also refuses nan and inf
        raise setting.invalid(
            f"expected a number of seconds from {MIN_INTERVAL} to {MAX_INTERVAL:.0f}, e.g. 0.5"
        )
    return value


def settings_of(given: Mapping[str, str], sorted_options: SortedOptions) -> dict[str, Setting]:
    """Every setting: from ``-o`` if given there, else from the long option or its default."""
    out = {
        name: Setting(given.get(name, default), option_name(name))
        for name, default in DEFAULTS.items()
    }
    out.update(sorted_options.settings)
    return out


def build_config(
    mountpoint: str,
    settings: Mapping[str, Setting],
    sorted_options: SortedOptions,
    machine: Machine,
) -> tuple[MountConfig, list[str]]:
    """Check every setting and build the daemon's configuration; also return warnings.

    Raises :class:`UserError` naming the first bad setting.
    """
    cap = parse_memory_cap(settings["memory_cap"], machine)
    purged_reads = parse_choice(settings["purged_reads"], ("eio", "zeros"))
    high = parse_fraction(settings["high_watermark"])
    low = parse_fraction(settings["low_watermark"])
    if low > high:
        low_s, high_s = settings["low_watermark"], settings["high_watermark"]
        raise low_s.invalid(f"it is above {high_s.shown()}; expected low <= high")
    pressure_on = parse_choice(settings["pressure_purge"], ("on", "off")) == "on"
    # Checked even when pressure purging is off: a bad value is a mistake either way.
    pressure = PressureConfig(
        min_free=parse_min_free(settings["min_free"], machine),
        interval=parse_interval(settings["pressure_interval"]),
    )
    pin_limit = parse_pin_limit(settings["pin_limit"], cap)
    metadata_cap = parse_metadata_cap(settings["metadata_cap"], cap)
    root = sorted_options.root
    config = MountConfig(
        mountpoint=mountpoint,
        memory_cap=cap,
        fuse_options=list(sorted_options.fuse),
        purged_reads_zeros=purged_reads == "zeros",
        high_watermark=high,
        low_watermark=low,
        pressure=pressure if pressure_on else None,
        pin_limit=pin_limit,
        cache_dir=sorted_options.cache_dir,
        metadata_cap=metadata_cap,
        root_mode=root.get("mode", 0o1777),
        root_uid=root.get("uid"),
        root_gid=root.get("gid"),
    )
    return config, cap_warnings(cap, machine)
