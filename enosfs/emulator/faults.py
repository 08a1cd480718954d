"""Misbehaviour on demand: the faults the emulator injects, and which requests get them.

A fault applies to the requests whose kind (`files.download`, `devices.search`, ...)
matches its pattern, to a share of them drawn from a seeded generator (so a run can be
repeated), and optionally only a number of times. Faults are set at start
(`--fault kind:key=value,...`) and at run time (`POST /__emulator__/faults`).

| kind      | what the client sees                                              |
|-----------|-------------------------------------------------------------------|
| latency   | the answer `seconds` later                                        |
| error     | HTTP `status` (500/502/503/429...), with Retry-After: `seconds`    |
| envelope  | an EnOS failure envelope `code` with HTTP `status` (default 200)   |
| deny      | envelope 99403 (the app lacks the permission)                     |
| garbage   | HTTP 200 with a body that is not JSON (a proxy's error page)      |
| nodata    | a success envelope without its `data` field                       |
| bloat     | a success envelope padded with `size` bytes of blanks (valid JSON) |
| reset     | a download cut (connection closed) after `after` body bytes       |
| short     | a download whose Content-Length promises more than is then sent  |
| stall     | a download that stops for `seconds` after `after` body bytes      |
| bandwidth | a download paced at `rate` bytes per second                       |
| corrupt   | a download with the byte at body offset `after` flipped          |
| expired   | the object store refusing a good signed URL as expired (403)     |

The object store (objectstore.py) takes the faults matching `objectstore.get`, and
answers error and deny as an object store does (an XML error document).
"""

from __future__ import annotations

import fnmatch
import random
from dataclasses import asdict, dataclass, fields
from typing import Any

KINDS = (
    "latency",
    "error",
    "envelope",
    "deny",
    "garbage",
    "nodata",
    "bloat",
    "reset",
    "short",
    "stall",
    "bandwidth",
    "corrupt",
    "expired",
)
BODY_KINDS = ("reset", "short", "stall", "bandwidth", "corrupt")


class FaultError(ValueError):
    """A fault specification that does not make sense."""


@dataclass
class Fault:
    kind: str
    match: str = "*"
    share: float = 1.0
    times: int | None = None
    seconds: float = 0.0
    status: int = 0
    code: int = 99500
    after: int = 0
    rate: float = 0.0
    size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultError(f"unknown fault kind {self.kind!r} (one of: {', '.join(KINDS)})")
        if not 0.0 <= self.share <= 1.0:
            raise FaultError("share must be between 0 and 1")
        if self.times is not None and self.times < 0:
            raise FaultError("times must not be negative")
        if self.kind == "error" and not self.status:
            self.status = 503
        if self.kind == "envelope" and not self.status:
            self.status = 200
        if self.kind == "bandwidth" and self.rate <= 0:
            raise FaultError("a bandwidth fault needs rate > 0 (bytes per second)")
        if self.kind == "bloat" and self.size <= 0:
            raise FaultError("a bloat fault needs size > 0 (bytes of padding)")
        if self.kind in ("latency", "stall") and self.seconds <= 0:
            raise FaultError(f"a {self.kind} fault needs seconds > 0")

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Fault:
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(doc) - set(known)
        if unknown:
            raise FaultError(f"unknown fault field {sorted(unknown)[0]!r}")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise FaultError(str(exc)) from None

    @classmethod
    def from_spec(cls, spec: str) -> Fault:
        """'error:status=503,share=0.2,match=files.*' -> Fault."""
        kind, _, rest = spec.partition(":")
        doc: dict[str, Any] = {"kind": kind.strip()}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise FaultError(f"fault option {item!r} is not key=value")
            key = key.strip()
            if key in ("match", "kind"):
                doc[key] = value
            elif key in ("share", "seconds", "rate"):
                doc[key] = _number(value, key, float)
            elif key in ("times", "status", "code", "after", "size"):
                doc[key] = _number(value, key, int)
            else:
                raise FaultError(f"unknown fault option {key!r}")
        return cls.from_dict(doc)

    def applies_to(self, kind: str) -> bool:
        return fnmatch.fnmatchcase(kind, self.match) and self.times != 0


def _number(value: str, key: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise FaultError(f"fault option {key} takes a number, not {value!r}") from None


class Faults:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.active: list[Fault] = []
        self.fired: dict[str, int] = {}

    def replace(self, faults: list[Fault], seed: int | None = None) -> None:
        self.active = list(faults)
        self.fired = {}
        if seed is not None:
            self.seed = seed
            self.rng = random.Random(seed)

    def pick(self, kind: str) -> list[Fault]:
        """The faults that fire for one request of this kind (each rolled once)."""
        chosen = []
        for fault in self.active:
            if fault.applies_to(kind) and self.rng.random() < fault.share:
                if fault.times is not None:
                    fault.times -= 1
                self.fired[fault.kind] = self.fired.get(fault.kind, 0) + 1
                chosen.append(fault)
        return chosen

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "faults": [asdict(f) for f in self.active],
            "fired": dict(self.fired),
        }
