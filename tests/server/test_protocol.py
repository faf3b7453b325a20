"""The sans-IO server session: auth, tenant from token only, validation, errors close only that session."""

from __future__ import annotations

import struct

import msgpack
import pytest

from rdmapool.server import wire
from rdmapool.server.protocol import Handler, ServerInfo, ServerSession, SessionState
from tests.server.test_core import key, make_core


@pytest.fixture
def handler() -> Handler:
    core = make_core()
    return Handler(core, core.config, ServerInfo("srv", "127.0.0.1", 1, "local", 7))


def frame(**fields) -> bytes:
    return wire.encode({"v": wire.VERSION, **fields})


def u64s(*values: int) -> bytes:
    return wire.pack_u64s(values)


def grants(reply: dict) -> list[tuple[int, ...]]:
    """An allocate reply's grants: (status, addr, rkey, generation, capacity) each."""
    return list(wire.GRANT.iter_unpack(reply["grants"]))


def replies(data: bytes) -> list[dict]:
    dec = wire.FrameDecoder(1 << 20)
    dec.feed(data)
    return list(dec.messages())


def hello(session: ServerSession, token: str = "token-a-secret") -> dict:
    (r,) = replies(session.receive(frame(id=1, op="hello", token=token), 0.0))
    return r


def test_hello_names_tenant_from_token(handler: Handler) -> None:
    s = ServerSession(handler)
    r = hello(s)
    assert r["ok"] and r["tenant"] == "a" and s.state is SessionState.READY
    assert r["size_classes"] == [1024]


def test_bad_token_closes(handler: Handler) -> None:
    s = ServerSession(handler)
    r = hello(s, "wrong-token-xx")
    assert not r["ok"] and r["kind"] == "AuthError" and s.closed


def test_request_before_hello_is_refused(handler: Handler) -> None:
    s = ServerSession(handler)
    (r,) = replies(s.receive(frame(id=5, op="lookup", keys=key(1)), 0.0))
    assert not r["ok"] and r["id"] == 5 and s.closed


def test_tenant_field_in_request_is_ignored(handler: Handler) -> None:
    """A client cannot pick its tenant: a 'tenant' field is not read by any op."""
    sa, sb = ServerSession(handler), ServerSession(handler)
    hello(sa)
    hello(sb, "token-b-secret")
    (r,) = replies(sa.receive(frame(id=2, op="allocate", keys=key(1), lengths=u64s(10)), 0.0))
    gen = grants(r)[0][3]
    replies(sa.receive(frame(id=3, op="commit", keys=key(1), generations=u64s(gen)), 0.0))
    (ra,) = replies(sa.receive(frame(id=4, op="lookup", keys=key(1), tenant="b"), 0.0))
    (rb,) = replies(sb.receive(frame(id=4, op="lookup", keys=key(1), tenant="a"), 0.0))
    assert len(ra["hits"]) == wire.HIT.size and rb["hits"] == b""


def test_pipelined_requests_in_one_chunk_and_split_frames(handler: Handler) -> None:
    s = ServerSession(handler)
    hello(s)
    data = frame(id=10, op="lookup", keys=key(1)) + frame(id=11, op="stats")
    out = b""
    for i in range(len(data)):  # byte by byte: a truncated frame simply waits
        out += s.receive(data[i : i + 1], 0.0)
    assert [r["id"] for r in replies(out)] == [10, 11]


@pytest.mark.parametrize(
    "bad",
    [
        struct.pack(">I", 0),
        struct.pack(">I", (1 << 20) + 1) + b"x",
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",
        wire._LEN.pack(2) + msgpack.packb([1]),
        frame(id=2, op="nope"),
        frame(id=2, op="lookup", keys=b"short"),
        frame(id=2, op="lookup", keys="notbinary"),
        frame(id=2, op="lookup", keys=[key(1)]),  # version 1's list of keys
        frame(id=2, op="lookup", keys=key(1) + b"x"),
        frame(id=2, op="allocate", keys=key(1), lengths=[1]),  # version 2's list of lengths
        frame(id=2, op="allocate", keys=key(1), lengths=u64s(1, 2)),
        frame(id=2, op="allocate", keys=key(1), lengths=u64s(1)[:7]),
        frame(id=2, op="allocate", keys=key(1)),
        frame(id=2, op="commit", items=[[key(1), 5]]),  # version 2's items
        frame(id=2, op="commit", keys=key(1)),
        frame(id=2, op="commit", keys=key(1), generations=u64s(5, 6)),
        frame(id=2, op="abort", keys=key(1) * 2, generations=u64s(5)),
        frame(id=2, op="abort", keys=key(1), generations=5),
        frame(id=2, op="allocate", keys=key(1), lengths=u64s(1), hints=[[b"short", 0, 0]]),
        frame(id=2, op="allocate", keys=key(1), lengths=u64s(1), hints=[[None, -2, 0]]),
        frame(id=2, op="allocate", keys=key(1), lengths=u64s(1), hints=[]),
        frame(id=-1, op="stats"),
        wire.encode({"v": 99, "id": 1}),
        wire._LEN.pack(len(msgpack.packb({"v": wire.VERSION, "id": msgpack.ExtType(5, b"x")})))
        + msgpack.packb({"v": wire.VERSION, "id": msgpack.ExtType(5, b"x")}),
    ],
)
def test_malformed_frames_close_the_session_with_an_error(handler: Handler, bad: bytes) -> None:
    s = ServerSession(handler)
    hello(s)
    out = replies(s.receive(bad, 0.0))
    assert s.closed and out and not out[-1]["ok"]
    assert handler.core.counters["protocol_errors"] == 1
    assert s.receive(frame(id=3, op="stats"), 0.0) == b""  # nothing more is served on it


def test_too_many_keys_refused(handler: Handler) -> None:
    s = ServerSession(handler)
    hello(s)
    (r,) = replies(s.receive(frame(id=2, op="lookup", keys=key(1) * 5000), 0.0))
    assert not r["ok"] and "at most" in r["error"]


def test_allocate_with_hints(handler: Handler) -> None:
    s = ServerSession(handler)
    hello(s)
    (r,) = replies(s.receive(frame(id=2, op="allocate", keys=key(2), lengths=u64s(5), hints=[[key(1), 1, 16]]),
                             0.0))
    assert r["ok"] and grants(r)[0][0] == 0
    assert handler.core.tenants["a"].index[key(2)].hint.parent == key(1)


def test_other_protocol_version_gets_an_error_naming_both(handler: Handler) -> None:
    s = ServerSession(handler)
    (r,) = replies(s.receive(wire.encode({"v": 1, "id": 1, "op": "hello", "token": "token-a-secret"}), 0.0))
    assert not r["ok"] and r["v"] == wire.VERSION and s.closed
    assert f"version 1 not supported (this side speaks {wire.VERSION})" in r["error"]


def test_keys_travel_as_one_blob(handler: Handler) -> None:
    s = ServerSession(handler)
    hello(s)
    keys = [key(i) for i in range(3)]
    (r,) = replies(s.receive(frame(id=2, op="allocate", keys=wire.pack_keys(keys), lengths=u64s(1, 2, 3)), 0.0))
    items = [[k, g[3]] for k, g in zip(keys, grants(r), strict=True)]
    (r,) = replies(s.receive(frame(id=3, op="commit", keys=wire.pack_keys(keys),
                                   generations=u64s(*(g for _, g in items))), 0.0))
    assert r["results"] == [True] * 3
    (r,) = replies(s.receive(frame(id=4, op="lookup", keys=wire.pack_keys([keys[0], key(9), keys[2]]),
                                   prefix=False), 0.0))
    recs = list(wire.HIT.iter_unpack(r["hits"]))
    assert [rec[3] for rec in recs] == [1, 0, 3] and recs[1] == (0, 0, 0, 0)
    assert [rec[2] for rec in recs] == [items[0][1], 0, items[2][1]]
    (r,) = replies(s.receive(frame(id=5, op="lookup", keys=b""), 0.0))
    assert r["ok"] and r["hits"] == b""
