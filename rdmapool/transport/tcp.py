"""The `tcp` backend: one-sided READ/WRITE/CAS/FAA over TCP, served by a native engine.

Theory of operation
-------------------
Each `TcpTransport` owns one native `Engine` (rdmapool._tcpengine): a region table and a listening socket on
`host` (loopback by default) whose connection threads execute peers' requests directly against the registered
regions: rkey, bounds and access flags are checked per request, bytes go between region memory and the socket
with no intermediate buffer, and no Python code (no GIL) runs on the serving side. `connect()` opens one TCP
connection to the peer's engine; that connection is the queue pair: requests on it execute in order and
complete in order. Progress (sending queued frames, receiving responses straight into the local SGEs) runs in
the caller's thread inside `post`/`poll`/`wait` with the GIL released; `wait` busy-polls `spin_us` before it
blocks. Where the process has CPUs to spare, an endpoint's backlog of request bytes goes out on a sender thread
of its own instead (`sender_thread`), so a caller working between posts does not hold the transfer up, and READ
digests are hashed on a digest thread of its own, a chunk behind the receive (`digest_thread`). See
native/tcpengine.c for the wire format and why deregister cannot race into a use-after-free, and
docs/transport.md for the semantics.

Region addresses are the owning process's virtual addresses, rkeys and lkeys random 32-bit values, as on verbs.
Only registered memory can be the source or target of an operation, on both sides.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from array import array
from collections.abc import Sequence
from typing import Any

from rdmapool.errors import ServerUnavailable, UsageError
from rdmapool.transport.base import (
    Access,
    Completion,
    CompletionTimeout,
    Endpoint,
    EndpointState,
    Exchange,
    MemoryKind,
    MemoryRegion,
    Opcode,
    RegionDescriptor,
    TransferPlan,
    Transport,
    WcStatus,
    WorkRequest,
    check_work_request,
)

try:
    from rdmapool import _tcpengine as _native
except ImportError as exc:  # pragma: no cover - the package build always compiles it
    raise ImportError(
        "the tcp transport needs its native engine rdmapool._tcpengine; build it with "
        "`python setup.py build_ext --inplace` (there is no pure-Python fallback)"
    ) from exc

_native.set_usage_error(UsageError)

#: bumped in a forked child: transports and endpoints made before the fork belong to the parent (their engine
#: threads did not survive the fork) and refuse to work in the child instead of deadlocking on copied locks
_fork_generation = [0]
os.register_at_fork(after_in_child=lambda: _fork_generation.__setitem__(0, _fork_generation[0] + 1))


def _check_fork(generation: int, what: str) -> None:
    if generation != _fork_generation[0]:
        raise UsageError(f"this tcp {what} was created before os.fork(); create a new transport in the child")

_STATES = {0: EndpointState.READY, 1: EndpointState.ERROR, 2: EndpointState.CLOSED}
_WIRE_VERSION = 1
#: busy-poll time of engine threads and waits before they block (RDMAPOOL_TCP_SPIN_US overrides)
DEFAULT_SPIN_US = 50
#: how long deregister waits for in-flight requests before it breaks the connections that hold them
DEREGISTER_TIMEOUT_S = 5.0


#: READs that name a `digest` SGE complete with its xxh3-128, hashed by the engine as each received chunk lands
#: (in cache); WRITE digests are not offered: the sending core is the bottleneck, and a hash there adds its full
#: cost wherever it runs (docs/decisions.md)
_DIGESTS = frozenset({Opcode.READ}) if _native.DIGEST else frozenset()


#: the engine's status and opcode numbers as enum members (a dict lookup, not an enum call, once per completion)
_STATUS = {int(s): s for s in WcStatus}
_OPCODE = {int(o): o for o in Opcode}


def _completion(raw: tuple) -> Completion:
    if len(raw) == 5:
        wr_id, status, opcode, byte_len, digest = raw
        return Completion(wr_id, _STATUS[status], _OPCODE[opcode], byte_len, digest=digest)
    wr_id, status, opcode, byte_len = raw
    return Completion(wr_id, _STATUS[status], _OPCODE[opcode], byte_len)


class TcpEndpoint(Endpoint):
    """One TCP connection to a peer's engine, used as an RC queue pair."""

    def __init__(self, native: Any, transport: TcpTransport) -> None:
        self._ep = native
        self._transport = transport
        self._generation = _fork_generation[0]
        self._plans: dict[int, tuple[TransferPlan, tuple[bytes, ...]]] = {}

    @property
    def state(self) -> EndpointState:
        return _STATES[self._ep.state]

    @property
    def outstanding(self) -> int:
        return self._ep.outstanding

    def post(self, wrs: Sequence[WorkRequest]) -> None:
        if self._generation != _fork_generation[0]:
            _check_fork(self._generation, "endpoint")
        for wr in wrs:
            if wr.digest is not None:  # the engine checks everything else
                check_work_request(wr)
        self._ep.post(wrs)

    @property
    def digests(self) -> frozenset[Opcode]:
        return _DIGESTS

    @property
    def sends_in_background(self) -> bool:
        return self._ep.sender  # the transport's setting, unless the thread could not be started

    def poll(self, max_entries: int = 64) -> list[Completion]:
        return [_completion(c) for c in self.poll_results(max_entries)]

    def wait(self, count: int, timeout: float) -> list[Completion]:
        try:
            return [_completion(c) for c in self.wait_results(count, timeout)]
        except CompletionTimeout as exc:
            exc.completions = [_completion(c) for c in exc.completions]
            raise

    def poll_results(self, max_entries: int = 64) -> list[tuple]:
        if self._generation != _fork_generation[0]:
            _check_fork(self._generation, "endpoint")
        return self._ep.poll(max_entries)

    def wait_results(self, count: int, timeout: float) -> list[tuple]:
        if timeout is None or timeout <= 0:
            raise UsageError("wait needs a positive timeout: every wait in rdmapool is bounded")
        if self._generation != _fork_generation[0]:
            _check_fork(self._generation, "endpoint")
        got = self._ep.wait(count, timeout) if count > 0 else []
        if len(got) < count:
            exc = CompletionTimeout(f"{len(got)} of {count} completions after {timeout:.3f}s")
            exc.completions = got  # what did arrive, so the caller can account for it
            raise exc
        return got

    def post_plan(
        self, plan: TransferPlan, opcode: Opcode, pairs: Sequence[tuple[int, int]], wr_id_base: int = 0,
        signal_every: int = 1,
    ) -> int:
        if self._generation != _fork_generation[0]:
            _check_fork(self._generation, "endpoint")
        arrays = self._plan_arrays(plan)
        flat = array("q")
        for li, ri in pairs:
            flat.append(li)
            flat.append(ri)
        return self._ep.post_plan(*arrays, flat, int(opcode), wr_id_base, signal_every)

    def _plan_arrays(self, plan: TransferPlan) -> tuple[bytes, ...]:
        """The plan as packed uint64 arrays, built once per plan (plans are immutable)."""
        cached = self._plans.get(id(plan))
        if cached is not None and cached[0] is plan:
            return cached[1]
        arrays = (
            array("Q", [s.addr for s in plan.local]).tobytes(),
            array("Q", [s.length for s in plan.local]).tobytes(),
            array("Q", [s.lkey for s in plan.local]).tobytes(),
            array("Q", [a for a, _ in plan.remote]).tobytes(),
            array("Q", [k for _, k in plan.remote]).tobytes(),
        )
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[id(plan)] = (plan, arrays)
        return arrays

    def close(self) -> None:
        self._ep.close()
        self._transport._forget(self)


class TcpTransport(Transport):
    """The tcp backend. `host`/`port`: where this process's engine listens (port 0 = any free port);
    `spin_us`: how long engine threads and waits busy-poll before they block; `sender_thread`: whether each
    endpoint's backlog of request bytes goes out on a thread of its own, as a NIC sends while the caller works
    (default: where this process may run on more than two CPUs; `RDMAPOOL_TCP_SENDER=0/1` overrides);
    `digest_thread`: whether each endpoint hashes READ digests on a thread of its own, a chunk behind the receive,
    instead of in the receiving thread (same default; `RDMAPOOL_TCP_DIGESTER=0/1` overrides)."""

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, spin_us: int | None = None,
                 sender_thread: bool | None = None, advertise: str | None = None,
                 digest_thread: bool | None = None) -> None:
        if spin_us is None:
            try:
                spin_us = int(os.environ.get("RDMAPOOL_TCP_SPIN_US", DEFAULT_SPIN_US))
            except ValueError:
                raise UsageError("RDMAPOOL_TCP_SPIN_US must be a whole number of microseconds, got "
                                 f"{os.environ['RDMAPOOL_TCP_SPIN_US']!r}") from None
        if not 0 <= spin_us <= 1_000_000:
            raise UsageError(f"spin_us must be between 0 and 1000000, got {spin_us}")
        # settings first: a bad one must not leave an engine (a listening socket, threads) behind
        self.sender_thread = _spare_cores("RDMAPOOL_TCP_SENDER") if sender_thread is None else bool(sender_thread)
        self.digest_thread = _spare_cores("RDMAPOOL_TCP_DIGESTER") if digest_thread is None else bool(digest_thread)
        self._engine = _native.Engine(host, port, spin_us)
        self._host = host
        #: the host peers are told to connect to (`peer_info`): the listen host unless that is a wildcard
        self._advertise = advertise or host
        self._spin_us = spin_us
        self._regions: dict[int, MemoryRegion] = {}
        self._endpoints: weakref.WeakSet[TcpEndpoint] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        self._generation = _fork_generation[0]

    # -- memory ------------------------------------------------------------------------------------------

    def allocate(self, length: int, kind: MemoryKind = MemoryKind.HOST, access: Access = Access.ALL) -> MemoryRegion:
        if kind is not MemoryKind.HOST:
            raise UsageError(f"the tcp transport allocates host memory only, not {kind.value}")
        if length <= 0:
            raise UsageError(f"allocation length must be positive, got {length}")
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE") and length >= 2 << 20:
            buf.madvise(mmap.MADV_HUGEPAGE)
        region = self._register(buf, access, owner=buf)
        return region

    def register(self, buffer: Any, access: Access = Access.ALL) -> MemoryRegion:
        return self._register(buffer, access, owner=buffer)

    def register_pointer(
        self, addr: int, length: int, kind: MemoryKind, access: Access = Access.ALL, owner: Any = None
    ) -> MemoryRegion:
        if kind is not MemoryKind.HOST:
            return super().register_pointer(addr, length, kind, access, owner)
        if addr <= 0 or length <= 0:
            raise UsageError(f"register_pointer needs a positive address and length, got {addr:#x}, {length}")
        self._check_open()
        rkey, lkey, base = self._engine.register(None, addr, length, int(access))
        region = MemoryRegion(base, length, lkey, RegionDescriptor(base, length, rkey), MemoryKind.HOST, access,
                              None, handle=owner)
        with self._lock:
            self._regions[rkey] = region
        return region

    def _register(self, buffer: Any, access: Access, owner: Any) -> MemoryRegion:
        self._check_open()
        try:
            view = memoryview(buffer)
        except TypeError as exc:
            raise UsageError(f"register needs a buffer-protocol object, got {type(buffer).__name__}") from exc
        if view.readonly or not view.c_contiguous:
            raise UsageError("register needs a writable, C-contiguous buffer")
        view = view.cast("B")
        if view.nbytes == 0:
            raise UsageError("cannot register an empty buffer")
        rkey, lkey, base = self._engine.register(view, 0, 0, int(access))
        region = MemoryRegion(base, view.nbytes, lkey, RegionDescriptor(base, view.nbytes, rkey), MemoryKind.HOST,
                              access, view, handle=owner)
        with self._lock:
            self._regions[rkey] = region
        return region

    def deregister(self, region: MemoryRegion) -> None:
        with self._lock:
            if self._regions.get(region.rkey) is not region:
                raise UsageError(f"region with rkey {region.rkey} is not registered with this transport")
            del self._regions[region.rkey]
        drained = self._engine.deregister(region.rkey, DEREGISTER_TIMEOUT_S)
        if not drained:
            # unreachable for new requests already; a stuck thread may still touch it, so never free it
            _leaked.append(region)
            raise ServerUnavailable(
                f"region {region.rkey} deregistered but still in use after {DEREGISTER_TIMEOUT_S}s; buffer kept alive"
            )

    # -- connections -------------------------------------------------------------------------------------

    def peer_info(self) -> dict:
        return {"transport": "tcp", "version": _WIRE_VERSION, "host": self._advertise, "port": self._engine.port}

    def connect(self, peer_info: dict, exchange: Exchange | None = None, timeout: float = 5.0) -> Endpoint:
        self._check_open()
        if not isinstance(peer_info, dict) or peer_info.get("transport") != "tcp":
            raise UsageError(f"not a tcp peer_info: {peer_info!r}")
        if peer_info.get("version") != _WIRE_VERSION:
            raise UsageError(f"tcp peer speaks wire version {peer_info.get('version')!r}, we speak {_WIRE_VERSION}")
        host, port = peer_info.get("host"), peer_info.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise UsageError(f"tcp peer_info needs a host string and a port integer: {peer_info!r}")
        if timeout is None or timeout <= 0:
            raise UsageError("connect needs a positive timeout")
        try:
            native = _native.Endpoint(self._engine, host, port, timeout, self._spin_us, self.sender_thread,
                                      self.digest_thread)
        except ConnectionError as exc:
            raise ServerUnavailable(str(exc)) from exc
        ep = TcpEndpoint(native, self)
        with self._lock:
            self._endpoints.add(ep)
        return ep

    def _forget(self, ep: TcpEndpoint) -> None:
        with self._lock:
            self._endpoints.discard(ep)

    @property
    def serving_threads(self) -> int:
        """Connection threads the engine runs now (one per accepted endpoint)."""
        return self._engine.serving_threads

    def _check_open(self) -> None:
        _check_fork(self._generation, "transport")
        if self._closed:
            raise UsageError("the tcp transport is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._generation != _fork_generation[0]:
            return  # the parent's engine: nothing of it runs here (the native side ignores it as well)
        with self._lock:
            endpoints = list(self._endpoints)
            self._endpoints.clear()
            self._regions.clear()
        for ep in endpoints:
            ep._ep.close()
        self._engine.close()


def _spare_cores(variable: str) -> bool:
    """The default of a per-endpoint thread (sender, digester): one more busy thread, worth it only with CPUs to
    spare (on two the sender measured no better: docs/decisions.md); the environment `variable` (0/1) overrides."""
    forced = os.environ.get(variable)
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UsageError(f"{variable} must be 0 or 1, got {forced!r}")
    try:
        return len(os.sched_getaffinity(0)) > 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) > 2


#: regions whose deregistration timed out: kept alive forever rather than freed under a running thread
_leaked: list[MemoryRegion] = []
