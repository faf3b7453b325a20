"""Host-side verbs tests: no RDMA device needed. Those that build real pyverbs objects skip (with the reason)
where Debian's python3-pyverbs is not importable."""

from __future__ import annotations

import pytest


@pytest.fixture()
def pyverbs_enums():
    return pytest.importorskip("pyverbs.enums", reason="python3-pyverbs is not importable here")
