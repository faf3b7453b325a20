"""Polling with a deadline, for tests that watch another process or a cluster converge."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.02) -> bool:
    """True as soon as `predicate()` is truthy; after `timeout` seconds, its last value's truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
