"""One adaptive bound on the API calls a mount has in flight, to be gentle with a
gateway that rate-limits each app.

A fixed bound is wrong both ways: too low wastes a distant gateway's round trips, too
high turns a walk over a big organisation into a storm of 429s. So the bound adapts as
TCP's congestion window does (additive increase, multiplicative decrease): it starts
modest, grows by one per answer until the first cut (slow start: it doubles each
round) and then by one after `limit` calls were answered while it was full, and
halves when the gateway says "too many" (HTTP 429, or an EnOS rate-limit envelope).
It halves at most once per round of calls: the answers to calls sent before the last
cut say nothing the cut has not already acted on. It never goes below 1 nor above the
configured ceiling. A Retry-After holds every new call until it has passed, not only
the call that was told: the gateway counts the app, not the call.

It sets no pace of its own (calls a second) from what a 429 shows: measured on the
soak, a pace learnt from the API calls answered in the second before a 429 is the
mount's demand, not the gateway's rate (a mount busy reading asks a few calls a
second), and holding every later listing to it cut the readers' throughput by 40 %.

Growth needs a full bound: calls one after another say nothing about how many at once
the gateway takes, and a bound grown on such evidence would open the next burst with
a storm.

Waiters queue in two lanes (priority.py): a call someone waits for takes the next
free slot before any call made on speculation (a walk's read-ahead, sizes fetched
ahead), which takes every slot no such call waits for; each lane is served in arrival
order. A freed slot passes straight to the next waiter, so a waiter cancelled in the
queue leaves nothing behind and one cancelled after it got its slot gives it back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from enosfs.errors import ApiError, RateLimited
from enosfs.priority import Lanes

START = 8


class ApiThrottle:
    def __init__(self, ceiling: int, *, start: int = START) -> None:
        if ceiling < 1:
            raise ValueError("the ceiling of API concurrency is at least 1")
        self.ceiling = ceiling
        self.limit = max(1, min(start, ceiling))
        self.in_use = 0
        self._lanes = Lanes()  # calls waiting for a slot: "now" first, then "ahead"
        self._round = 0  # advanced by each cut: a call remembers the round it started in
        self._successes = 0  # answered calls, while full, since the last change
        self._fills = 0  # how often every slot was taken
        self._resume_at = float("-inf")  # no call starts before this (Retry-After)
        self.rate_limited = 0  # rate-limit answers seen (429s and envelopes)
        self.throttled_waits = 0  # calls that waited for a slot or a Retry-After
        self.decreases = 0

    def stats(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "ceiling": self.ceiling,
            "in_use": self.in_use,
            "waiting": len(self._lanes),
            "waiting_ahead": self._lanes.waiting()[1],
            "rate_limited": self.rate_limited,
            "throttled_waits": self.throttled_waits,
            "decreases": self.decreases,
        }

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of `limit` slots for one request and its answer.

        How the body ends tells the bound what happened: RateLimited cuts it, any
        other answer (an error envelope is an answer too) counts towards growing it,
        and a failure that is no answer (a reset, a timeout) says nothing either way.
        """
        started, fills = await self._acquire()
        try:
            yield
        except RateLimited as exc:
            self._told_to_slow_down(started, exc.retry_after)
            raise
        except ApiError:
            self._answered(fills)
            raise
        else:
            self._answered(fills)
        finally:
            self._release()

    @asynccontextmanager
    async def passage(self) -> AsyncIterator[None]:
        """For a request that takes no slot (a file body, which may stream for minutes
        and would starve the listings if it held one): it still waits out a Retry-After,
        and a 429 it gets still cuts the bound, as the gateway counts every call."""
        started = self._round
        await self._wait_out_retry_after(counted=False)
        try:
            yield
        except RateLimited as exc:
            self._told_to_slow_down(started, exc.retry_after)
            raise

    def next_round(self, joining: int = 0) -> int:
        """Calls that may be in flight one round from now, counting those waiting and
        `joining` more about to ask: what to have connections ready for. In slow start
        the bound doubles in a round (each answer while full adds one); after a cut it
        grows by one."""
        waiting = len(self._lanes) + joining
        if not waiting:
            return self.in_use
        grown = self.limit + (self.limit if not self.decreases else 1)
        return min(self.in_use + waiting, grown, self.ceiling)

    # -- the bound -----------------------------------------------------------------------

    async def _acquire(self) -> tuple[int, int]:
        """Take a slot; the round it was taken in, and how often the bound had been
        full before."""
        await trio.lowlevel.checkpoint_if_cancelled()
        fills = self._fills
        if self.in_use < self.limit and not len(self._lanes):
            self._take()
            waited = False
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            self.throttled_waits += 1
            await self._lanes.park()  # woken with the slot already counted as ours
            waited = True
        try:
            await self._wait_out_retry_after(counted=waited)
        except BaseException:
            self._release()
            raise
        return self._round, fills

    async def _wait_out_retry_after(self, *, counted: bool) -> None:
        while trio.current_time() < self._resume_at:
            if not counted:
                self.throttled_waits += 1
                counted = True
            await trio.sleep_until(self._resume_at)

    def _release(self) -> None:
        self.in_use -= 1
        self._hand_on()

    def _hand_on(self) -> None:
        """Give free slots to the waiters first in line."""
        while self.in_use < self.limit and self._lanes.wake_next():
            self._take()

    def _take(self) -> None:
        self.in_use += 1
        if self.in_use >= self.limit:
            self._fills += 1

    def _answered(self, fills: int) -> None:
        """An answer to a call that was in flight while every slot was taken is
        evidence the gateway takes `limit` at once; one that never saw the bound full
        is none."""
        if self._fills == fills or self.limit >= self.ceiling:
            return
        self._successes += 1
        # Until the gateway first says "too many", one more per answer (the bound
        # doubles each round, as TCP's slow start): a walk 40 ms away should not spend
        # hundreds of calls finding a ceiling the gateway never enforces.
        if self._successes >= self.limit or not self.decreases:
            self.limit += 1
            self._successes = 0
            self._hand_on()

    def _told_to_slow_down(self, started: int, retry_after: float | None) -> None:
        self.rate_limited += 1
        now = trio.current_time()
        if retry_after:
            self._resume_at = max(self._resume_at, now + retry_after)
        if started == self._round:
            self._round += 1
            self.limit = max(1, self.limit // 2)
            self._successes = 0
            self.decreases += 1
