"""Whether someone is waiting for an API call: calls a user waits for ("now") go ahead
of calls made on speculation ("ahead": a walk's listings fetched before it gets there,
a folder's sizes fetched for the `ls -l` that may follow, thing models fetched at
mount).

Far from EnOS, a walk's read-ahead puts hundreds of calls in the API bound's queue in
an instant; served in arrival order, the `open` a user types next waits seconds behind
them. So the queues in front of the API (throttle.py, and the bound on a folder's
sizing in catalog.py) have two lanes: a waiting "now" call takes the next free slot
before any waiting "ahead" call; "ahead" calls take every slot no "now" call waits for,
so they never starve; each lane keeps arrival order.

The class travels with the code path, not through every signature: speculative code
runs under `speculative()`, which sets a context variable that trio hands on to the
tasks started within it. Work done ahead is shared (one listing, one size per file,
however many want it), so a user may come to wait for a call that was queued as
"ahead": `needed()` hurries it, and whatever else runs under the same token, into the
"now" lane. A token is hurried for good: the work it covers has someone waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import trio


class Ahead:
    """The standing of work done on speculation, until someone waits for it."""

    def __init__(self) -> None:
        self.hurried = False
        self._parked: dict[_Waiter, Lanes] = {}  # its calls queued in the "ahead" lane

    def hurry(self) -> None:
        """Someone waits for this work: its calls queued and to come go "now"."""
        self.hurried = True
        parked, self._parked = self._parked, {}
        for waiter, lanes in parked.items():
            lanes._promote(waiter)


_standing: ContextVar[Ahead | None] = ContextVar("enosfs_standing", default=None)


def current() -> Ahead | None:
    """The standing of the work under way here: None where someone waits for it."""
    return _standing.get()


def urgent() -> bool:
    token = _standing.get()
    return token is None or token.hurried


@contextmanager
def speculative(token: Ahead | None = None) -> Iterator[Ahead]:
    """Run the block (and the tasks it starts) as work nobody waits for yet."""
    token = token or Ahead()
    reset = _standing.set(token)
    try:
        yield token
    finally:
        _standing.reset(reset)


@contextmanager
def under(token: Ahead | None) -> Iterator[None]:
    """Run the block under the token's standing; where there is none, as it is."""
    if token is None:
        yield
        return
    reset = _standing.set(token)
    try:
        yield
    finally:
        _standing.reset(reset)


def needed(token: Ahead | None) -> None:
    """The caller is about to wait for work started under `token`: if someone waits for
    the caller, that work is now needed too."""
    if token is not None and not token.hurried and urgent():
        token.hurry()


@dataclass(eq=False)
class _Waiter:
    task: trio.lowlevel.Task
    token: Ahead | None = None


class Lanes:
    """Tasks waiting for a slot, in two lanes, each in arrival order: as a ParkingLot,
    a woken task owns what it was woken for (its waker counts it), and one cancelled
    while parked leaves nothing behind."""

    def __init__(self) -> None:
        # Insertion-ordered dicts: FIFO, and O(1) removal of a cancelled waiter.
        self._now: dict[_Waiter, None] = {}
        self._ahead: dict[_Waiter, None] = {}

    def __len__(self) -> int:
        return len(self._now) + len(self._ahead)

    def waiting(self) -> tuple[int, int]:
        """("now", "ahead") waiters."""
        return len(self._now), len(self._ahead)

    async def park(self) -> None:
        """Wait until `wake_next` picks this task, in the lane of its standing."""
        token = _standing.get()
        waiter = _Waiter(trio.lowlevel.current_task(), token)
        if token is None or token.hurried:
            self._now[waiter] = None
        else:
            self._ahead[waiter] = None
            token._parked[waiter] = self

        def abort(_: object) -> trio.lowlevel.Abort:
            self._forget(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake_next(self) -> bool:
        """Wake the longest waiter of the "now" lane, else of the "ahead" lane; False
        if none waits."""
        lane = self._now or self._ahead
        if not lane:
            return False
        waiter = next(iter(lane))
        self._forget(waiter)
        trio.lowlevel.reschedule(waiter.task)
        return True

    def _forget(self, waiter: _Waiter) -> None:
        self._now.pop(waiter, None)
        self._ahead.pop(waiter, None)
        if waiter.token is not None:
            waiter.token._parked.pop(waiter, None)

    def _promote(self, waiter: _Waiter) -> None:
        if waiter in self._ahead:
            del self._ahead[waiter]
            self._now[waiter] = None


class PriorityLimiter:
    """A semaphore whose waiters queue in Lanes: at most `total` holders."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a limiter admits at least one holder")
        self.total = total
        self.in_use = 0
        self._lanes = Lanes()

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.in_use < self.total and not len(self._lanes):
            self.in_use += 1
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._lanes.park()  # woken with the slot counted as ours

    def release(self) -> None:
        if not self._lanes.wake_next():
            self.in_use -= 1
        # else handed straight on to a waiter: in_use unchanged

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.release()
