"""Folders named the way people know their devices: /ORG/by-name and /ORG/by-key.

Real asset ids are opaque (`Xb7pQ2Lm`); people say "WTG-017 Nacelle", or a product
and device key. Beside the asset folders, an organisation shows

    by-name/DEVICE_NAME             -> ../ASSET
    by-key/PRODUCT_KEY/DEVICE_KEY   -> ../../ASSET

as symbolic links, so `cd`, `realpath` and `find -L` reach the asset's own folder and
a plain `find` lists no file twice. They are made from the device search answers the
organisation's listing fetched anyway: they cost no call of their own, and they exist
only where the app may search devices (without search there is nothing to make them
from, and a view that showed only configured assets would be a lie by omission).

One exception: a device that configured files name by product and device key, and
that no search found, has no asset id to link to. by-key/PRODUCT_KEY/DEVICE_KEY is then
that device's own folder (its configured files), and every call for it names it by
its keys; so by-key shows where search is denied if there are such devices.

This module decides the names; the tree (namespace.py) gives them nodes. Names follow
the rules of naming.py, and clashes are settled by asset id, never by the order search
answered in, so the same organisation always gives the same names. The two folder
names are reserved in the organisation folder: an asset whose id is `by-name` (no EnOS
asset id is: EnOS makes ids of letters and digits) is shown as `by-name~2`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from enosfs.api import Device
from enosfs.naming import safe_name, settle

BY_NAME = "by-name"
BY_KEY = "by-key"
VIEW_NAMES = (BY_KEY, BY_NAME)


@dataclass(frozen=True)
class Known:
    """What device search said of one device that people name it by."""

    asset_id: str
    name: str
    product_key: str
    device_key: str


def known_of(devices: Iterable[Device]) -> list[Known]:
    return [Known(d.asset_id, d.name, d.product_key, d.device_key) for d in devices]


def by_name(known: Iterable[Known]) -> dict[str, str]:
    """Link name -> asset id. A device without a name is left out (its id is its only
    name). Devices that make the same safe name are told apart by `~2`, `~3`: a name
    that is its own safe name keeps it (so "a_b" never moves because an "a/b" came),
    then in asset id order."""
    named = sorted((k for k in known if k.name.strip()), key=lambda k: k.asset_id)
    names = settle((_wanted(k.name, k.asset_id) for k in named), extensions=False)
    return dict(zip(names, (k.asset_id for k in named), strict=True))


def by_key(known: Iterable[Known]) -> dict[str, dict[str, Known]]:
    """Product folder name -> {device name -> the device}. A device without both keys
    is left out. Keys are unique in EnOS, but two may still make one safe name (`a/b`
    and `a_b`): settled as by_name does. A device may come without an asset id (one a
    configured file names by key that search did not find)."""
    keyed = sorted(
        (k for k in known if k.product_key.strip() and k.device_key.strip()),
        key=lambda k: (k.product_key, k.device_key, k.asset_id),
    )
    products = sorted({k.product_key for k in keyed})
    folders = dict(
        zip(
            products,
            settle((_wanted(p, p) for p in products), extensions=False),
            strict=True,
        )
    )
    grouped: dict[str, list[Known]] = {}
    for k in keyed:
        grouped.setdefault(k.product_key, []).append(k)
    out: dict[str, dict[str, Known]] = {}
    for product, devices in grouped.items():
        names = settle(
            (_wanted(k.device_key, k.device_key, k.asset_id) for k in devices), extensions=False
        )
        out[folders[product]] = dict(zip(names, devices, strict=True))
    return out


def _wanted(raw: str, *tie: str) -> tuple[str, tuple[str, ...]]:
    """(safe name, settling key) for naming.settle: a name already safe sorts first."""
    name = safe_name(raw)
    return name, ("0" if name == raw else "1", *tie)
