"""Which enosfs mount a path is on, and where in it: for the commands that act on a
mount from outside it (`enosfs refresh`, `enosfs warm`).

The mount is found in /proc/self/mountinfo, not by asking it for a file of its own: a
path may name something the mount does not know (yet), and a dead mount answers
nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from enosfs.errors import EnosfsError

FSTYPE = "fuse.enosfs"  # mount.py mounts with subtype=enosfs


class NotOnMount(EnosfsError):
    """The path is on no enosfs mount."""


@dataclass(frozen=True)
class Place:
    mountpoint: str
    relative: str  # from the mount's root, without a leading '/'; '' for the root
    path: str  # the path itself, absolute, symbolic links outside the mount resolved


def mounts() -> dict[str, str]:
    """Mountpoint -> file system type, the topmost mount at each."""
    from enosfs.mount import _unescape_mountinfo as unescape

    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            with contextlib.suppress(ValueError, IndexError):
                out[unescape(fields[4])] = fields[fields.index("-", 6) + 1]
    return out


def place_of(path: str) -> Place:
    """Where `path` is: its enosfs mount and the path inside it. NotOnMount when the
    nearest mount above it is not enosfs."""
    # realpath without strict: a name the mount does not know is still a place in it.
    real = os.path.realpath(path)
    table = mounts()
    here = real
    while (fstype := table.get(here)) is None and here != "/":
        here = os.path.dirname(here)
    if fstype != FSTYPE:
        raise NotOnMount(f"{path} is not on an enosfs mount")
    return Place(here, "" if real == here else os.path.relpath(real, here), real)
