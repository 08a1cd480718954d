"""Listing read-ahead across assets: a walk of an organisation gets its next assets'
listings fetched before it reaches them.

`find`, `du`, `ls -R`, `cp -r` and `tar` visit an organisation's assets one after
another in listing order, and each asset's listings cost a round trip or two: far from
EnOS, a walk is a chain of waits. When the visits (opendir of ASSET, ASSET/feature,
ASSET/ota) follow the listing order, the next assets' category listings are fetched
ahead, concurrently. The pattern is the one the read path uses across a folder's files
(readahead.FolderReadAhead): it starts on the second asset in order, with a window that
doubles while the walk keeps to the order; any other order resets it, so a visitor who
goes straight to one asset costs no call for any other.

What is fetched ahead is an ordinary listing of the tree (cached for `metadata_ttl`,
shared with whoever asks for it next). A walk that asks for sizes (`ls -lR`, `du`:
a size asked in the organisation in the last few seconds) gets the files ahead sized
too, a folder at a time; one that does not (`find`, `ls -R`) costs no getFileInfo.
Foreground first: at most `in_flight` fetches run at once, and their calls queue
behind any call a user waits for (priority.py: each listing and each file's size goes
"ahead", with a standing of its own, so the user who comes to wait for one hurries that
one alone); a fetch that has not started when the user gets there finds the listing
done by the user, and asks nothing.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio

from enosfs.errors import EnosfsError
from enosfs.namespace import Dir, DirKind, Namespace, Node
from enosfs.priority import speculative
from enosfs.readahead import FolderReadAhead

log = logging.getLogger(__name__)

# How many assets ahead a walk in order gets fetched, at most, and with how many
# listings in flight at once.
AHEAD = 64
IN_FLIGHT = 24


class WalkAhead:
    """Per organisation folder: where a walk over its assets is, and what to fetch."""

    def __init__(
        self,
        ns: Namespace,
        nursery: trio.Nursery,
        *,
        ahead: int = AHEAD,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.ns = ns
        self.nursery = nursery
        self.ahead = ahead
        self.limit = trio.CapacityLimiter(in_flight)
        self.patterns: dict[int, FolderReadAhead] = {}  # org folder inode -> pattern
        # org folder inode -> (the listing it was made from, asset inode -> index, assets)
        self._orders: dict[int, tuple[dict[str, Node], dict[int, int], list[Dir]]] = {}
        self._queued: set[int] = set()  # asset folders whose fetch is queued or running
        self.counts: Counter[str] = Counter()

    def visited(self, d: Dir) -> None:
        """A folder of an asset (the asset's own, or a category) is being listed."""
        asset = d if d.kind is DirKind.ASSET else d.parent
        if not isinstance(asset, Dir) or asset.kind is not DirKind.ASSET:
            return
        org = asset.parent
        if org is None or org.kind is not DirKind.ORG or org.children is None:
            return  # (a device known by its keys alone sits in by-key/, out of any order)
        index, assets = self._position(org, asset)
        if index < 0:
            return  # named by its id, not listed: no order to follow
        pattern = self.patterns.get(org.inode)
        if pattern is None:
            pattern = self.patterns[org.inode] = FolderReadAhead(
                initial=min(8, self.ahead), maximum=self.ahead
            )
        span = pattern.on_open(index, len(assets))
        if span is None:
            return
        for nxt in assets[span[0] : span[1]]:
            if nxt.inode not in self._queued:
                self._queued.add(nxt.inode)
                self.nursery.start_soon(self._fetch, nxt)

    def _position(self, org: Dir, asset: Dir) -> tuple[int, list[Dir]]:
        """The asset's index among the org's listed assets, in the order opendir shows
        them (by name); worked out once per listing, not once per visit."""
        assert org.children is not None
        known = self._orders.get(org.inode)
        if known is None or known[0] is not org.children:
            assets = [
                n
                for _, n in sorted(org.children.items())
                if isinstance(n, Dir) and n.kind is DirKind.ASSET  # not by-name/, by-key/
            ]
            known = (org.children, {n.inode: i for i, n in enumerate(assets)}, assets)
            self._orders[org.inode] = known
        return known[1].get(asset.inode, -1), known[2]

    async def _fetch(self, asset: Dir) -> None:
        """The asset's category listings, as the walk will ask for them; and the sizes
        of their files where the walk asks for sizes (`ls -lR`, `du`), not where it
        does not (`find`, `ls -R`)."""
        try:
            async with self.limit:
                with speculative():
                    categories = await self.ns.children(asset)
                sizes = asset.parent is not None and self.ns.sizes_wanted(asset.parent)
                for d in categories.values():
                    if not isinstance(d, Dir):
                        continue
                    if not self.ns.fresh(d):
                        with speculative():
                            await self.ns.children(d)
                        self.counts["listings"] += 1
                    if sizes:
                        with speculative():
                            await self.ns.size_folder(d)
                        self.counts["sized_folders"] += 1
        except EnosfsError as exc:
            # The walk asks again when it gets there, and reports the failure then.
            log.debug("%s: listing ahead failed: %s", asset.path, exc)
            self.counts["failed"] += 1
        except Exception:
            # A bug here must not take the mount's nursery down with it.
            log.exception("%s: listing ahead failed unexpectedly", asset.path)
            self.counts["failed"] += 1
        finally:
            self._queued.discard(asset.inode)
