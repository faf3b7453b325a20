import resource

import pytest

from rdmapool.errors import NoDevice, UsageError
from rdmapool.transport import verbs_device
from rdmapool.transport.verbs_device import (
    GidEntry,
    choose_gid,
    gid_colon,
    gid_hex,
    memlock_problem,
    read_gid_table,
)

V4 = "00000000000000000000ffff0a00020f"
LINK_LOCAL = "fe800000000000005054fffe123456"+"78"
GLOBAL6 = "20010db8000000000000000000000001"


def test_gid_forms():
    assert gid_hex("0000:0000:0000:0000:0000:ffff:0a00:020f") == V4
    assert gid_colon(V4) == "0000:0000:0000:0000:0000:ffff:0a00:020f"
    with pytest.raises(UsageError):
        gid_hex("::1")


def test_roce_prefers_v2_ipv4_then_v2_ipv6():
    table = [GidEntry(0, LINK_LOCAL, "IB/RoCE v1"), GidEntry(1, LINK_LOCAL, "RoCE v2"),
             GidEntry(2, V4, "IB/RoCE v1"), GidEntry(3, V4, "RoCE v2"), GidEntry(4, GLOBAL6, "RoCE v2")]
    assert choose_gid(table, "ethernet") == 3
    assert choose_gid(table[:3] + table[4:], "ethernet") == 4
    assert choose_gid(table[:2], "ethernet") == 1  # only link-local v2 left
    assert choose_gid(table, "infiniband") == 0
    with pytest.raises(NoDevice, match="IP address"):
        choose_gid([GidEntry(0, "0" * 32, "RoCE v2")], "ethernet")


def test_gid_table_from_sysfs(tmp_path):
    port = tmp_path / "rxe0" / "ports" / "1"
    (port / "gids").mkdir(parents=True)
    (port / "gid_attrs" / "types").mkdir(parents=True)
    for i, (gid, kind) in enumerate([(LINK_LOCAL, "RoCE v2"), (V4, "RoCE v2")]):
        (port / "gids" / str(i)).write_text(gid_colon(gid) + "\n")
        (port / "gid_attrs" / "types" / str(i)).write_text(kind + "\n")
    entries = read_gid_table("rxe0", 1, 16, root=tmp_path)  # slots 2..15 missing: skipped
    assert entries == [GidEntry(0, LINK_LOCAL, "RoCE v2"), GidEntry(1, V4, "RoCE v2")]
    assert choose_gid(entries, "ethernet") == 1


def test_memlock_check(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (64 << 10, 64 << 10))
    monkeypatch.setattr(verbs_device.Path, "read_text", lambda self: "CapEff:\t0000000000000000\n")
    msg = memlock_problem(1 << 30)
    assert msg is not None and "ulimit -l unlimited" in msg and "IPC_LOCK" in msg
    assert memlock_problem(4096) is None  # fits the limit
    monkeypatch.setattr(verbs_device.Path, "read_text", lambda self: f"CapEff:\t{1 << 14:016x}\n")
    assert memlock_problem(1 << 30) is None  # CAP_IPC_LOCK lifts the limit
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    monkeypatch.setattr(verbs_device.Path, "read_text", lambda self: "CapEff:\t0000000000000000\n")
    assert memlock_problem(1 << 40) is None
