"""Pins: counted holds on pages of a file, owned by processes, charged to users.

A pin keeps every page of its range from being purged: a volatile unit that
contains a pinned page is skipped, whole, by every purge (reclaim parks it out
of the purge order: see :mod:`vrangefs.reclaim`).  Pins are

- *owned* by a process, named by its thread-group id (``tgid``, the pid users
  see).  Who the caller is, and noticing that it exited, is the daemon
  adapter's business; this table only drops an owner's pins when told
  (:meth:`PinTable.release_owner`).
- *counted*: a process that pins the same pages twice holds two pins there and
  must unpin twice.  Pins of different processes are independent.
- *charged* to the user (uid) that took them, against a per-user limit on
  pinned bytes: each distinct (process, page range) pin costs the length of its
  range once, however often it is held, so counting costs nothing and the
  limit bounds what a user can keep from being purged.

Ranges are half-open [start, end) page numbers; how a request's bytes map to
pages is the volume's business.  Pure and synchronous like the rest of the
core: no lock is needed, since no caller awaits between reading and changing.

Data structures, per inode: the live pins in a dict keyed by (start, end,
tgid), and the starts and ends of those pins in two sorted lists, so that
"does any pin overlap [a, b)?" is two binary searches whatever the number of
pins: the pins overlapping [a, b) are those with start < b, minus those with
end <= a (which all have start < b too).  Per owner: the set of its pins, for
releasing them all at its exit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from sortedcontainers import SortedList

from vrangefs.protocol import PAGE_SIZE


class PinLimitError(Exception):
    """The pin would take its user past the per-user limit; nothing was changed."""


class NotPinnedError(Exception):
    """The process holds no pin on exactly that range; nothing was changed."""


class PinListener(Protocol):
    """Told when a process no longer holds any pin (the adapter stops watching it)."""

    def owner_gone(self, tgid: int) -> None: ...


@dataclass(slots=True)
class _Pin:
    count: int
    uid: int  # who was charged when the pin was first taken


@dataclass(frozen=True, slots=True)
class PinInfo:
    """One live pin as ``user.vrange.pins`` lists it: pages, owner, count."""

    start: int
    end: int
    tgid: int
    count: int


class InodePins:
    """The live pins of one inode."""

    __slots__ = ("_ends", "_starts", "pins")

    def __init__(self) -> None:
        self.pins: dict[tuple[int, int, int], _Pin] = {}  # (start, end, tgid) -> pin
        # One entry per key of `pins`, sorted: O(log n) to add or remove anywhere, so
        # neither pinning nor an exit's release depends on where a pin lies.
        self._starts = SortedList()
        self._ends = SortedList()

    def __len__(self) -> int:
        """The number of distinct (range, owner) pins (not their counts)."""
        return len(self.pins)

    def covers(self, start: int, end: int) -> bool:
        """Whether any page of [start, end) is pinned."""
        started: int = self._starts.bisect_left(end)
        ended: int = self._ends.bisect_right(start)
        return started > ended

    def listing(self) -> list[PinInfo]:
        """Every live pin, sorted by (start, end, tgid)."""
        return [PinInfo(*row) for row in self.rows()]

    def rows(self) -> list[tuple[int, int, int, int]]:
        """Every live pin as (start, end, tgid, count), sorted: :meth:`listing` without
        an object per pin (a listing of 4,000 pins costs 8 ms less)."""
        return sorted([(s, e, tgid, pin.count) for (s, e, tgid), pin in self.pins.items()])

    def _add(self, key: tuple[int, int, int], pin: _Pin) -> None:
        self.pins[key] = pin
        self._starts.add(key[0])
        self._ends.add(key[1])

    def _remove(self, key: tuple[int, int, int]) -> _Pin:
        pin = self.pins.pop(key)
        self._starts.remove(key[0])
        self._ends.remove(key[1])
        return pin

    def _remove_many(self, keys: list[tuple[int, int, int]]) -> list[_Pin]:
        """Remove several pins at once: the sorted lists are rebuilt once."""
        if len(keys) <= 8:
            return [self._remove(key) for key in keys]
        removed = [self.pins.pop(key) for key in keys]
        self._starts = SortedList(key[0] for key in self.pins)
        self._ends = SortedList(key[1] for key in self.pins)
        return removed


class PinTable:
    """Every live pin of a mount, by inode and by owner, and what each user is charged.

    *limit_pages* bounds the pages one user may keep pinned (see the module
    docstring for how pins are charged); None means no limit.
    """

    def __init__(self, limit_pages: int | None = None) -> None:
        self.limit_pages = limit_pages
        self.listener: PinListener | None = None
        self._inodes: dict[int, InodePins] = {}
        self._owners: dict[int, set[tuple[int, int, int]]] = {}  # tgid -> {(ino, start, end)}
        self._charged: Counter[int] = Counter()  # uid -> pages
        self.pins = 0  # live pins, counted
        self.records = 0  # distinct (inode, range, process) pins: what holding them costs
        self.pinned_pages = 0  # pages charged, all users
        self.released_by_exit = 0  # pins (counted) dropped because their process exited

    # -- queries ------------------------------------------------------------
    def of(self, ino: int) -> InodePins | None:
        return self._inodes.get(ino)

    def covers(self, ino: int, start: int, end: int) -> bool:
        pins = self._inodes.get(ino)
        return pins is not None and pins.covers(start, end)

    def holds(self, tgid: int) -> bool:
        """Whether the process holds any pin."""
        return tgid in self._owners

    def owners(self) -> int:
        """The number of processes holding pins."""
        return len(self._owners)

    def charged_pages(self, uid: int) -> int:
        return self._charged[uid]

    # -- changes --------------------------------------------------------------
    def pin(self, ino: int, start: int, end: int, tgid: int, uid: int) -> bool:
        """One more pin of *tgid* on pages [start, end) of *ino*, charged to *uid*.

        Returns True if the process held no pin on exactly that range before (the
        pinned pages may have changed), False if it only counted one more.
        Raises PinLimitError if a new range would take *uid* past the limit.
        """
        _check_pages(start, end)
        key = (start, end, tgid)
        pins = self._inodes.get(ino)
        pin = pins.pins.get(key) if pins is not None else None
        if pin is not None:
            pin.count += 1
            self.pins += 1
            return False
        pages = end - start
        if self.limit_pages is not None and self._charged[uid] + pages > self.limit_pages:
            raise PinLimitError(
                f"pinning {pages * PAGE_SIZE} more bytes would take uid {uid} past its limit "
                f"of {self.limit_pages * PAGE_SIZE} pinned bytes "
                f"({self._charged[uid] * PAGE_SIZE} pinned already)"
            )
        if pins is None:
            pins = self._inodes[ino] = InodePins()
        pins._add(key, _Pin(1, uid))
        self._owners.setdefault(tgid, set()).add((ino, start, end))
        self._charged[uid] += pages
        self.pinned_pages += pages
        self.pins += 1
        self.records += 1
        return True

    def unpin(self, ino: int, start: int, end: int, tgid: int) -> bool:
        """Drop one pin of *tgid* on exactly pages [start, end) of *ino*.

        Returns True if that was its last pin there (the pinned pages may have
        changed).  Raises NotPinnedError, changing nothing, if it holds none.
        """
        _check_pages(start, end)
        key = (start, end, tgid)
        pins = self._inodes.get(ino)
        pin = pins.pins.get(key) if pins is not None else None
        if pins is None or pin is None:
            raise NotPinnedError(
                f"process {tgid} holds no pin on pages [{start}, {end}) of inode {ino}"
            )
        self.pins -= 1
        pin.count -= 1
        if pin.count:
            return False
        self._drop(ino, pins, key)
        return True

    def release_owner(self, tgid: int) -> list[tuple[int, int, int]]:
        """Drop every pin of a process that exited; returns the (ino, start, end) ranges."""
        return sorted(self.release_some(tgid, len(self._owners.get(tgid, ()))))

    def owned(self, tgid: int) -> list[tuple[int, int, int]]:
        """The (ino, start, end) ranges *tgid* pins, in no particular order (sorting
        100,000 of them would take 0.1 s in one step)."""
        return list(self._owners.get(tgid, ()))

    def release_some(self, tgid: int, count: int) -> list[tuple[int, int, int]]:
        """Drop all of *tgid*'s pins on up to *count* of its ranges, counts and all;
        returns those ranges (none once it holds no pin).

        For releasing the pins of an exited process in slices: each call costs about
        *count*, however many it holds, and takes its ranges out of the owner index
        as it goes, so no step copies or frees the whole set (for 500,000 pins a
        list of them cost 0.14 s to free in one step).
        """
        owned = self._owners.get(tgid)
        dropped: list[tuple[int, int, int]] = []
        while owned and len(dropped) < count:
            ino, start, end = rng = owned.pop()
            pins = self._inodes[ino]  # an inode's pins leave the owner index with it
            key = (start, end, tgid)
            pin = pins.pins[key]
            self._drop(ino, pins, key)
            self.pins -= pin.count
            self.released_by_exit += pin.count
            dropped.append(rng)
        return dropped

    def forget_inode(self, ino: int) -> None:
        """Drop every pin of an inode that is being freed."""
        pins = self._inodes.get(ino)
        if pins is None:
            return
        for pin in self._drop_many(ino, list(pins.pins)):
            self.pins -= pin.count

    def _drop(self, ino: int, pins: InodePins, key: tuple[int, int, int]) -> None:
        pin = pins._remove(key)
        if not pins.pins:
            del self._inodes[ino]
        self._account_drop(ino, key, pin)

    def _drop_many(self, ino: int, keys: list[tuple[int, int, int]]) -> list[_Pin]:
        """Drop several pins of one inode (their counts are the caller's business)."""
        pins = self._inodes[ino]
        removed = pins._remove_many(keys)
        if not pins.pins:
            del self._inodes[ino]
        for key, pin in zip(keys, removed, strict=True):
            self._account_drop(ino, key, pin)
        return removed

    def _account_drop(self, ino: int, key: tuple[int, int, int], pin: _Pin) -> None:
        start, end, tgid = key
        self.records -= 1
        pages = end - start
        self._charged[pin.uid] -= pages
        if not self._charged[pin.uid]:
            del self._charged[pin.uid]
        self.pinned_pages -= pages
        owned = self._owners[tgid]
        owned.discard((ino, start, end))
        if not owned:
            del self._owners[tgid]
            if self.listener is not None:
                self.listener.owner_gone(tgid)

    # -- introspection ------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, PinInfo]]:
        """(ino, pin) for every live pin, by inode."""
        for ino, pins in self._inodes.items():
            for info in pins.listing():
                yield ino, info

    def check_invariants(self) -> None:
        """Raise AssertionError unless the indexes and counters agree."""
        pins = pages = 0
        charged: Counter[int] = Counter()
        owners: dict[int, set[tuple[int, int, int]]] = {}
        for ino, inode_pins in self._inodes.items():
            _check(bool(inode_pins.pins), f"inode {ino} has an empty pin set")
            _check(
                list(inode_pins._starts) == sorted(s for s, _, _ in inode_pins.pins)
                and list(inode_pins._ends) == sorted(e for _, e, _ in inode_pins.pins),
                f"inode {ino}: start and end indexes disagree with its pins",
            )
            for (start, end, tgid), pin in inode_pins.pins.items():
                _check(pin.count > 0 and start < end, f"inode {ino}: bad pin {start, end, pin}")
                pins += pin.count
                pages += end - start
                charged[pin.uid] += end - start
                owners.setdefault(tgid, set()).add((ino, start, end))
        _check(pins == self.pins, f"counted {self.pins} pins, holding {pins}")
        _check(pages == self.pinned_pages, f"counted {self.pinned_pages} pages, holding {pages}")
        _check(charged == self._charged, f"charges {dict(self._charged)} vs {dict(charged)}")
        _check(owners == self._owners, "the owner index disagrees with the pins")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_pages(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"invalid page range [{start}, {end})")
