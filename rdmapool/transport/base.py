"""The one-sided transport interface, shaped like RDMA verbs so that every backend fits it unchanged.

Theory of operation
-------------------
A process *registers* memory and gets a `MemoryRegion`: a local handle (address, length, lkey) and a
`RegionDescriptor` (address as peers must name it, length, rkey) that it may hand to peers over any control
channel. A peer *connects* and gets an `Endpoint` (think RC queue pair) on which it *posts* batches of
`WorkRequest`s: one-sided READ and WRITE between a local scatter/gather list and a remote address, and 8-byte
compare-and-swap / fetch-and-add. The side that owns the memory runs no application code for these: its
transport engine checks rkey and bounds and moves the bytes.

Semantics (as for RC queue pairs; every backend implements exactly this, the conformance suite checks it):
- Completions of one endpoint are delivered in posting order. Unsignalled requests produce no completion unless
  they fail. A completion means: READ/atomic -> the bytes are in the local buffer; WRITE -> the bytes are placed
  in the remote region (visible to later operations on any endpoint).
- Requests of one endpoint are executed in order; no order holds across endpoints.
- The order in which the bytes *of one message* land is unspecified: a READ that overlaps a concurrent WRITE may
  return any mix of old and new bytes (torn read). Readers must validate (see `rdmapool.block`).
- Errors arrive as completions (`WcStatus`), never as exceptions from the remote side. The first error moves the
  endpoint to `EndpointState.ERROR`: every request still outstanding or posted later completes with
  `WR_FLUSH_ERR`. A broken endpoint is not repaired; the caller connects a new one.
- Atomics are 8 bytes, naturally aligned, little-endian on the wire; the old value lands in the local SGE.
- Every wait takes a timeout. A peer that vanishes yields error completions (`RETRY_EXC_ERR`), never a hang.
- Optional digests: a READ/WRITE may name one SGE (`WorkRequest.digest`, an index into its SGL) whose local
  bytes the backend hashes as it moves them (xxh3-128, the 16 canonical bytes of `xxhash.xxh3_128_digest`):
  for a READ the bytes that landed, for a WRITE the bytes that were sent. A backend that can do so (while the
  bytes are in cache, fused with its copy) says `Endpoint.digests` and puts the result in `Completion.digest`;
  every other backend ignores the request and returns `digest=None`, and the caller hashes the buffer itself.
  A digest is only a convenience: it equals hashing the local SGE after the completion, nothing more.

Hot path: descriptor lists are prepared once (`TransferPlan`) and each request posts small index arrays
(`Endpoint.post_plan`), as NIXL and Mooncake's engine do; backends may override that with native batching.
Completions of large batches can be taken as plain tuples (`poll_results`/`wait_results`) instead of objects.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rdmapool.errors import ServerUnavailable, UsageError

ATOMIC_SIZE = 8


class Access(enum.IntFlag):
    """Who may touch a region; mirrors IBV_ACCESS_* flags."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8
    ALL = LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC


class MemoryKind(enum.Enum):
    HOST = "host"
    CUDA = "cuda"


@dataclass(frozen=True, slots=True)
class RegionDescriptor:
    """What a peer needs to address a region: its base address as the peer must name it, length, rkey."""

    addr: int
    length: int
    rkey: int

    def to_wire(self) -> list[int]:
        return [self.addr, self.length, self.rkey]

    @classmethod
    def from_wire(cls, raw: Any) -> RegionDescriptor:
        if not (isinstance(raw, list | tuple) and len(raw) == 3 and all(isinstance(v, int) for v in raw)):
            raise UsageError(f"region descriptor must be [addr, length, rkey] integers, got {raw!r}")
        addr, length, rkey = raw
        if addr < 0 or length < 0 or not 0 <= rkey < 2**32:
            raise UsageError(f"region descriptor out of range: {raw!r}")
        return cls(addr, length, rkey)

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length


@dataclass(eq=False)
class MemoryRegion:
    """A registered local region. `addr` is the local address used in SGEs; `descriptor` goes to peers."""

    addr: int
    length: int
    lkey: int
    descriptor: RegionDescriptor
    kind: MemoryKind = MemoryKind.HOST
    access: Access = Access.ALL
    #: host memory as a writable memoryview (None for device memory)
    view: memoryview | None = None
    #: backend-private state (the owning transport, an mmap, a pyverbs MR, ...)
    handle: Any = field(default=None, repr=False)

    @property
    def rkey(self) -> int:
        return self.descriptor.rkey

    def sge(self, offset: int = 0, length: int | None = None) -> Sge:
        """An SGE for a slice of this region, bounds-checked here so mistakes are loud."""
        length = self.length - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > self.length:
            raise UsageError(f"slice [{offset}, {offset + length}) outside region of {self.length} bytes")
        return Sge(self.addr + offset, length, self.lkey)

    def remote(self, offset: int = 0) -> int:
        """The address a peer uses for `offset` into this region."""
        return self.descriptor.addr + offset


class Opcode(enum.IntEnum):
    READ = 1
    WRITE = 2
    CAS = 3
    FAA = 4


#: Sge and WorkRequest are built per block of every put and get: plain slotted dataclasses, not frozen ones
#: (a frozen one sets each field through object.__setattr__: a WorkRequest took 1.1 us to build, now 0.26 us).
#: Treat them as values all the same: nothing changes one after building it.
@dataclass(slots=True)
class Sge:
    """One local piece of a scatter/gather list: address inside a registered region, length, lkey."""

    addr: int
    length: int
    lkey: int


@dataclass(slots=True)
class WorkRequest:
    """One operation. READ/WRITE move sum(sge lengths) bytes to/from `remote_addr`; CAS/FAA act on 8 bytes
    at `remote_addr` and put the old value in the single 8-byte SGE. CAS: if *remote == compare then
    *remote = swap. FAA: *remote += add (mod 2**64), with `add` passed in `compare`."""

    wr_id: int
    opcode: Opcode
    sgl: tuple[Sge, ...]
    remote_addr: int
    rkey: int
    compare: int = 0
    swap: int = 0
    signaled: bool = True
    #: index into `sgl` of the SGE to hash as it moves (READ/WRITE only; see "Optional digests"), or None
    digest: int | None = None

    @property
    def length(self) -> int:
        return sum(s.length for s in self.sgl)

    @classmethod
    def read(cls, wr_id: int, local: Sge, remote_addr: int, rkey: int, signaled: bool = True) -> WorkRequest:
        return cls(wr_id, Opcode.READ, (local,), remote_addr, rkey, signaled=signaled)

    @classmethod
    def write(cls, wr_id: int, local: Sge, remote_addr: int, rkey: int, signaled: bool = True) -> WorkRequest:
        return cls(wr_id, Opcode.WRITE, (local,), remote_addr, rkey, signaled=signaled)

    @classmethod
    def cas(cls, wr_id: int, local: Sge, remote_addr: int, rkey: int, compare: int, swap: int) -> WorkRequest:
        return cls(wr_id, Opcode.CAS, (local,), remote_addr, rkey, compare=compare, swap=swap)

    @classmethod
    def faa(cls, wr_id: int, local: Sge, remote_addr: int, rkey: int, add: int) -> WorkRequest:
        return cls(wr_id, Opcode.FAA, (local,), remote_addr, rkey, compare=add)


def check_work_request(wr: WorkRequest) -> None:
    """Local validation every backend applies before posting (a caller's mistake is a UsageError)."""
    if not wr.sgl:
        raise UsageError(f"wr {wr.wr_id}: empty scatter/gather list")
    if wr.remote_addr < 0:
        raise UsageError(f"wr {wr.wr_id}: negative remote address")
    if wr.opcode in (Opcode.CAS, Opcode.FAA):
        if len(wr.sgl) != 1 or wr.sgl[0].length != ATOMIC_SIZE:
            raise UsageError(f"wr {wr.wr_id}: atomics need exactly one 8-byte SGE")
        if wr.remote_addr % ATOMIC_SIZE:
            raise UsageError(f"wr {wr.wr_id}: atomic remote address {wr.remote_addr:#x} is not 8-byte aligned")
        if not (0 <= wr.compare < 2**64 and 0 <= wr.swap < 2**64):
            raise UsageError(f"wr {wr.wr_id}: atomic operands must fit in 64 unsigned bits")
    if wr.digest is not None and (wr.opcode not in (Opcode.READ, Opcode.WRITE) or not 0 <= wr.digest < len(wr.sgl)):
        raise UsageError(f"wr {wr.wr_id}: digest must index an SGE of a READ or WRITE")


class WcStatus(enum.IntEnum):
    """Completion status; names and meanings follow ibv_wc_status."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_PROT_ERR = 4  # local SGE not inside a registered region with that lkey
    WR_FLUSH_ERR = 5  # endpoint was already in error
    REM_INV_REQ_ERR = 9  # malformed request (e.g. misaligned atomic)
    REM_ACCESS_ERR = 10  # bad rkey, out of bounds, or no permission
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12  # peer gone / unreachable
    GENERAL_ERR = 21


@dataclass(frozen=True, slots=True)
class Completion:
    wr_id: int
    status: WcStatus
    opcode: Opcode
    byte_len: int = 0
    detail: str = ""
    #: xxh3-128 (canonical bytes) of the SGE the request named in `digest`, when the backend computed it
    digest: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == WcStatus.SUCCESS


def _result(c: Completion) -> tuple:
    """A completion as an `Endpoint.poll_results` tuple."""
    return (c.wr_id, int(c.status), int(c.opcode), c.byte_len, c.digest)


class EndpointState(enum.Enum):
    READY = "ready"  # RTS
    ERROR = "error"  # every request flushes
    CLOSED = "closed"


class CompletionTimeout(ServerUnavailable, TimeoutError):
    """Waiting for completions ran past its timeout; the endpoint is no longer trusted."""


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Descriptor lists prepared once: local SGEs and remote (addr, rkey) targets, both indexed by position.

    A request then names (local index, remote index) pairs; see `Endpoint.post_plan`. Lengths come from the
    local side; the remote side must be at least as long (checked by the serving engine, as on hardware).
    """

    local: tuple[Sge, ...]
    remote: tuple[tuple[int, int], ...]  # (remote_addr, rkey)

    @classmethod
    def build(cls, local: Sequence[Sge], remote: Sequence[tuple[int, int]]) -> TransferPlan:
        return cls(tuple(local), tuple((int(a), int(k)) for a, k in remote))


class Endpoint(ABC):
    """A connected queue pair to one peer."""

    @property
    def digests(self) -> frozenset[Opcode]:
        """The opcodes whose successful completions carry the digest a request asks for (see "Optional
        digests"). Empty unless a backend overrides it; callers still check `Completion.digest` for None."""
        return frozenset()

    @property
    def asynchronous(self) -> bool:
        """True when large posted requests move without the posting thread (a NIC, the shm Mover thread), so
        the caller can do other work (hash the next block) while they move. False (the default): progress needs
        the caller's thread (in `post`/`poll`/`wait`) or runs inline."""
        return False

    @property
    def sends_in_background(self) -> bool:
        """True when the bytes of posted WRITEs keep moving while the posting thread waits on something else
        (a control round trip): every asynchronous endpoint, and tcp's with a sender thread, whose READ responses
        still land only inside the caller's `poll`/`wait`."""
        return self.asynchronous

    @property
    @abstractmethod
    def state(self) -> EndpointState: ...

    @abstractmethod
    def post(self, wrs: Sequence[WorkRequest]) -> None:
        """Queue a batch. Raises UsageError for local mistakes; remote failures arrive as completions."""

    @abstractmethod
    def poll(self, max_entries: int = 64) -> list[Completion]:
        """Return up to `max_entries` completions that are ready, without blocking."""

    @abstractmethod
    def close(self) -> None:
        """Release the endpoint; outstanding requests complete with WR_FLUSH_ERR."""

    @property
    @abstractmethod
    def outstanding(self) -> int:
        """Signalled requests posted but not yet returned by poll/wait."""

    def wait(self, count: int, timeout: float) -> list[Completion]:
        """Block until `count` completions are ready or `timeout` seconds pass (CompletionTimeout)."""
        if timeout is None or timeout <= 0:
            raise UsageError("wait needs a positive timeout: every wait in rdmapool is bounded")
        got: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got.extend(self.poll(count - len(got)))
            if len(got) >= count:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CompletionTimeout(f"{len(got)} of {count} completions after {timeout:.3f}s")
            self._block(remaining)
        return got

    def poll_results(self, max_entries: int = 64) -> list[tuple]:
        """`poll` as plain tuples (wr_id, status value, opcode value, byte_len, digest), for callers that handle
        every completion of a large batch (the pool's data path); backends may return them without building
        `Completion`s (tcp: the engine's own tuples, the digest only where there is one: check `len`)."""
        return [_result(c) for c in self.poll(max_entries)]

    def wait_results(self, count: int, timeout: float) -> list[tuple]:
        """`wait` as `poll_results` tuples; a CompletionTimeout carries what did arrive, as tuples."""
        try:
            got = self.wait(count, timeout)
        except CompletionTimeout as exc:
            exc.completions = [_result(c) for c in getattr(exc, "completions", [])]
            raise
        return [_result(c) for c in got]

    def _block(self, remaining: float) -> None:
        """Sleep until a completion may be ready; backends override with a real event wait."""
        time.sleep(min(remaining, 50e-6))

    def execute(self, wrs: Sequence[WorkRequest], timeout: float) -> list[Completion]:
        """Post a batch, wait for every signalled completion, return them in posting order."""
        self.post(wrs)
        signalled = sum(1 for wr in wrs if wr.signaled)
        return self.wait(signalled, timeout)

    def post_plan(
        self, plan: TransferPlan, opcode: Opcode, pairs: Sequence[tuple[int, int]], wr_id_base: int = 0,
        signal_every: int = 1,
    ) -> int:
        """Post one READ or WRITE per (local index, remote index) pair. Only every `signal_every`-th request and
        the last are signalled (selective signalling). Returns the number of signalled requests."""
        if opcode not in (Opcode.READ, Opcode.WRITE):
            raise UsageError("post_plan moves bytes: opcode must be READ or WRITE")
        if signal_every < 1:
            raise UsageError("signal_every must be >= 1")
        wrs = []
        n = len(pairs)
        for i, (li, ri) in enumerate(pairs):
            addr, rkey = plan.remote[ri]
            signaled = (i + 1) % signal_every == 0 or i == n - 1
            wrs.append(WorkRequest(wr_id_base + i, opcode, (plan.local[li],), addr, rkey, signaled=signaled))
        self.post(wrs)
        return sum(1 for w in wrs if w.signaled)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Carries a connection request to the peer's `Transport.accept` over some control channel, returns its reply.
Exchange = Callable[[dict], dict]


class Transport(ABC):
    """A backend: registers memory, serves one-sided operations on it, connects to peers."""

    name: str = "abstract"

    @abstractmethod
    def allocate(self, length: int, kind: MemoryKind = MemoryKind.HOST, access: Access = Access.ALL) -> MemoryRegion:
        """Allocate memory suited to this backend (shared memory for shm, huge pages where possible) and
        register it. Memory servers allocate their pool this way, once, at start."""

    @abstractmethod
    def register(self, buffer: Any, access: Access = Access.ALL) -> MemoryRegion:
        """Register an existing writable buffer (buffer protocol) of this process."""

    def register_pointer(
        self, addr: int, length: int, kind: MemoryKind, access: Access = Access.ALL, owner: Any = None
    ) -> MemoryRegion:
        """Register raw memory (e.g. a CUDA allocation). `owner` keeps the allocation alive."""
        raise UsageError(f"the {self.name} transport cannot register {kind.value} memory by pointer")

    @abstractmethod
    def deregister(self, region: MemoryRegion) -> None:
        """After this returns, no peer operation can reach the region (they fail with REM_ACCESS_ERR)."""

    @abstractmethod
    def peer_info(self) -> dict:
        """Msgpack-able data that lets a peer connect to this process (address, port, names, ...)."""

    @abstractmethod
    def connect(self, peer_info: dict, exchange: Exchange | None = None, timeout: float = 5.0) -> Endpoint:
        """Connect to a peer. Backends that need a handshake (verbs QP numbers) send it with `exchange`
        (which calls the peer's `accept`) or, when None, through their own bootstrap listener."""

    def accept(self, request: dict) -> dict:
        """Passive half of a handshake: set up our side for `request`, return the reply for the peer."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Stop serving, close endpoints, deregister everything. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
