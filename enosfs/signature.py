"""The EnOS token-service signature, shared by the client and the emulator.

Both sides must compute it identically, so it lives in one place.
"""

from __future__ import annotations

import hashlib


def token_signature(app_key: str, timestamp_ms: int | str, app_secret: str) -> str:
    """Lowercase hex SHA-256 of appKey + timestamp + appSecret, with no separators."""
    text = f"{app_key}{timestamp_ms}{app_secret}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
