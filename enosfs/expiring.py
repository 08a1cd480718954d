"""Answers kept for a while: fresh for `ttl` seconds, then stale but not forgotten.

cachetools.TTLCache drops an entry the moment it expires, but a listing whose API now
answers Denied still wants the last answer it had (a device once seen stays listable),
so expiry here only changes which question an entry answers: `fresh` or `last`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """A map whose entries are fresh for `ttl` seconds of `clock` after they were put."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.clock = clock
        self._items: dict[K, tuple[float, V]] = {}

    def put(self, key: K, value: V, at: float | None = None) -> None:
        """Remember `value`; `at` lets a batch share the time it was answered."""
        self._items[key] = (self.clock() if at is None else at, value)

    def fresh(self, key: K) -> V | None:
        """The value, if put less than `ttl` seconds ago."""
        item = self._items.get(key)
        if item is not None and self.clock() - item[0] < self.ttl:
            return item[1]
        return None

    def last(self, key: K) -> V | None:
        """The value however old: for when a fresh answer cannot be had."""
        item = self._items.get(key)
        return item[1] if item is not None else None

    def expire_where(self, wanted: Callable[[K], bool]) -> None:
        """Make the entries whose key is wanted stale now (`enosfs refresh`): the next
        `fresh` asks again, and `last` still has the answer for when asking fails."""
        for key, (_, value) in list(self._items.items()):
            if wanted(key):
                self._items[key] = (float("-inf"), value)

    def __len__(self) -> int:
        return len(self._items)
