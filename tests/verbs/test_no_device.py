"""Where there is no RDMA device (these CI machines), create('verbs') must fail at once, naming the missing
piece and the alternatives."""

import os
import sys

import pytest

from rdmapool.errors import NoDevice
from rdmapool.transport import create, verbs_enums

HAS_DEVICE = os.path.isdir("/sys/class/infiniband") and bool(os.listdir("/sys/class/infiniband"))


@pytest.mark.skipif(HAS_DEVICE, reason="this host has an RDMA device: the no-device path cannot be seen here")
def test_create_without_device_names_the_problem_and_the_alternatives():
    pytest.importorskip("pyverbs.device", reason="python3-pyverbs is not importable here")
    with pytest.raises(NoDevice) as info:
        create("verbs")
    msg = str(info.value)
    assert "no RDMA devices" in msg and "transport=tcp" in msg and "scripts/vm/exec.sh" in msg


def test_missing_pyverbs_is_named(monkeypatch):
    for name in [m for m in sys.modules if m == "pyverbs" or m.startswith("pyverbs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyverbs", None)  # makes every `import pyverbs...` fail
    monkeypatch.setattr(verbs_enums, "_table", None)
    with pytest.raises(NoDevice, match="needs pyverbs.*transport=tcp"):
        create("verbs")


def test_unknown_options_are_usage_errors():
    from rdmapool.errors import UsageError
    from rdmapool.transport.verbs import VerbsTransport

    with pytest.raises(UsageError, match="options"):
        VerbsTransport(devcie="rxe0")
