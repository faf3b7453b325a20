"""An shm endpoint: a client's connection to one co-located owner, executing one-sided operations itself.

There is no engine on the owner's side: `post` resolves each work request (local SGEs against this process's
registered regions, the remote address against the owner's region table, mapping the region's segment
lazily on first use), packs the batch into 64-byte records and hands it to the native mover. A batch that
moves at least `ASYNC_BYTES`, and every batch posted while earlier ones are still queued, goes to the
endpoint's `Mover` thread (native, no GIL), as a NIC takes a send queue: `post` returns at once, so the
caller builds its next requests while these bytes move, and completions arrive later, in posting order
(`poll`/`wait` collect them). Smaller batches posted while nothing is queued run inline in `post` (a thread
hand-off costs more than they do) and complete before it returns. Either way requests of one endpoint run
in posting order. An endpoint is a queue pair: use it from one thread at a time (a lock makes misuse safe,
not fast).

Failure semantics follow base.py: the first failing request gets its status (LOC_PROT_ERR, REM_ACCESS_ERR,
RETRY_EXC_ERR), every later one of the batch and of later batches WR_FLUSH_ERR, and the endpoint is in ERROR.
Owner liveness (header state OPEN, owner's pidfd not readable) is checked by the mover after every batch (the
state word also before it); a batch during which the owner died reports RETRY_EXC_ERR for its first request
and flushes the rest, never success on orphaned memory.

First touch of a large mapping: a region over `POPULATE_MAX` is mapped without MAP_POPULATE (see segment.py),
so the first copy into each of its pages took a page fault: a fresh client's first 64 x 1 MiB put ran 28-44 ms
against 11-13 ms warm on the 2-CPU VM. The endpoint keeps one byte per 2 MiB chunk of such a mapping (`_Remote.cold`)
and puts a populate record (madvise MADV_POPULATE_WRITE, or _READ for a read-only mapping) in front of the first
request that reaches a cold chunk: the mover faults the chunk's page tables in at ~0.1 ms per MiB instead of
~0.45 ms per MiB of faults inside the copy, off the GIL like the copy. After that the check is one
`bytearray.find` per request.

GPU memory as a local SGE (`register_pointer(kind=CUDA)`): its records carry a hand-off flag; the mover stops
before each one, and `_run` copies it with the CUDA runtime (after checking the region's valid word) and
resumes the mover, so order and checks are those of every other record. Such batches, plans (`post_plan`),
error flushes, `quiesce` and `close` first wait (bounded) until the Mover thread is idle, so nothing runs out
of order and no queued copy touches memory that is about to be unmapped.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rdmapool import _shmatomics as native
from rdmapool.errors import TransportError, UsageError
from rdmapool.transport.base import (
    Access,
    Completion,
    CompletionTimeout,
    Endpoint,
    EndpointState,
    Opcode,
    TransferPlan,
    WcStatus,
    WorkRequest,
    check_work_request,
)
from rdmapool.transport.shm import cuda, naming
from rdmapool.transport.shm import plan as plan_tables
from rdmapool.transport.shm.plan import PlanCache
from rdmapool.transport.shm.segment import POPULATE_MAX, Segment
from rdmapool.transport.shm.table import LOCAL_ONLY, STATE_OPEN, TableView

_REC = struct.Struct("<IIQQQQQQQ")
_DIGESTS = frozenset((Opcode.READ, Opcode.WRITE)) if native.DIGEST else frozenset()
_DIGEST_AT = 32  # a digest record's compare/swap words receive its 16 digest bytes
_NEED = {  # plain ints: enum flag arithmetic costs microseconds per request
    Opcode.READ: int(Access.REMOTE_READ),
    Opcode.WRITE: int(Access.REMOTE_WRITE),
    Opcode.CAS: int(Access.REMOTE_ATOMIC),
    Opcode.FAA: int(Access.REMOTE_ATOMIC),
}
_WRITES_REMOTE = Access.REMOTE_WRITE | Access.REMOTE_ATOMIC
_ST_OK, _ST_HANDOFF, _ST_REM_ACCESS, _ST_RETRY_EXC = 0, native.ST_HANDOFF, 10, 12
_ST_FLUSH = native.ST_FLUSH
_READ, _WRITE = Opcode.READ, Opcode.WRITE
_OP_DIGEST, _OP_HANDOFF, _OP_POPULATE = native.OP_DIGEST, native.OP_HANDOFF, native.OP_POPULATE
#: cold mappings are populated in chunks of this many bytes (see "First touch")
_CHUNK_SHIFT = 21
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23
_pack = _REC.pack
#: batches moving at least this many bytes run on the endpoint's Mover thread (posting returns at once); 0 runs
#: every batch inline, as before the Mover (for hosts without a spare core: see docs/decisions.md)
ASYNC_BYTES = int(os.environ.get("RDMAPOOL_SHM_ASYNC_BYTES", str(256 << 10)))
#: how long the Mover thread (between batches) and waiters (for a batch) busy-poll before they block: waking a
#: blocked thread costs tens of microseconds, more on an idle virtual CPU (see docs/decisions.md)
SPIN_US = int(os.environ.get("RDMAPOOL_SHM_SPIN_US", "100"))
#: how long quiesce/close/ordering points wait for the Mover to go idle (a copy of any sane batch is far less)
SETTLE_TIMEOUT_S = 60.0


@dataclass(slots=True)
class _Queued:
    """A batch on the Mover: what its completions need once it finishes."""

    wrs: Sequence[WorkRequest]
    recs: bytearray
    rec_wr: list[int]
    lengths: list[int]
    digest_rec: dict[int, int]
    signalled: int


@dataclass(frozen=True, slots=True)
class LocalRegion:
    """What an endpoint needs to check a local SGE."""

    addr: int
    end: int
    writable: bool
    cuda: bool = False  # GPU memory: copies to and from it go through the CUDA runtime, not memcpy


@dataclass(frozen=True, slots=True)
class _Remote:
    addr: int
    end: int
    access: int  # Access bits
    base: int  # where the region starts in this process's mapping
    valid_ptr: int
    seg: Segment
    cold: bytearray | None = None  # 1 per 2 MiB chunk whose page tables are not populated yet (None: all are)


class _Failure(Exception):
    def __init__(self, status: WcStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ShmEndpoint(Endpoint):
    def __init__(self, transport: ShmTransportLike, peer: naming.Owner, base: str, shm_dir: str,
                 table: TableView, pidfd: int) -> None:
        self._transport = transport
        self._local: dict[int, LocalRegion] = transport.local_regions
        self._peer = peer
        self._base = base
        self._dir = shm_dir
        self._table = table
        self._pidfd = pidfd
        self._remotes: dict[int, _Remote] = {}
        self._plans = PlanCache()
        self._cq: collections.deque[Completion] = collections.deque()
        self._state = EndpointState.READY
        self._lock = threading.Lock()
        self._handoff_error = ""
        self._mover = native.Mover(table.state_ptr, STATE_OPEN, pidfd, SPIN_US)
        self._queued: collections.deque[_Queued] = collections.deque()  # batches on the Mover, in order
        self._queued_signalled = 0
        self._handoffs = 0  # hand-off records encoded so far (a batch with any runs inline)

    # --- Endpoint interface -------------------------------------------------------------------------
    @property
    def state(self) -> EndpointState:
        return self._state

    @property
    def digests(self) -> frozenset[Opcode]:
        """The native mover hashes digest SGEs as it copies them (native/xxhash/digest.h)."""
        return _DIGESTS

    @property
    def asynchronous(self) -> bool:
        """Batches of at least `ASYNC_BYTES` run on the Mover thread (unless it is 0)."""
        return ASYNC_BYTES > 0

    @property
    def outstanding(self) -> int:
        return len(self._cq) + self._queued_signalled

    def post(self, wrs: Sequence[WorkRequest]) -> None:
        for wr in wrs:
            check_work_request(wr)
        with self._lock:
            if self._state is EndpointState.CLOSED:
                raise UsageError("post on a closed endpoint")
            if self._queued:
                self._reap()
            if self._state is EndpointState.ERROR:
                self._settle()
                self._flush(wrs, 0)
                return
            self._execute(wrs)

    def post_plan(self, plan: TransferPlan, opcode: Opcode, pairs: Sequence[tuple[int, int]], wr_id_base: int = 0,
                  signal_every: int = 1) -> int:
        """Native batching: the plan is resolved once (and again only after a mapping or local region goes
        away); each call hands the index pairs to the native mover without building WorkRequests."""
        if opcode not in (Opcode.READ, Opcode.WRITE):
            raise UsageError("post_plan moves bytes: opcode must be READ or WRITE")
        if signal_every < 1:
            raise UsageError("signal_every must be >= 1")
        n = len(pairs)
        signalled = n // signal_every + (1 if n % signal_every else 0)
        with self._lock:
            if self._state is EndpointState.CLOSED:
                raise UsageError("post on a closed endpoint")
            self._settle()  # plans run inline: after everything queued before them
            if self._state is EndpointState.ERROR:
                self._flush_plan(opcode, wr_id_base, 0, n)
                return signalled
            local, remote = self._resolved(plan)
            if local is None:  # GPU SGEs: requests one by one through post()
                return self._post_plan_slow(plan, opcode, pairs, wr_id_base, signal_every)
            try:
                done, status = native.run_plan(local, remote, pairs, int(opcode), self._table.state_ptr,
                                               STATE_OPEN, self._pidfd)
            except (IndexError, TypeError) as exc:
                raise UsageError(f"post_plan: {exc}") from None
            if status == _ST_RETRY_EXC:
                self._peer_lost([])
                self._cq.append(Completion(wr_id_base, WcStatus.RETRY_EXC_ERR, opcode, 0, self._lost_why()))
                self._flush_plan(opcode, wr_id_base, 1, n)
                return signalled
            for i in range(signal_every - 1, done, signal_every):
                self._cq.append(Completion(wr_id_base + i, WcStatus.SUCCESS, opcode, plan.local[pairs[i][0]].length))
            if status == _ST_OK:
                if n % signal_every:
                    self._cq.append(Completion(wr_id_base + n - 1, WcStatus.SUCCESS, opcode,
                                               plan.local[pairs[n - 1][0]].length))
                return signalled
            li, ri = pairs[done]
            addr, rkey = plan.remote[ri]
            failure = self._explain(WorkRequest(wr_id_base + done, opcode, (plan.local[li],), addr, rkey),
                                    WcStatus(status))
            self._cq.append(Completion(wr_id_base + done, failure.status, opcode, 0, failure.detail))
            self._state = EndpointState.ERROR
            self._flush_plan(opcode, wr_id_base, done + 1, n)
            return signalled

    def _post_plan_slow(self, plan: TransferPlan, opcode: Opcode, pairs: Sequence[tuple[int, int]],
                        wr_id_base: int, signal_every: int) -> int:
        n = len(pairs)
        wrs = []
        try:
            for i, (li, ri) in enumerate(pairs):
                addr, rkey = plan.remote[ri]
                signaled = (i + 1) % signal_every == 0 or i == n - 1
                wrs.append(WorkRequest(wr_id_base + i, opcode, (plan.local[li],), addr, rkey, signaled=signaled))
        except (IndexError, TypeError, ValueError) as exc:
            raise UsageError(f"post_plan: pair {i} is not a valid (local, remote) index pair: {exc}") from None
        self._execute(wrs)
        return sum(1 for w in wrs if w.signaled)

    def _resolved(self, plan: TransferPlan) -> tuple[bytes | None, bytes]:
        """Packed (local, remote) tables of a plan (see `plan`); local is None when it has GPU SGEs."""
        epoch = self._transport.local_epoch
        packed = self._plans.get(plan, epoch)
        if packed is None:
            packed = plan_tables.pack(plan, self._local, self._remote_or_status)
            self._plans.put(plan, epoch, packed)
        return packed

    def _remote_or_status(self, rkey: int) -> _Remote | int:
        try:
            return self._remotes.get(rkey) or self._map(rkey)
        except _Failure as f:
            return int(f.status)

    def _explain(self, wr: WorkRequest, status: WcStatus) -> _Failure:
        """The reason a request failed in the native mover, found again by the Python checks."""
        try:
            self._encode(wr, bytearray(), [], 0)
        except _Failure as f:
            return f
        if status is WcStatus.REM_ACCESS_ERR:
            self._drop(wr.rkey)
            return _Failure(status, f"rkey {wr.rkey:#x} was deregistered")
        return _Failure(status, "failed in the native mover")

    def _flush_plan(self, opcode: Opcode, wr_id_base: int, start: int, n: int) -> None:
        for i in range(start, n):
            self._cq.append(Completion(wr_id_base + i, WcStatus.WR_FLUSH_ERR, opcode, 0, "endpoint in error"))

    def poll(self, max_entries: int = 64) -> list[Completion]:
        if max_entries < 1:
            raise UsageError("poll needs max_entries >= 1")
        with self._lock:
            if self._queued:
                self._reap()
            n = min(max_entries, len(self._cq))
            return [self._cq.popleft() for _ in range(n)]

    def wait(self, count: int, timeout: float) -> list[Completion]:
        """Inline batches complete when `post` returns; queued ones are waited for on the Mover (GIL released)."""
        if timeout is None or timeout <= 0:
            raise UsageError("wait needs a positive timeout: every wait in rdmapool is bounded")
        cq = self._cq
        with self._lock:
            if self._queued:
                self._reap()
            if len(cq) >= count:
                return [cq.popleft() for _ in range(count)]
        deadline = time.monotonic() + timeout
        got: list[Completion] = []
        while True:
            with self._lock:
                if self._queued:
                    self._reap()
                take = min(count - len(got), len(cq))
                got.extend(cq.popleft() for _ in range(take))
                if len(got) >= count:
                    return got
                queued = bool(self._queued)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CompletionTimeout(f"{len(got)} of {count} completions after {timeout:.3f}s")
            if queued:
                self._mover.wait(remaining)
            else:  # nothing queued: nothing more will complete; wait out the timeout as the base class does
                time.sleep(min(remaining, 1e-3))

    def quiesce(self) -> None:
        """Return once no batch of this endpoint is running or queued (inline batches run under the lock; queued
        ones are waited for). The transport calls it after retracting a local region and before unmapping it,
        so no copy can touch unmapped memory."""
        with self._lock:
            self._settle()

    def close(self) -> None:
        with self._lock:
            if self._state is EndpointState.CLOSED:
                return
            self._settle()
            self._mover.close()
            self._state = EndpointState.CLOSED
            self._unmap_all()
            self._table.seg.close()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
        self._transport.forget_endpoint(self)

    # --- execution ----------------------------------------------------------------------------------
    def _execute(self, wrs: Sequence[WorkRequest]) -> None:
        recs = bytearray()
        rec_wr: list[int] = []
        lengths: list[int] = []
        digest_rec: dict[int, int] = {}  # request index -> its digest record
        fail_at, failure = len(wrs), None
        handoffs = self._handoffs
        for i, wr in enumerate(wrs):
            try:
                lengths.append(self._encode(wr, recs, rec_wr, i))
            except _Failure as f:
                fail_at, failure = i, f
                break
            if wr.digest is not None and _DIGESTS:
                rec = len(rec_wr) - len(wr.sgl) + wr.digest
                if recs[rec * _REC.size + 1] & (native.OP_DIGEST >> 8):  # _encode flagged it (host memory)
                    digest_rec[i] = rec
        if (failure is None and self._handoffs == handoffs and ASYNC_BYTES > 0
                and (self._queued or sum(lengths) >= ASYNC_BYTES)):
            self._mover.submit(recs, len(rec_wr))
            signalled = sum(1 for wr in wrs if wr.signaled)
            self._queued.append(_Queued(tuple(wrs), recs, rec_wr, lengths, digest_rec, signalled))
            self._queued_signalled += signalled
            return
        self._settle()  # inline from here: after everything queued before
        if self._state is not EndpointState.READY:  # a queued batch failed meanwhile: RC flushes this one
            self._flush(wrs, 0)
            return
        done, status = self._run(recs, len(rec_wr))
        self._complete(wrs, recs, rec_wr, lengths, digest_rec, fail_at, failure, done, status)

    def _reap(self) -> None:
        """Completions of the queued batches the Mover finished (under the lock)."""
        for done, status in self._mover.reap():
            q = self._queued.popleft()
            self._queued_signalled -= q.signalled
            if status == _ST_FLUSH:
                self._state = EndpointState.ERROR if self._state is EndpointState.READY else self._state
                self._flush(q.wrs, 0)
                continue
            self._complete(q.wrs, q.recs, q.rec_wr, q.lengths, q.digest_rec, len(q.wrs), None, done, status)

    def _settle(self) -> None:
        """Wait until the Mover is idle and take its completions (under the lock): an ordering point."""
        if not self._queued:
            return
        if not self._mover.wait(SETTLE_TIMEOUT_S, True):
            raise TransportError(f"shm mover still busy after {SETTLE_TIMEOUT_S}s")
        self._reap()

    def _complete(self, wrs: Sequence[WorkRequest], recs: bytearray, rec_wr: list[int], lengths: list[int],
                  digest_rec: dict[int, int], fail_at: int, failure: _Failure | None, done: int,
                  status: int) -> None:
        """Completions of one batch the mover ran, given its (done, status)."""
        if status == _ST_RETRY_EXC:
            self._peer_lost(wrs)
            return
        if status != _ST_OK:
            fail_at = rec_wr[done]
            rkey = wrs[fail_at].rkey
            if status == _ST_REM_ACCESS:
                failure = _Failure(WcStatus.REM_ACCESS_ERR, f"rkey {rkey:#x} was deregistered")
                self._drop(rkey)
            else:
                failure = _Failure(WcStatus(status), self._handoff_error)
        for i, (wr, length) in enumerate(zip(wrs[:fail_at], lengths, strict=False)):
            if wr.signaled:
                rec = digest_rec.get(i)
                digest = None if rec is None else bytes(recs[rec * _REC.size + _DIGEST_AT : rec * _REC.size + _DIGEST_AT + 16])
                self._cq.append(Completion(wr.wr_id, WcStatus.SUCCESS, wr.opcode, length, digest=digest))
        if failure is not None:
            wr = wrs[fail_at]
            self._cq.append(Completion(wr.wr_id, failure.status, wr.opcode, 0, failure.detail))
            self._state = EndpointState.ERROR
            self._flush(wrs, fail_at + 1)

    def _run(self, recs: bytearray, nrec: int) -> tuple[int, int]:
        """Run records through the native mover; records it hands back (GPU copies) run here, in order."""
        view = memoryview(recs)
        start = 0
        while True:
            done, status = native.run(view[start * _REC.size :], nrec - start, self._table.state_ptr, STATE_OPEN,
                                      self._pidfd)
            done += start
            if status != _ST_HANDOFF:
                return done, status
            status = self._run_handoff(recs, done)
            if status != _ST_OK:
                return done, status
            start = done + 1
            if start == nrec:  # the mover did not get to check liveness after this last record
                if not native.peer_alive(self._table.state_ptr, STATE_OPEN, self._pidfd):
                    return nrec, _ST_RETRY_EXC
                return nrec, _ST_OK

    def _run_handoff(self, recs: bytearray, index: int) -> int:
        op, _pad, local, remote, length, _c, _s, valid_ptr, rkey = _REC.unpack_from(recs, index * _REC.size)
        if native.load64(valid_ptr) != rkey:
            return _ST_REM_ACCESS
        op &= ~native.OP_HANDOFF
        try:
            if length:
                if op == Opcode.READ:
                    cuda.copy(local, remote, length, to_device=True)
                else:
                    cuda.copy(remote, local, length, to_device=False)
        except Exception as exc:  # a CUDA failure is this request's error completion, not a crash
            self._handoff_error = f"CUDA copy failed: {exc}"
            return int(WcStatus.LOC_PROT_ERR)
        return _ST_OK

    def _encode(self, wr: WorkRequest, recs: bytearray, rec_wr: list[int], index: int) -> int:
        """Check one request and append its records; returns its byte length, raises _Failure. (Runs once per
        request on the hot path: module-level constants instead of enum and module attribute lookups.)"""
        op = wr.opcode
        sgl = wr.sgl
        local = self._local
        moves = op is _READ or op is _WRITE
        on_gpu = False
        for sge in sgl:
            loc = local.get(sge.lkey)
            if loc is None or sge.addr < loc.addr or sge.addr + sge.length > loc.end or sge.length < 0:
                raise _Failure(WcStatus.LOC_PROT_ERR, f"local SGE {sge} is not inside a region with lkey {sge.lkey}")
            if op is not _WRITE and not loc.writable:
                raise _Failure(WcStatus.LOC_PROT_ERR, f"local SGE {sge} is in a region without LOCAL_WRITE")
            if loc.cuda:
                if not moves:
                    raise _Failure(WcStatus.LOC_PROT_ERR, "shm atomics need a host SGE, not GPU memory")
                on_gpu = True
        rkey = wr.rkey
        rem = self._remotes.get(rkey) or self._map(rkey)
        if not rem.access & _NEED[op]:
            raise _Failure(WcStatus.REM_ACCESS_ERR, f"rkey {rkey:#x} does not allow {op.name}")
        length = sgl[0].length if len(sgl) == 1 else sum(sge.length for sge in sgl)
        if wr.remote_addr < rem.addr or wr.remote_addr + length > rem.end:
            raise _Failure(WcStatus.REM_ACCESS_ERR,
                           f"[{wr.remote_addr:#x}, +{length}) is outside region {rkey:#x}")
        ptr = rem.base + (wr.remote_addr - rem.addr)
        valid = rem.valid_ptr
        if not moves:
            recs += _pack(op, 0, sgl[0].addr, ptr, 8, wr.compare, wr.swap, valid, rkey)
            rec_wr.append(index)
            return length
        cold = rem.cold
        if cold is not None and length:
            first = (wr.remote_addr - rem.addr) >> _CHUNK_SHIFT
            last = (wr.remote_addr - rem.addr + length - 1) >> _CHUNK_SHIFT
            if cold.find(1, first, last + 1) >= 0:
                self._populate(rem, first, last, recs, rec_wr, index, valid, rkey)
        want = wr.digest if _DIGESTS else None
        if on_gpu:
            self._handoffs += 1
        for k, sge in enumerate(sgl):
            if on_gpu and local[sge.lkey].cuda:
                # GPU memory is not hashed here: no digest for it (the caller hashes, or skips as the issue allows)
                code = op | _OP_HANDOFF
            else:
                code = op | _OP_DIGEST if k == want else op
            recs += _pack(code, 0, sge.addr, ptr, sge.length, 0, 0, valid, rkey)
            ptr += sge.length
        rec_wr.extend([index] * len(sgl))
        return length

    @staticmethod
    def _populate(rem: _Remote, first: int, last: int, recs: bytearray, rec_wr: list[int], index: int, valid: int,
                  rkey: int) -> None:
        """Populate records for the cold chunks first..last of `rem`, ahead of request `index`'s own records (a
        failure at one is that request's failure: the region was deregistered, as its copy would find)."""
        cold = rem.cold
        advice = _MADV_POPULATE_WRITE if rem.seg.writable else _MADV_POPULATE_READ
        chunk = 1 << _CHUNK_SHIFT
        k = first
        while k <= last:
            if not cold[k]:
                k += 1
                continue
            end = k
            while end <= last and cold[end]:
                end += 1
            start = k << _CHUNK_SHIFT
            recs += _pack(_OP_POPULATE, 0, 0, rem.base + start, min(end * chunk, rem.seg.size) - start, advice, 0,
                          valid, rkey)
            rec_wr.append(index)
            cold[k:end] = bytes(end - k)
            k = end

    def _map(self, rkey: int) -> _Remote:
        if rkey & LOCAL_ONLY:
            raise _Failure(WcStatus.REM_ACCESS_ERR,
                           f"rkey {rkey:#x} is a local-only registration (register() of a private buffer); "
                           "only allocate()d regions are reachable through shm")
        entry = self._table.lookup(rkey)
        if entry is None:
            raise _Failure(WcStatus.REM_ACCESS_ERR, f"rkey {rkey:#x} names no registered region")
        addr, length, access = entry
        path = os.path.join(self._dir, naming.region_name(self._base, rkey))
        writable = bool(access & _WRITES_REMOTE)
        try:
            try:
                seg = Segment.open(path, length, writable, self._transport.cuda_mode)
            except PermissionError:
                if not writable:
                    raise
                seg = Segment.open(path, length, False, self._transport.cuda_mode)
                access &= Access.REMOTE_READ  # the file mode grants reading only
        except FileNotFoundError:
            raise _Failure(WcStatus.REM_ACCESS_ERR, f"rkey {rkey:#x} was deregistered") from None
        except OSError as exc:
            raise _Failure(WcStatus.REM_ACCESS_ERR, f"cannot map region {rkey:#x}: {exc}") from None
        cold = bytearray(b"\x01") * -(-seg.size >> _CHUNK_SHIFT) if seg.size > POPULATE_MAX else None
        rem = _Remote(addr, addr + length, int(access), seg.addr, self._table.valid_ptr(rkey), seg, cold)
        self._remotes[rkey] = rem
        return rem

    def _drop(self, rkey: int) -> None:
        rem = self._remotes.pop(rkey, None)
        if rem is not None:
            self._plans.clear()  # resolved plans may point into this mapping
            rem.seg.close()

    def _unmap_all(self) -> None:
        for rkey in list(self._remotes):
            self._drop(rkey)

    def _lost_why(self) -> str:
        if not self._table.is_open():
            return "the owner closed its transport"
        return f"the owner (pid {self._peer.pid}) died"

    def _peer_lost(self, wrs: Sequence[WorkRequest]) -> None:
        closed = not self._table.is_open()
        if wrs:
            wr = wrs[0]
            self._cq.append(Completion(wr.wr_id, WcStatus.RETRY_EXC_ERR, wr.opcode, 0, self._lost_why()))
        self._state = EndpointState.ERROR
        self._flush(wrs, 1)
        self._unmap_all()
        if not closed:
            naming.sweep_stale(self._dir, self._base)

    def _flush(self, wrs: Sequence[WorkRequest], start: int) -> None:
        for wr in wrs[start:]:
            self._cq.append(Completion(wr.wr_id, WcStatus.WR_FLUSH_ERR, wr.opcode, 0, "endpoint in error"))


class ShmTransportLike(Protocol):
    """What an endpoint needs from its transport (kept narrow so the two modules do not import each other)."""

    local_regions: dict[int, LocalRegion]
    local_epoch: int  # bumped whenever a local region goes away (cached plans are then resolved again)
    cuda_mode: str

    def forget_endpoint(self, ep: ShmEndpoint) -> None: ...
