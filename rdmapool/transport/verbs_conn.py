"""Verbs connection information and queue-pair parameter negotiation (pure: no pyverbs, no sockets).

Theory of operation
-------------------
Two RC queue pairs connect by swapping, over any control channel, what each side's device and port look like
(`PortInfo`) and the number and starting PSN of each queue pair (`QpInfo`). Both sides then compute the same
`QpParams` from the two `PortInfo`s with `negotiate`, so nothing but facts about the devices travels:

- path MTU = the smaller of the two ports' active MTU;
- max_rd_atomic (READs/atomics this QP may have in flight as initiator) = min(our device's max_qp_init_rd_atom,
  the peer device's max_qp_rd_atom); max_dest_rd_atomic (ones we accept as responder) = min(our max_qp_rd_atom,
  the peer's max_qp_init_rd_atom). rdma-core's tests use 1, which serialises reads (FACTS.md 2b);
- ack timeout and retry count are ours to choose; a dead peer is detected after
  `dead_peer_seconds(timeout, retry_cnt)` = 4.096 us * 2**timeout * (retry_cnt + 1). The defaults (17, 7) give
  ~4.3 s: long enough for a TCG VM (45 ms per small round trip between two VMs) and for a congested fabric,
  short enough that a client falls back to a miss quickly. RNR retry is irrelevant to one-sided operations.

Wire form: plain dicts/lists of ints and strings (msgpack-able), versioned, validated on the way in
(`ProtocolError` for anything malformed) because they arrive from peers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rdmapool.errors import ProtocolError, UsageError

WIRE_VERSION = 1
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}  # ibv_mtu enum value -> bytes
LINK_LAYERS = ("ethernet", "infiniband")
DEFAULT_TIMEOUT = 17
DEFAULT_RETRY_CNT = 7
MAX_RD_ATOMIC_FIELD = 255  # the QP attribute is 8 bits wide


def default_ack_timeout() -> int:
    """The QP ack timeout exponent from $RDMAPOOL_VERBS_ACK_TIMEOUT (0..31), else `DEFAULT_TIMEOUT`. A fabric that
    drops packets (RoCE without PFC; rxe under TCG, which lost ~0.8% of its packets in one CI run) recovers each
    loss one ack timeout later: at 17 (0.54 s) a READ batch that kept losing packets went 34 s without a completion
    (rxe counted 63 retries over the suite) and the watchdog failed it. A smaller exponent retries sooner (and finds a dead peer
    sooner: `dead_peer_seconds`)."""
    text = os.environ.get("RDMAPOOL_VERBS_ACK_TIMEOUT")
    if text is None or text == "":
        return DEFAULT_TIMEOUT
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 31:
        raise UsageError(f"RDMAPOOL_VERBS_ACK_TIMEOUT must be an integer 0..31 (4.096 us * 2**n), got {text!r}")
    return value


def timeout_scale() -> float:
    """Factor for handshake and watchdog timeouts from $RDMAPOOL_TIMEOUT_SCALE (>= 1, default 1). The rxe VM
    harness sets it: under TCG on a loaded host the guest's clock runs at wall speed while its CPUs run tens of
    times slower, so seconds-long bounds meant for real machines fire on work that is merely slow."""
    try:
        return max(1.0, float(os.environ.get("RDMAPOOL_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


def dead_peer_seconds(timeout: int, retry_cnt: int) -> float:
    """Time until a request to a vanished peer completes with RETRY_EXC_ERR (IB spec local ack timeout)."""
    return 4.096e-6 * (2**timeout) * (retry_cnt + 1)


@dataclass(frozen=True, slots=True)
class PortInfo:
    """What a peer needs to know about one side's device port."""

    gid: str  # 16 bytes as 32 hex digits; all zero on InfiniBand without GRH
    gid_index: int
    lid: int
    link_layer: str  # "ethernet" (RoCE, rxe) or "infiniband"
    active_mtu: int  # ibv_mtu enum value, 1..5
    max_qp_rd_atom: int  # responder resources per QP
    max_qp_init_rd_atom: int  # initiator depth per QP
    atomics: bool

    def __post_init__(self) -> None:
        if self.link_layer not in LINK_LAYERS:
            raise UsageError(f"link layer must be one of {LINK_LAYERS}, got {self.link_layer!r}")
        if self.active_mtu not in MTU_BYTES:
            raise UsageError(f"active MTU enum {self.active_mtu} is not one of {sorted(MTU_BYTES)}")
        if len(self.gid) != 32 or any(c not in "0123456789abcdef" for c in self.gid):
            raise UsageError(f"gid must be 32 lowercase hex digits, got {self.gid!r}")
        if not (0 <= self.lid < 2**16 and 0 <= self.gid_index < 2**16):
            raise UsageError(f"lid {self.lid} or gid index {self.gid_index} out of range")
        if self.max_qp_rd_atom < 1 or self.max_qp_init_rd_atom < 1:
            raise UsageError("device reports no outstanding RDMA READ capacity")

    @property
    def uses_grh(self) -> bool:
        """RoCE always routes by GID; InfiniBand by LID within a subnet."""
        return self.link_layer == "ethernet"

    def to_wire(self) -> list[Any]:
        return [self.gid, self.gid_index, self.lid, self.link_layer, self.active_mtu, self.max_qp_rd_atom,
                self.max_qp_init_rd_atom, int(self.atomics)]

    @classmethod
    def from_wire(cls, raw: Any) -> PortInfo:
        if not (isinstance(raw, list | tuple) and len(raw) == 8):
            raise ProtocolError(f"verbs port info must be a list of 8 fields, got {raw!r}")
        gid, gid_index, lid, link, mtu, rd, init_rd, atomics = raw
        if not (isinstance(gid, str) and isinstance(link, str)
                and all(isinstance(v, int) for v in (gid_index, lid, mtu, rd, init_rd, atomics))):
            raise ProtocolError(f"verbs port info has fields of the wrong type: {raw!r}")
        try:
            return cls(gid, gid_index, lid, link, mtu, rd, init_rd, bool(atomics))
        except UsageError as exc:
            raise ProtocolError(f"verbs port info rejected: {exc}") from exc


@dataclass(frozen=True, slots=True)
class QpInfo:
    qpn: int
    psn: int

    def __post_init__(self) -> None:
        if not (0 < self.qpn < 2**24 and 0 <= self.psn < 2**24):
            raise UsageError(f"qpn {self.qpn} / psn {self.psn} out of the 24-bit range")


@dataclass(frozen=True, slots=True)
class Handshake:
    """One side's half of a connection: its port and its queue pairs (the request or the reply)."""

    port: PortInfo
    qps: tuple[QpInfo, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"verbs": WIRE_VERSION, "port": self.port.to_wire(), "qps": [[q.qpn, q.psn] for q in self.qps]}

    @classmethod
    def from_wire(cls, raw: Any, max_qps: int = 64) -> Handshake:
        if not isinstance(raw, dict) or raw.get("verbs") != WIRE_VERSION:
            raise ProtocolError(f"not a verbs handshake of version {WIRE_VERSION}: {raw!r:.200}")
        qps = raw.get("qps")
        if not (isinstance(qps, list) and 0 < len(qps) <= max_qps):
            raise ProtocolError(f"verbs handshake needs 1..{max_qps} queue pairs, got {qps!r:.200}")
        infos = []
        for q in qps:
            if not (isinstance(q, list | tuple) and len(q) == 2 and all(isinstance(v, int) for v in q)):
                raise ProtocolError(f"queue pair entry must be [qpn, psn], got {q!r}")
            try:
                infos.append(QpInfo(q[0], q[1]))
            except UsageError as exc:
                raise ProtocolError(str(exc)) from exc
        return cls(PortInfo.from_wire(raw.get("port")), tuple(infos))


@dataclass(frozen=True, slots=True)
class QpParams:
    """The attributes both ends of one RC connection use for INIT -> RTR -> RTS."""

    path_mtu: int
    max_rd_atomic: int
    max_dest_rd_atomic: int
    timeout: int
    retry_cnt: int
    rnr_retry: int = 0
    min_rnr_timer: int = 12

    @property
    def dead_peer_seconds(self) -> float:
        return dead_peer_seconds(self.timeout, self.retry_cnt)


def negotiate(local: PortInfo, remote: PortInfo, timeout: int = DEFAULT_TIMEOUT,
              retry_cnt: int = DEFAULT_RETRY_CNT, rd_atomic_cap: int | None = None) -> QpParams:
    """QP attributes for our side of a connection between `local` and `remote` (see the module docstring)."""
    if local.link_layer != remote.link_layer:
        raise UsageError(f"cannot connect {local.link_layer} to {remote.link_layer}: one fabric per connection")
    if not 0 <= timeout <= 31 or not 0 <= retry_cnt <= 7:
        raise UsageError(f"ack timeout must be 0..31 and retry count 0..7, got {timeout} and {retry_cnt}")
    cap = MAX_RD_ATOMIC_FIELD if rd_atomic_cap is None else max(1, min(rd_atomic_cap, MAX_RD_ATOMIC_FIELD))
    return QpParams(
        path_mtu=min(local.active_mtu, remote.active_mtu),
        max_rd_atomic=min(local.max_qp_init_rd_atom, remote.max_qp_rd_atom, cap),
        max_dest_rd_atomic=min(local.max_qp_rd_atom, remote.max_qp_init_rd_atom, cap),
        timeout=timeout,
        retry_cnt=retry_cnt,
    )
