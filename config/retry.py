"""Backoff between tries of anything transient (a job on a storage outage, a webhook POST)."""

from __future__ import annotations

import random


def full_jitter(retries: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``retries + 1``: exponential backoff with full jitter (the
    AWS architecture blog's recommendation), which spreads the retries of many callers hit
    by the same outage instead of bringing them back all at once."""
    return random.uniform(0, min(cap, base * (2**retries)))
