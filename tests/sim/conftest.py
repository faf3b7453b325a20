"""Where the shipped traces are: `../shared/traces` beside the repository (as CI clones it), or
$RDMAPOOL_TRACES. Tests that need them skip, saying why, when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def traces_dir() -> Path:
    return Path(os.environ.get("RDMAPOOL_TRACES", REPO.parent / "shared" / "traces"))


@pytest.fixture
def shipped_trace():
    def get(name: str) -> Path:
        path = traces_dir() / name
        if not path.is_file():
            pytest.skip(f"trace {path} not found (set RDMAPOOL_TRACES to the traces folder)")
        return path

    return get
