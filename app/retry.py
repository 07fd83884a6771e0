"""What a server's `Retry-After` asks for, read once for every client of ours (the critic
client, `srft ingest`). Pure."""

from __future__ import annotations

import math
from typing import Any

# The longest wait a Retry-After header can ask for; longer (or infinite) asks are capped.
MAX_RETRY_AFTER_S = 600.0


def retry_after_s(headers: Any) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header, when the server sent one."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    seconds = headers.get("retry-after")
    try:
        if milliseconds is not None:
            wait = float(milliseconds) / 1000
        elif seconds is not None:
            wait = float(seconds)
        else:
            return None
    except ValueError:
        return None  # an HTTP date: rare from LLM endpoints; fall back to our backoff
    if not math.isfinite(wait):
        return None
    # A server may say anything; no one call waits longer than this before trying again.
    return min(max(0.0, wait), MAX_RETRY_AFTER_S)
