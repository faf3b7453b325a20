"""The control-protocol `stats` op: a tenant sees its own slots and the server-wide totals, never another
tenant's name or usage (any tenant's token may ask; the operator's /metrics shows every tenant)."""

from __future__ import annotations

import pytest

from rdmapool.commands.stats import render
from rdmapool.server import wire
from rdmapool.server.protocol import Handler, ServerInfo, ServerSession
from tests.server.test_core import key, make_core


@pytest.fixture
def handler() -> Handler:
    core = make_core(tenants=("alpha", "bravo"))
    return Handler(core, core.config, ServerInfo("srv", "127.0.0.1", 1, "local", 7))


def call(session: ServerSession, rid: int, op: str, **fields) -> tuple[dict, bytes]:
    raw = session.receive(wire.encode({"v": wire.VERSION, "id": rid, "op": op, **fields}), 0.0)
    dec = wire.FrameDecoder(1 << 20)
    dec.feed(raw)
    (reply,) = dec.messages()
    assert reply["ok"], reply
    return reply, raw


def session(handler: Handler, tenant: str) -> ServerSession:
    s = ServerSession(handler)
    call(s, 1, "hello", token=f"token-{tenant}-secret")
    return s


def test_stats_shows_only_the_asking_tenant(handler: Handler) -> None:
    a, b = session(handler, "alpha"), session(handler, "bravo")
    (grant,) = wire.GRANT.iter_unpack(call(b, 2, "allocate", keys=key(1), lengths=wire.pack_u64s([10]))[0]["grants"])
    call(b, 3, "commit", keys=key(1), generations=wire.pack_u64s([grant[3]]))
    stats, raw = call(a, 4, "stats")
    assert list(stats["stats"]["tenants"]) == ["alpha"] and b"bravo" not in raw
    assert stats["stats"]["tenants"]["alpha"]["classes"][0]["resident"] == 0
    assert stats["stats"]["counters"]["commits"] == 1  # server-wide totals stay, with no tenant in them
    assert "bravo" not in render(stats["stats"], None, 1.0)
    mine = call(b, 5, "stats")[0]["stats"]["tenants"]
    assert list(mine) == ["bravo"] and mine["bravo"]["classes"][0]["resident"] == 1


def test_stats_counts_leases_of_the_tenants_own_slots(handler: Handler) -> None:
    a = session(handler, "alpha")
    (grant,) = wire.GRANT.iter_unpack(call(a, 2, "allocate", keys=key(1), lengths=wire.pack_u64s([10]))[0]["grants"])
    call(a, 3, "commit", keys=key(1), generations=wire.pack_u64s([grant[3]]))
    call(a, 4, "lookup", keys=key(1))
    (cls,) = call(a, 5, "stats")[0]["stats"]["tenants"]["alpha"]["classes"]
    assert cls["leased"] == 1


def test_stats_carries_the_effective_settings_and_no_token(handler: Handler) -> None:
    stats, raw = call(session(handler, "alpha"), 2, "stats")
    assert stats["stats"]["config"] == {
        "lease_s": 10.0, "grace_s": 1.0, "reservation_s": 5.0, "ttl_s": None, "idle_ttl_s": None, "policy": "lru",
        "policy_options": {}, "size_classes": [1024], "max_keys": 4096, "idle_timeout_s": 300.0,
        "hello_timeout_s": 10.0}
    assert b"secret" not in raw
    table = render(stats["stats"], None, 1.0)
    assert "lease 10s" in table and "policy lru" in table and "classes 1KiB" in table and "ttl -" in table
