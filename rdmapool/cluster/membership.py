"""Membership records: what a memory server publishes about itself under `<prefix>/members/<id>`.

Theory of operation
-------------------
A record is attached to the server's lease, so it disappears when the server stops refreshing (dead, or cut
off from etcd for a TTL). `state` is the server's own statement: JOINING (registered, not yet serving),
ACTIVE (place shards here), DRAINING (move my shards away; I leave when the map no longer lists me).
Placement weighs a server by its capacity (host + GPU bytes); only ACTIVE servers get weight. The record is
msgpack; decoding validates every field (a bad record is skipped by readers, never fatal).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from rdmapool.cluster.placement import Node
from rdmapool.errors import ProtocolError, UsageError


class MemberState(enum.Enum):
    JOINING = "joining"
    ACTIVE = "active"
    DRAINING = "draining"


@dataclass(frozen=True)
class MemberRecord:
    id: str
    control: str  # "host:port" of the server's control endpoint
    capacity_host: int  # bytes
    capacity_gpu: int = 0
    host: str = ""
    rack: str = ""
    zone: str = ""
    state: MemberState = MemberState.JOINING
    #: transport name -> that transport's peer_info (msgpack-able)
    endpoints: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id or "/" in self.id:
            raise UsageError(f"member id must be non-empty without '/', got {self.id!r}")
        if self.capacity_host < 0 or self.capacity_gpu < 0:
            raise UsageError("member capacity must be >= 0")

    @property
    def capacity(self) -> int:
        return self.capacity_host + self.capacity_gpu

    def node(self) -> Node:
        """The placement input: only ACTIVE members carry weight."""
        cap = self.capacity if self.state is MemberState.ACTIVE else 0
        return Node(self.id, float(cap), rack=self.rack, host=self.host or self.id, zone=self.zone)

    def with_state(self, state: MemberState) -> MemberRecord:
        return replace(self, state=state)

    def encode(self) -> bytes:
        return msgpack.packb({
            "id": self.id, "control": self.control, "cap_host": self.capacity_host, "cap_gpu": self.capacity_gpu,
            "host": self.host, "rack": self.rack, "zone": self.zone, "state": self.state.value,
            "endpoints": self.endpoints,
        })

    @classmethod
    def decode(cls, raw: bytes) -> MemberRecord:
        try:
            d = msgpack.unpackb(raw, raw=False)
            return cls(id=str(d["id"]), control=str(d["control"]), capacity_host=int(d["cap_host"]),
                       capacity_gpu=int(d.get("cap_gpu", 0)), host=str(d.get("host", "")),
                       rack=str(d.get("rack", "")), zone=str(d.get("zone", "")),
                       state=MemberState(d.get("state", "joining")), endpoints=dict(d.get("endpoints") or {}))
        except Exception as exc:
            raise ProtocolError(f"malformed member record: {exc}") from exc
