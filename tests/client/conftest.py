from __future__ import annotations

import pytest

from tests.support import leaks


@pytest.fixture(autouse=True)
def _no_leaks():
    before = set(leaks.children())
    yield
    leaks.check(before)
