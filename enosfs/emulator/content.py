"""File bytes made on demand: any range of a generated file, without holding or storing it.

A generated organisation holds tens of thousands of files, gigabytes in all; writing
them to disk (or keeping them in memory) would make the emulator slow to start and
heavy to run. Instead a file is a (seed, size) pair, cut into fixed blocks that are
each a window of one shared pool of noise at an offset the seed chooses, so a Range
request for the middle of a file costs only the blocks it touches (at memory speed),
and the same seed always gives the same bytes. Changing how bytes are made changes
every generated file: the emulator's state fingerprint covers this module.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = 64 * 1024
POOL_SIZE = 4 * 1024 * 1024


@functools.cache
def _pool() -> bytes:
    """Noise that blocks are cut from: drawing 64 KiB from a seeded generator for every
    block runs at about 250 MB/s, slower than a client reads; a slice runs at memory speed."""
    return random.Random("enosfs generated pool").randbytes(POOL_SIZE + BLOCK)


def _offset(seed: str, index: int) -> int:
    """Where in the pool block `index` of the file with this seed starts: every block of
    every file is its own window of the pool, so no two blocks are alike."""
    digest = hashlib.blake2b(f"{seed}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % POOL_SIZE


def _pieces(seed: str, offset: int, end: int) -> Iterator[memoryview]:
    pool = memoryview(_pool())
    pos = offset
    while pos < end:
        index, within = divmod(pos, BLOCK)
        take = min(BLOCK - within, end - pos)
        at = _offset(seed, index) + within
        yield pool[at : at + take]
        pos += take


@dataclass(frozen=True)
class GeneratedContent:
    """The bytes of one generated file: deterministic, random-access, never stored."""

    seed: str
    size: int

    def read(self, offset: int, n: int) -> bytes:
        """Up to n bytes from offset (fewer at the end of the file), as os.pread gives."""
        end = min(self.size, offset + n)
        return b"".join(_pieces(self.seed, offset, end)) if offset < end else b""

    def digests(self, sign_method: str = "md5") -> tuple[str, str]:
        """(md5, sign) of the whole file: what getFileInfo and a firmware's sign say.
        The sha256 is only computed for a sha256-signed file: it doubles the cost."""
        md5 = hashlib.md5()
        sha = hashlib.sha256() if sign_method == "sha256" else None
        for piece in _pieces(self.seed, 0, self.size):
            md5.update(piece)
            if sha is not None:
                sha.update(piece)
        return md5.hexdigest(), sha.hexdigest() if sha is not None else md5.hexdigest()

    def all_bytes(self) -> bytes:
        """The whole file, for tests that compare what they read with the reference."""
        return self.read(0, self.size)
