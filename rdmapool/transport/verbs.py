"""The verbs transport: one-sided READ/WRITE/CAS/FAA over RDMA RC queue pairs, through pyverbs.

Theory of operation
-------------------
At start the transport opens one device port (`verbs_device`: RoCE v2 GID on Ethernet, LID on InfiniBand) and
one protection domain; a missing piece fails here with `NoDevice`. Memory is registered once per region: memory
servers `allocate` their whole pool at start (huge pages where possible, memlock checked first); clients
register their buffers, host or GPU (`verbs_memory`).

Connecting is a two-message handshake (`verbs_conn.Handshake`): the active side creates its queue pairs in
INIT and sends their numbers and PSNs with its port facts; the passive side's `accept` creates as many queue
pairs, moves them to RTS against the request and replies with its own; the active side then moves its queue
pairs to RTS. Both derive the QP attributes (`negotiate`) from both ports. The messages are plain dicts, so a
memory server carries them over its control protocol (`connect(peer_info, exchange=client_call)`); without an
`exchange`, the built-in bootstrap listener (`verbs_bootstrap`) named in `peer_info()` carries them. The reply
names a `session`; the server calls `release(session)` when that client's control connection ends.

One endpoint is one RC queue pair, so the ordering rules of `base` hold exactly. Several queue pairs per peer
(`connect_many`, default `qps_per_peer` = 2) let a client keep transfers in flight on independent queues;
they are made in a single handshake. Passive queue pairs live until `release` or the transport closes.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rdmapool.errors import NoDevice, ProtocolError, UsageError
from rdmapool.transport import verbs_bootstrap
from rdmapool.transport.base import (
    Access,
    EndpointState,
    Exchange,
    MemoryKind,
    MemoryRegion,
    RegionDescriptor,
    Transport,
)
from rdmapool.transport.verbs_conn import (
    DEFAULT_RETRY_CNT,
    Handshake,
    PortInfo,
    QpInfo,
    QpParams,
    default_ack_timeout,
    negotiate,
)
from rdmapool.transport.verbs_device import gid_colon, is_ipv4_mapped, memlock_problem, open_device
from rdmapool.transport.verbs_endpoint import VerbsEndpoint
from rdmapool.transport.verbs_enums import enums, import_pyverbs
from rdmapool.transport.verbs_memory import buffer_address, map_host, register_gpu

MAX_QPS_PER_HANDSHAKE = 64


@dataclass(frozen=True, slots=True)
class VerbsOptions:
    device: str | None = None
    port: int | None = None
    gid_index: int | None = None
    qps_per_peer: int = 2
    sq_depth: int = 2048
    timeout: int = field(default_factory=default_ack_timeout)  # $RDMAPOOL_VERBS_ACK_TIMEOUT, else 17
    retry_cnt: int = DEFAULT_RETRY_CNT
    rd_atomic_cap: int | None = None
    stall_timeout: float | None = None  # see verbs_endpoint: default 2x the dead-peer time, >= 5 s
    bootstrap_host: str | None = None


@dataclass(eq=False)
class _Qp:
    qp: Any
    cq: Any
    psn: int


def access_flags(e: Any, access: Access) -> int:
    flags = 0
    for ours, name in ((Access.LOCAL_WRITE, "IBV_ACCESS_LOCAL_WRITE"), (Access.REMOTE_WRITE, "IBV_ACCESS_REMOTE_WRITE"),
                       (Access.REMOTE_READ, "IBV_ACCESS_REMOTE_READ"),
                       (Access.REMOTE_ATOMIC, "IBV_ACCESS_REMOTE_ATOMIC")):
        if access & ours:
            flags |= getattr(e, name)
    if flags & (e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_ATOMIC):
        flags |= e.IBV_ACCESS_LOCAL_WRITE  # verbs requires it for remote write/atomic
    return flags


class VerbsTransport(Transport):
    name = "verbs"

    def __init__(self, **options: Any) -> None:
        try:
            self.options = VerbsOptions(**options)
        except TypeError as exc:
            raise UsageError(f"verbs transport options: {exc}") from exc
        if self.options.qps_per_peer < 1 or self.options.sq_depth < 4:
            raise UsageError("qps_per_peer must be >= 1 and sq_depth >= 4")
        self._e = enums()
        self._mods = {m: import_pyverbs(m) for m in ("pd", "cq", "qp", "mr", "addr")}
        self._ctx, self.device = open_device(self.options.device, self.options.port, self.options.gid_index)
        attr = self._ctx.query_device()
        self._sq_depth = min(self.options.sq_depth, int(attr.max_qp_wr))
        self._max_sge = min(16, int(attr.max_sge))
        self._pd = self._mods["pd"].PD(self._ctx)
        self._lock = threading.Lock()
        self._regions: dict[int, MemoryRegion] = {}
        self._endpoints: list[VerbsEndpoint] = []
        self._passive: dict[int, list[_Qp]] = {}
        self._session = 0
        self._bootstrap: verbs_bootstrap.BootstrapServer | None = None
        self._closed = False

    @property
    def port_info(self) -> PortInfo:
        return self.device.port_info

    # ---- memory -------------------------------------------------------------------------------------------
    def allocate(self, length: int, kind: MemoryKind = MemoryKind.HOST, access: Access = Access.ALL) -> MemoryRegion:
        self._check_open()
        if kind == MemoryKind.CUDA:
            return self._allocate_cuda(length, access)
        problem = memlock_problem(length)
        if problem:
            raise NoDevice(problem)
        host = map_host(length)
        view = memoryview(host.mm)
        mr = self._reg_mr(host.addr, length, access)
        region = MemoryRegion(host.addr, length, int(mr.lkey), RegionDescriptor(host.addr, length, int(mr.rkey)),
                              MemoryKind.HOST, access, view, handle=_RegHandle(mr, host, -1, host.huge_pages))
        return self._remember(region)

    def register(self, buffer: Any, access: Access = Access.ALL) -> MemoryRegion:
        self._check_open()
        view, addr = buffer_address(buffer)
        problem = memlock_problem(view.nbytes)
        if problem:
            raise NoDevice(problem)
        mr = self._reg_mr(addr, view.nbytes, access)
        region = MemoryRegion(addr, view.nbytes, int(mr.lkey), RegionDescriptor(addr, view.nbytes, int(mr.rkey)),
                              MemoryKind.HOST, access, view, handle=_RegHandle(mr, buffer, -1, False))
        return self._remember(region)

    def register_pointer(self, addr: int, length: int, kind: MemoryKind, access: Access = Access.ALL,
                         owner: Any = None) -> MemoryRegion:
        self._check_open()
        if kind != MemoryKind.CUDA:
            raise UsageError("register_pointer is for device memory; register host buffers with register()")
        mr, rng, fd = register_gpu(self._pd, addr, length, access_flags(self._e, access), self._mods["mr"])
        region = MemoryRegion(rng.iova, length, int(mr.lkey), RegionDescriptor(rng.iova, length, int(mr.rkey)),
                              MemoryKind.CUDA, access, None, handle=_RegHandle(mr, owner, fd, False, rng.method))
        return self._remember(region)

    def _allocate_cuda(self, length: int, access: Access) -> MemoryRegion:
        try:
            import torch
        except ImportError as exc:
            raise NoDevice("allocating GPU memory needs torch with CUDA") from exc
        if not torch.cuda.is_available():
            raise NoDevice("no CUDA device for a GPU region")
        rounded = -(-length // 4096) * 4096
        owner = torch.empty(rounded + 4096, dtype=torch.uint8, device="cuda")
        base = -(-owner.data_ptr() // 4096) * 4096
        return self.register_pointer(base, rounded, MemoryKind.CUDA, access, owner=owner)

    def _reg_mr(self, addr: int, length: int, access: Access) -> Any:
        try:
            return self._mods["mr"].MR(self._pd, length, access_flags(self._e, access), address=addr)
        except Exception as exc:
            raise NoDevice(f"memory registration of {length} bytes failed: {exc} (memlock limit? "
                           "`ulimit -l unlimited`)") from exc

    def _remember(self, region: MemoryRegion) -> MemoryRegion:
        with self._lock:
            self._regions[id(region)] = region
        return region

    def deregister(self, region: MemoryRegion) -> None:
        with self._lock:
            if self._regions.pop(id(region), None) is None:
                raise UsageError("region is not registered with this transport")
        region.handle.release()

    # ---- connections --------------------------------------------------------------------------------------
    def peer_info(self) -> dict:
        self._check_open()
        with self._lock:
            if self._bootstrap is None:
                self._bootstrap = verbs_bootstrap.BootstrapServer(self._bootstrap_host(), self.accept)
            host, port = self._bootstrap.address
        return {"transport": "verbs", "port": self.port_info.to_wire(), "bootstrap": [host, port]}

    def _bootstrap_host(self) -> str:
        host = self.options.bootstrap_host or os.environ.get("RDMAPOOL_VERBS_BOOTSTRAP_HOST")
        if host:
            return host
        gid = self.port_info.gid
        if is_ipv4_mapped(gid):  # the RoCE interface's own IPv4 address reaches peers on the same fabric
            return ".".join(str(int(gid[i:i + 2], 16)) for i in range(24, 32, 2))
        return "127.0.0.1"

    def connect(self, peer_info: dict, exchange: Exchange | None = None, timeout: float = 5.0) -> VerbsEndpoint:
        return self.connect_many(peer_info, 1, exchange, timeout)[0]

    def connect_many(self, peer_info: dict, count: int | None = None, exchange: Exchange | None = None,
                     timeout: float = 5.0) -> list[VerbsEndpoint]:
        """`count` (default qps_per_peer) endpoints to one peer, made in one handshake."""
        self._check_open()
        count = self.options.qps_per_peer if count is None else count
        if not 1 <= count <= MAX_QPS_PER_HANDSHAKE:
            raise UsageError(f"connect_many needs 1..{MAX_QPS_PER_HANDSHAKE} queue pairs, got {count}")
        if not isinstance(peer_info, dict) or peer_info.get("transport") != "verbs":
            raise UsageError(f"peer info is not from a verbs transport: {peer_info!r:.200}")
        qps = [self._new_qp() for _ in range(count)]
        request = Handshake(self.port_info, tuple(QpInfo(int(q.qp.qp_num), q.psn) for q in qps)).to_wire()
        try:
            if exchange is not None:
                reply_raw = exchange(request)
            else:
                boot = peer_info.get("bootstrap")
                if not (isinstance(boot, list | tuple) and len(boot) == 2):
                    raise UsageError("peer info has no bootstrap address and no exchange was given")
                reply_raw = verbs_bootstrap.exchange((str(boot[0]), int(boot[1])), request, timeout)
            reply = Handshake.from_wire(reply_raw, MAX_QPS_PER_HANDSHAKE)
            if len(reply.qps) != count:
                raise ProtocolError(f"peer answered {len(reply.qps)} queue pairs for {count} requested")
            params = negotiate(self.port_info, reply.port, self.options.timeout, self.options.retry_cnt,
                               self.options.rd_atomic_cap)
            for q, remote in zip(qps, reply.qps, strict=True):
                self._to_rts(q, remote, reply.port, params)
        except BaseException:
            for q in qps:
                _close_quietly(q.qp, q.cq)
            raise
        endpoints = [VerbsEndpoint(self._e, q.qp, q.cq, params, self._sq_depth, self.options.stall_timeout)
                     for q in qps]
        with self._lock:
            self._endpoints = [ep for ep in self._endpoints if ep.state != EndpointState.CLOSED] + endpoints
        return endpoints

    def accept(self, request: dict) -> dict:
        """Passive half: queue pairs for each of the requester's, in RTS, and the reply that describes them."""
        self._check_open()
        hs = Handshake.from_wire(request, MAX_QPS_PER_HANDSHAKE)
        params = negotiate(self.port_info, hs.port, self.options.timeout, self.options.retry_cnt,
                           self.options.rd_atomic_cap)
        qps = [self._new_qp() for _ in hs.qps]
        try:
            for q, remote in zip(qps, hs.qps, strict=True):
                self._to_rts(q, remote, hs.port, params)
        except BaseException:
            for q in qps:
                _close_quietly(q.qp, q.cq)
            raise
        with self._lock:
            self._session += 1
            self._passive[self._session] = qps
            session = self._session
        reply = Handshake(self.port_info, tuple(QpInfo(int(q.qp.qp_num), q.psn) for q in qps)).to_wire()
        reply["session"] = session
        return reply

    def release(self, session: int) -> None:
        """Close the passive queue pairs of one accepted handshake (`reply["session"]`), e.g. when the memory
        server's control connection to that client closes. Unknown sessions are ignored (idempotent)."""
        with self._lock:
            qps = self._passive.pop(session, [])
        for q in qps:
            _close_quietly(q.qp, q.cq)

    def _new_qp(self) -> _Qp:
        e, qp_mod = self._e, self._mods["qp"]
        cq = self._mods["cq"].CQ(self._ctx, self._sq_depth + 16)
        cap = qp_mod.QPCap(max_send_wr=self._sq_depth, max_recv_wr=1, max_send_sge=self._max_sge, max_recv_sge=1)
        init = qp_mod.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
        try:
            qp = qp_mod.QP(self._pd, init)
            attr = qp_mod.QPAttr(qp_state=e.IBV_QPS_INIT, cur_qp_state=e.IBV_QPS_RESET)
            attr.qp_access_flags = access_flags(e, Access.ALL)
            attr.port_num = self.device.port
            attr.pkey_index = 0
            qp.to_init(attr)
        except Exception:
            _close_quietly(cq)
            raise
        return _Qp(qp, cq, random.randrange(1 << 24))

    def _to_rts(self, q: _Qp, remote: QpInfo, remote_port: PortInfo, params: QpParams) -> None:
        e, qp_mod, addr = self._e, self._mods["qp"], self._mods["addr"]
        rtr = qp_mod.QPAttr(qp_state=e.IBV_QPS_RTR)
        rtr.path_mtu = params.path_mtu
        rtr.dest_qp_num = remote.qpn
        rtr.rq_psn = remote.psn
        rtr.max_dest_rd_atomic = params.max_dest_rd_atomic
        rtr.min_rnr_timer = params.min_rnr_timer
        if remote_port.uses_grh:
            route = addr.GlobalRoute(dgid=addr.GID(gid_colon(remote_port.gid)), sgid_index=self.port_info.gid_index,
                                     hop_limit=64)
            rtr.ah_attr = addr.AHAttr(gr=route, is_global=1, port_num=self.device.port)
        else:
            rtr.ah_attr = addr.AHAttr(dlid=remote_port.lid, port_num=self.device.port)
        q.qp.to_rtr(rtr)
        rts = qp_mod.QPAttr(qp_state=e.IBV_QPS_RTS)
        rts.timeout = params.timeout
        rts.retry_cnt = params.retry_cnt
        rts.rnr_retry = params.rnr_retry
        rts.sq_psn = q.psn
        rts.max_rd_atomic = params.max_rd_atomic
        q.qp.to_rts(rts)

    # ---- lifetime -----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the verbs transport is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bootstrap is not None:
            self._bootstrap.close()
        with self._lock:
            endpoints, self._endpoints = self._endpoints, []
            passive = [q for qps in self._passive.values() for q in qps]
            self._passive = {}
            regions, self._regions = list(self._regions.values()), {}
        for ep in endpoints:
            ep.close()
        for q in passive:
            _close_quietly(q.qp, q.cq)
        for region in regions:
            region.handle.release()
        _close_quietly(self._pd, self._ctx)


@dataclass(eq=False)
class _RegHandle:
    mr: Any
    owner: Any
    dmabuf_fd: int
    huge_pages: bool
    method: str = "host"
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        _close_quietly(self.mr)
        if self.dmabuf_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.dmabuf_fd)
        self.owner = None


def _close_quietly(*objs: Any) -> None:
    for obj in objs:
        with contextlib.suppress(Exception):
            obj.close()


__all__: Sequence[str] = ("VerbsTransport", "VerbsOptions", "VerbsEndpoint", "access_flags")
