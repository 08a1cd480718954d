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

A bound on calls in flight is not a rate, and gateways limit rates: after each
Retry-After the freed slots start a burst the gateway's window refuses again. So an
API call's 429 also sets a pace: the API calls the gateway answered in the second
before it, and from then on API calls start no closer together than that. The pace
grows by one call a second while it holds calls back and no 429 comes (a quiet spell
proves nothing, and a pace grown through one would let the next burst through), and
each later round of 429s takes a tenth off it. It is learnt from API calls only: a
file body's 429 says the app's budget went on bodies, and API calls counted in that
second tell nothing of the gateway's rate (a mount busy reading answers a few API
calls a second, and a pace set from that would starve every listing). And it is
forgotten after QUIET seconds without a 429: a pace that is right meets a 429 every
few seconds as it probes upwards, so one that met none for that long is out of date,
and a burst that once met the gateway does not cripple the mount for long.

Growth needs a full bound: calls one after another say nothing about how many at once
the gateway takes, and a bound grown on such evidence would open the next burst with
a storm.

Waiters are served in arrival order (trio's ParkingLot), and a freed slot passes
straight to the next waiter, so a waiter cancelled in the queue leaves nothing behind
and one cancelled after it got its slot gives it back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from enosfs.errors import ApiError, RateLimited

START = 8
QUIET = 10.0  # seconds without a 429 after which the pace is forgotten


class ApiThrottle:
    def __init__(self, ceiling: int, *, start: int = START) -> None:
        if ceiling < 1:
            raise ValueError("the ceiling of API concurrency is at least 1")
        self.ceiling = ceiling
        self.limit = max(1, min(start, ceiling))
        self.in_use = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._round = 0  # advanced by each cut: a call remembers the round it started in
        self._successes = 0  # answered calls, while full, since the last change
        self._fills = 0  # how often every slot was taken
        self._resume_at = float("-inf")  # no call starts before this (Retry-After)
        # API calls a second the gateway took when an API call was last told "too
        # many" (None: none was, or not for QUIET seconds).
        self.rate: float | None = None
        self._rate_at = 0.0  # when the pace last changed
        self._next_start = float("-inf")  # the pace lets no API call start before this
        self._paced_at = float("-inf")  # when the pace last held a call back
        self._limited_at = float("-inf")  # an API call's last 429
        self._answers: deque[float] = deque()  # when API calls answered, the last second
        self.rate_limited = 0  # rate-limit answers seen (429s and envelopes)
        self.throttled_waits = 0  # calls that waited for a slot or a Retry-After
        self.decreases = 0

    def stats(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "ceiling": self.ceiling,
            "in_use": self.in_use,
            "waiting": len(self._lot),
            "rate_per_s": None if self.rate is None else round(self.rate, 1),
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
            self._told_to_slow_down(started, exc.retry_after, api=True)
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
        and a 429 it gets still cuts the bound, as the gateway counts every call; but
        it sets no pace (the module says why)."""
        started = self._round
        await self._wait_out_retry_after(counted=False)
        try:
            yield
        except RateLimited as exc:
            self._told_to_slow_down(started, exc.retry_after, api=False)
            raise

    # -- the bound -----------------------------------------------------------------------

    async def _acquire(self) -> tuple[int, int]:
        """Take a slot; the round it was taken in, and how often the bound had been
        full before."""
        await trio.lowlevel.checkpoint_if_cancelled()
        fills = self._fills
        if self.in_use < self.limit and not len(self._lot):
            self._take()
            waited = False
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            self.throttled_waits += 1
            await self._lot.park()  # woken with the slot already counted as ours
            waited = True
        try:
            await self._wait_out_retry_after(counted=waited)
            await self._paced()
        except BaseException:
            self._release()
            raise
        return self._round, fills

    async def _paced(self) -> None:
        """Start no sooner than the pace allows, once the gateway has shown its rate:
        40 ms away, ten calls in flight are 250 a second."""
        if self.rate is None:
            return
        now = trio.current_time()
        if now - self._limited_at >= QUIET:
            self.rate = None  # out of date: the bound and Retry-After alone again
            return
        start = max(now, self._next_start)
        self._next_start = start + 1.0 / self.rate
        if start > now:
            self._paced_at = now
            await trio.sleep_until(start)

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
        """Give free slots to the longest waiters."""
        while self.in_use < self.limit and len(self._lot):
            self._lot.unpark()
            self._take()

    def _take(self) -> None:
        self.in_use += 1
        if self.in_use >= self.limit:
            self._fills += 1

    def _answered(self, fills: int) -> None:
        """An answer to a call that was in flight while every slot was taken is
        evidence the gateway takes `limit` at once; one that never saw the bound full
        is none."""
        now = trio.current_time()
        self._answers.append(now)
        while now - self._answers[0] >= 1.0:
            self._answers.popleft()
        if self.rate is not None and now - self._rate_at >= 1.0:
            self._rate_at = now
            if now - self._paced_at < 1.0:  # probe for more, while the pace holds calls
                self.rate += 1.0
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

    def _told_to_slow_down(self, started: int, retry_after: float | None, *, api: bool) -> None:
        self.rate_limited += 1
        now = trio.current_time()
        if retry_after:
            self._resume_at = max(self._resume_at, now + retry_after)
        if api:
            self._learn_pace(now, new_round=started == self._round)
        if started == self._round:
            self._round += 1
            self.limit = max(1, self.limit // 2)
            self._successes = 0
            self.decreases += 1

    def _learn_pace(self, now: float, *, new_round: bool) -> None:
        """What the gateway answered in the last second is what it takes; a round of
        429s at a pace already set says the pace is a little too fast."""
        if self.rate is not None and now - self._limited_at >= QUIET:
            self.rate = None  # forgotten: learn afresh
        self._limited_at = now
        if self.rate is None:
            answered = sum(1 for t in self._answers if now - t < 1.0)
            if answered:  # none: nothing learnt, the bound and Retry-After alone
                self.rate, self._rate_at = float(answered), now
        elif new_round:
            self.rate, self._rate_at = max(1.0, self.rate * 0.9), now
