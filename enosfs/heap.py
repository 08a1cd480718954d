"""The cyclic garbage collector, set for a process that holds a big tree of metadata.

A mount of a 5,000-device organisation holds a few hundred thousand long-lived objects
(nodes, their dicts, file records), and a walk over it allocates as many again, most
of them gone by the end of the request that made them. With CPython's defaults (a
young collection every 700 allocations) many of those short-lived objects are still
alive at a collection, survive into the old generation and push it past the quarter
of growth that starts a full collection: a `find` of the organisation after a remount
ran 4 to 9 full collections over the whole tree, 0.8 s of 6 s of the mount's CPU, and
a cold walk more. Young collections every YOUNG allocations let those objects die
first: full collections become rare, and the cost is at most YOUNG objects of cyclic
garbage (a few MiB) waiting a little longer for collection.
"""

from __future__ import annotations

import gc

YOUNG = 50_000


def tune() -> None:
    """Collect the young generation every YOUNG allocations, the rest as CPython does."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
