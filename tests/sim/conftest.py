"""Where the shipped traces are: `../shared/traces` beside the repository (as CI clones it), or
$RDMAPOOL_TRACES. Tests that need them skip, saying why, when they are absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdmapool.sim.trace import shipped_traces_dir


@pytest.fixture
def shipped_trace():
    def get(name: str) -> Path:
        path = shipped_traces_dir() / name
        if not path.is_file():
            pytest.skip(f"trace {path} not found (set RDMAPOOL_TRACES to the traces folder)")
        return path

    return get
