"""Shared by the benchmarks: --record output, machine facts and the code's version."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, payload: dict) -> Path:
    import numpy

    now = dt.datetime.now(dt.UTC)
    payload = dict(payload, machine={"node": platform.node(), "cpu_count": os.cpu_count(),
                                     "platform": platform.platform(), "python": sys.version.split()[0],
                                     "numpy": numpy.__version__},
                   date=now.isoformat(timespec="seconds"))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def code_version() -> str | None:
    """The checkout's commit: $RDMAPOOL_CODE (for a copied tree without .git), else git's answer."""
    import subprocess

    if os.environ.get("RDMAPOOL_CODE"):
        return os.environ["RDMAPOOL_CODE"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent.parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
