"""The server side of the control protocol as a sans-IO state machine: bytes and a time in, bytes out.

Theory of operation
-------------------
A `ServerSession` is one control connection. It starts in AWAIT_HELLO: the only legal request is `hello` with
a token; the token names the tenant (the client never says which tenant it is). Then READY: each request is
validated field by field and handed to the `PoolCore` with the tenant of this session, and the reply is framed.
Any protocol violation (bad frame, bad field, unknown op, wrong version, bad token) produces an error reply and
moves the session to CLOSED; the driver then closes that socket. Nothing here touches a socket or a clock.

Requests and replies (every request also has `v`, `id`, `op`; every reply `v`, `id`, `ok`). `keys` is always
one binary string of 16 bytes per key (`wire.pack_keys`); `lengths` and `generations` one of 8 bytes (a u64 LE)
per key (`wire.pack_u64s`):
    hello     {token}                 -> {tenant, server_id, epoch, transport, peer_info, lease_s, max_keys,
                                          max_frame, size_classes}
    lookup    {keys, prefix=true}     -> {hits: bytes, 32 per hit: addr, rkey, generation, length as u64 LE;
                                          generation 0 marks a miss (prefix=false only)}
    allocate  {keys, lengths: bytes, hints?}
                                      -> {grants: bytes, 40 per key: status, addr, rkey, generation, capacity
                                          as u64 LE (all but the status 0 unless it is OK)}
    commit    {keys, generations}     -> {results: [bool, ...]}
    abort     {keys, generations}     -> {results: [bool, ...]}
    delete    {keys}                  -> {results: [bool, ...]}
    touch     {keys}                  -> {count}
    stats     {}                      -> {stats: {...}}
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from rdmapool.config import ServerConfig
from rdmapool.errors import AuthError, InternalError, ProtocolError, UsageError
from rdmapool.server import wire
from rdmapool.server.core import AllocStatus, PoolCore
from rdmapool.server.slots import BlockHint

log = logging.getLogger(__name__)

_REFUSED = wire.GRANT.pack(AllocStatus.REFUSED.value, 0, 0, 0, 0)
#: the `stats` op counts leased slots only up to this pool size (the metrics endpoint always counts them)
LEASE_SCAN_MAX_SLOTS = 1 << 16


class SessionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a client (or the membership layer) needs to know about a running server."""

    server_id: str
    host: str
    port: int
    transport: str
    epoch: int
    peer_info: dict = field(default_factory=dict)
    metrics_port: int | None = None
    capacity: int = 0

    def to_dict(self) -> dict:
        return {"server_id": self.server_id, "host": self.host, "port": self.port, "transport": self.transport,
                "epoch": self.epoch, "peer_info": self.peer_info, "metrics_port": self.metrics_port,
                "capacity": self.capacity}


class Handler:
    """Shared by all sessions of one server: the core, the token table and what `hello` tells clients."""

    def __init__(self, core: PoolCore, config: ServerConfig, info: ServerInfo) -> None:
        self.core = core
        self.config = config
        self.info = info
        self._tokens = [(t.token.encode(), t.name) for t in config.tenants]
        #: seam for the cluster layer: while it returns False, allocate refuses every key (REFUSED)
        self.write_gate: Callable[[], bool] | None = None
        self.ops: dict[str, Callable[[str, dict, float], dict]] = {
            "lookup": self._lookup, "allocate": self._allocate, "commit": self._commit, "abort": self._abort,
            "delete": self._delete, "touch": self._touch, "stats": self._stats,
        }

    def authenticate(self, token: str) -> str:
        given = token.encode()
        tenant = None
        for known, name in self._tokens:  # compare against every token, in constant time each
            if hmac.compare_digest(given, known):
                tenant = name
        if tenant is None:
            raise AuthError("unknown token")
        return tenant

    def hello_reply(self, tenant: str) -> dict:
        return {"tenant": tenant, "server_id": self.info.server_id, "epoch": self.info.epoch,
                "transport": self.info.transport, "peer_info": self.info.peer_info, "lease_s": self.config.lease_s,
                "max_keys": self.config.max_keys, "max_frame": self.config.max_frame,
                "size_classes": [c.capacity for c in self.core.tenants[tenant].classes]}

    def _keys(self, msg: dict) -> tuple[bytes, ...]:
        return wire.get_keys(msg, "keys", self.config.max_keys)

    def _lookup(self, tenant: str, msg: dict, now: float) -> dict:
        prefix = wire.get_bool(msg, "prefix", True)
        return {"hits": self.core.lookup_wire(tenant, self._keys(msg), now, prefix)}

    def _allocate(self, tenant: str, msg: dict, now: float) -> dict:
        keys = self._keys(msg)
        lengths = wire.get_u64s(msg, "lengths", len(keys))
        if self.write_gate is not None and not self.write_gate():
            self.core.counters["writes_refused"] += len(keys)
            return {"grants": _REFUSED * len(keys)}
        return {"grants": self.core.allocate_wire(tenant, keys, lengths, now, self._hints(msg, len(keys)))}

    def _hints(self, msg: dict, n: int) -> list[BlockHint] | None:
        """Optional per-key `hints: [[parent key | nil, depth, tokens], ...]` for the eviction policy."""
        if msg.get("hints") is None:
            return None
        raw = wire.get_list(msg, "hints", self.config.max_keys)
        if len(raw) != n:
            raise ProtocolError("allocate: hints must have one entry per key")
        out = []
        for i, h in enumerate(raw):
            if not (isinstance(h, list) and len(h) == 3):
                raise ProtocolError(f"hints[{i}] must be [parent, depth, tokens]")
            parent, depth, tokens = h
            if parent is not None:
                wire.check_key(parent, f"hints[{i}] parent")
            for v, lo in ((depth, -1), (tokens, 0)):
                if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < 2**31:
                    raise ProtocolError(f"hints[{i}]: depth >= -1 and tokens >= 0, both below 2**31")
            out.append(BlockHint(parent, depth, tokens))
        return out

    def _commit(self, tenant: str, msg: dict, now: float) -> dict:
        return {"results": self.core.commit(tenant, self._key_generations(msg), now)}

    def _abort(self, tenant: str, msg: dict, now: float) -> dict:
        return {"results": self.core.abort(tenant, self._key_generations(msg), now)}

    def _key_generations(self, msg: dict) -> list[tuple[bytes, int]]:
        keys = self._keys(msg)
        return list(zip(keys, wire.get_u64s(msg, "generations", len(keys)), strict=True))

    def _delete(self, tenant: str, msg: dict, now: float) -> dict:
        return {"results": self.core.delete(tenant, self._keys(msg), now)}

    def _touch(self, tenant: str, msg: dict, now: float) -> dict:
        return {"count": self.core.touch(tenant, self._keys(msg), now)}

    def _stats(self, tenant: str, msg: dict, now: float) -> dict:
        """This tenant's slots, the server-wide counters and settings: any tenant's token may ask, so other
        tenants' names and usage stay out (the operator's /metrics endpoint shows them)."""
        snap = self.core.snapshot(now, count_leases=False)
        mine = snap["tenants"][tenant]
        classes = self.core.tenants[tenant].classes
        # counting leases scans every slot, which would stall this server's loop on a big pool
        if sum(len(cls.slots) for cls in classes) <= LEASE_SCAN_MAX_SLOTS:
            for cls, c in zip(classes, mine["classes"], strict=True):
                c["leased"] = cls.leased(now)
        return {"stats": {"server": self.info.to_dict(), "config": self.config.settings(),
                          "tenants": {tenant: mine}, "counters": snap["counters"]}}


class ServerSession:
    """One control connection's protocol state. Feed bytes with `receive`; send what it returns."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.state = SessionState.AWAIT_HELLO
        self.tenant: str | None = None
        self.close_reason = ""
        self._decoder = wire.FrameDecoder(handler.config.max_frame)

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def receive(self, data: bytes | memoryview, now: float) -> bytes:
        """Process `data`; return the reply bytes (possibly several frames). After an error the session is
        CLOSED and the returned bytes end with the error reply."""
        if self.closed:
            return b""
        out: list[bytes] = []
        self._decoder.feed(data)
        try:
            for msg in self._decoder.messages():
                out.append(self._handle(msg, now))
                if self.closed:
                    break
        except ProtocolError as exc:
            out.append(self._fail(0, exc))
        return b"".join(out)  # one reply: itself, no copy

    def eof(self) -> None:
        """The peer closed its side; a partial frame left over is a truncated frame."""
        if not self.closed:
            self.state = SessionState.CLOSED
            self.close_reason = "truncated frame at EOF" if self._decoder.pending else "peer closed"
            if self._decoder.pending:
                self.handler.core.counters["protocol_errors"] += 1

    def _handle(self, msg: dict, now: float) -> bytes:
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**32:
            return self._fail(0, ProtocolError("field 'id' must be a 32-bit unsigned integer"))
        try:
            op = wire.get_str(msg, "op", 32)
            if self.state is SessionState.AWAIT_HELLO:
                if op != "hello":
                    raise AuthError(f"first request must be hello, got {op!r}")
                self.tenant = self.handler.authenticate(wire.get_str(msg, "token", 1024))
                self.state = SessionState.READY
                return self._reply(rid, self.handler.hello_reply(self.tenant))
            handler = self.handler.ops.get(op)
            if handler is None:
                raise ProtocolError(f"unknown op {op!r}")
            self.handler.core.counters[f"op_{op}"] += 1
            return self._reply(rid, handler(self.tenant, msg, now))
        except (ProtocolError, AuthError, UsageError) as exc:
            return self._fail(rid, exc)
        except Exception as exc:  # a bug of ours: this client's session ends, the server and others go on
            log.exception("internal error serving %r", msg.get("op"))
            self.handler.core.counters["internal_errors"] += 1
            return self._fail(rid, InternalError(f"internal server error ({type(exc).__name__})"), count=False)

    def _reply(self, rid: int, fields: dict) -> bytes:
        return wire.encode({"v": wire.VERSION, "id": rid, "ok": True, **fields})

    def _fail(self, rid: int, exc: Exception, count: bool = True) -> bytes:
        self.state = SessionState.CLOSED
        self.close_reason = f"{type(exc).__name__}: {exc}"
        if count:
            self.handler.core.counters["auth_failures" if isinstance(exc, AuthError) else "protocol_errors"] += 1
        return wire.encode({"v": wire.VERSION, "id": rid, "ok": False, "kind": type(exc).__name__, "error": str(exc)})
