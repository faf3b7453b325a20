"""An in-process test double of the transport interface: regions live in this process, one-sided operations
are memmoves done at post time. It lets the server driver and the client run in one process (threads) before
any real backend exists, and it can tear reads on purpose. Real-process tests use the tcp/shm backends."""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections import deque
from collections.abc import Sequence

from rdmapool.errors import UsageError
from rdmapool.transport.base import (
    Access,
    Completion,
    Endpoint,
    EndpointState,
    MemoryKind,
    MemoryRegion,
    Opcode,
    RegionDescriptor,
    Transport,
    WcStatus,
    WorkRequest,
    check_work_request,
)

_REGIONS: dict[int, MemoryRegion] = {}  # rkey -> region, shared by every LocalTransport of the process
_KEYS = itertools.count(1000)
_LOCK = threading.Lock()


class LocalEndpoint(Endpoint):
    def __init__(self, transport: LocalTransport) -> None:
        self._transport = transport
        self._state = EndpointState.READY
        self._done: deque[Completion] = deque()
        #: test hook: called with (wr, remote bytes) for READs, may return other bytes (torn reads)
        self.read_filter = None

    @property
    def state(self) -> EndpointState:
        return self._state

    @property
    def outstanding(self) -> int:
        return len(self._done)

    def post(self, wrs: Sequence[WorkRequest]) -> None:
        for wr in wrs:
            check_work_request(wr)
            status = WcStatus.WR_FLUSH_ERR if self._state is not EndpointState.READY else self._run(wr)
            if status is not WcStatus.SUCCESS:
                self._state = EndpointState.ERROR if self._state is EndpointState.READY else self._state
            if wr.signaled or status is not WcStatus.SUCCESS:
                self._done.append(Completion(wr.wr_id, status, wr.opcode, wr.length))

    def _run(self, wr: WorkRequest) -> WcStatus:
        with _LOCK:
            region = _REGIONS.get(wr.rkey)
        if region is None or not region.descriptor.contains(wr.remote_addr, wr.length):
            return WcStatus.REM_ACCESS_ERR
        offset = wr.remote_addr - region.descriptor.addr
        if wr.opcode is Opcode.READ:
            data = ctypes.string_at(region.addr + offset, wr.length)
            if self.read_filter is not None:
                data = self.read_filter(wr, data)
            pos = 0
            for sge in wr.sgl:
                ctypes.memmove(sge.addr, data[pos : pos + sge.length], sge.length)
                pos += sge.length
        elif wr.opcode is Opcode.WRITE:
            pos = region.addr + offset
            for sge in wr.sgl:
                ctypes.memmove(pos, sge.addr, sge.length)
                pos += sge.length
        else:
            return WcStatus.REM_INV_REQ_ERR
        return WcStatus.SUCCESS

    def poll(self, max_entries: int = 64) -> list[Completion]:
        out = []
        while self._done and len(out) < max_entries:
            out.append(self._done.popleft())
        return out

    def close(self) -> None:
        self._state = EndpointState.CLOSED


class LocalTransport(Transport):
    name = "local"

    def __init__(self) -> None:
        self._mine: list[MemoryRegion] = []
        self.endpoints: list[LocalEndpoint] = []

    def allocate(self, length: int, kind: MemoryKind = MemoryKind.HOST, access: Access = Access.ALL) -> MemoryRegion:
        if kind is not MemoryKind.HOST:
            raise UsageError("local transport: host memory only")
        return self.register(bytearray(length), access)

    def register(self, buffer, access: Access = Access.ALL) -> MemoryRegion:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise UsageError("register needs a writable buffer")
        addr = ctypes.addressof((ctypes.c_char * max(len(view), 1)).from_buffer(view)) if len(view) else 0
        rkey = next(_KEYS)
        region = MemoryRegion(addr, len(view), rkey, RegionDescriptor(addr, len(view), rkey), view=view,
                              handle=buffer, access=access)
        with _LOCK:
            _REGIONS[rkey] = region
        self._mine.append(region)
        return region

    def deregister(self, region: MemoryRegion) -> None:
        with _LOCK:
            _REGIONS.pop(region.rkey, None)

    def peer_info(self) -> dict:
        return {"local": True}

    def connect(self, peer_info: dict, exchange=None, timeout: float = 5.0) -> Endpoint:
        ep = LocalEndpoint(self)
        self.endpoints.append(ep)
        return ep

    def close(self) -> None:
        for r in self._mine:
            self.deregister(r)
        self._mine.clear()
