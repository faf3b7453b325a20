"""Leak checks run after every server/client test: no shm segment of this process and no child process
outlives the test."""

from __future__ import annotations

import os
import time
from pathlib import Path


def shm_segments() -> list[str]:
    pid = os.getpid()
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("rdmapool.") and f".{pid}." in n)


def children() -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def check(before_children: set[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = set(children()) - before_children
        if not left and not shm_segments():
            return
        time.sleep(0.05)
    raise AssertionError(f"leaked: child processes {sorted(set(children()) - before_children)}, "
                         f"shm segments {shm_segments()}")
