"""Fault injection for any `Endpoint` (initiator side): what real RDMA does that a friendly loopback does not.

Theory of operation
-------------------
`FaultyEndpoint` wraps an endpoint of any backend and keeps its own list of *slots*, one per request posted
through it, in posting order. Requests go to the inner endpoint under internal wr_ids (the slot's sequence
number); inner completions are routed back to slots. Because the inner endpoint completes in order, an inner
completion for slot k also completes every earlier unsignalled slot. Completions are handed to the caller from
the head of the slot list only (posting order is kept within an endpoint), each not before its *release time*.

Faults, switched on and off at any time:
- torn READs (`tear_reads`): a READ is split into `pieces` sub-reads over byte ranges of its SGE list, executed
  one at a time in random order, with an optional delay and a test hook between them; an overwrite that runs
  in the hook or concurrently lands in some pieces and not others, so the READ returns a mix of old and new
  bytes, as an RDMA READ overlapping a WRITE may. The sub-reads run synchronously inside `post`.
- delayed and reordered completions (`delay_completions`): each completion is released after a random delay
  between `min_delay_s` and `max_delay_s` (a floor makes a fast backend a slow link, deterministically), and
  at least `spacing_s` after the one before it (a link of limited bandwidth: completions arrive one by one,
  never in a burst, however the caller's polls fall); release times are monotonic within an endpoint (order
  kept) but independent across endpoints sharing a `Faults`, so completions of different endpoints arrive
  reordered.
- QP failure (`fail`): at once (the oldest request not yet completed gets the status, e.g. RETRY_EXC_ERR as
  when the peer vanishes) or at the n-th request posted from now (it gets the status, e.g. REM_ACCESS_ERR).
  Either way the endpoint is in ERROR from then on: every later request, and every outstanding one behind the
  failed one, completes with WR_FLUSH_ERR; the inner endpoint is closed.

The clock and the random generator are injected (`Faults(seed, clock)`), so tests are deterministic.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rdmapool.errors import UsageError
from rdmapool.transport.base import (
    Completion,
    Endpoint,
    EndpointState,
    Exchange,
    MemoryKind,
    MemoryRegion,
    Opcode,
    Sge,
    Transport,
    WcStatus,
    WorkRequest,
    check_work_request,
)

#: called between the sub-reads of a torn READ: (original request, number of pieces done so far)
TearHook = Callable[[WorkRequest, int], None]


@dataclass(frozen=True, slots=True)
class TornReads:
    """How to tear READs: into `pieces` sub-reads (READs shorter than `min_length` are left whole)."""

    pieces: int = 4
    delay_s: float = 0.0
    hook: TearHook | None = None
    min_length: int = 2
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.pieces < 2:
            raise UsageError("a torn READ needs at least 2 pieces")
        if self.delay_s < 0 or self.timeout_s <= 0:
            raise UsageError("delay_s must be >= 0 and timeout_s > 0")


class Faults:
    """Shared fault state for a group of endpoints: random generator, clock, and `wrap`."""

    def __init__(self, seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.rng = random.Random(seed)
        self.clock = clock

    def wrap(self, endpoint: Endpoint) -> FaultyEndpoint:
        return FaultyEndpoint(endpoint, self)


@dataclass
class _Slot:
    wr: WorkRequest
    seq: int
    status: WcStatus | None = None
    release_at: float = 0.0
    torn: bool = False


@dataclass
class _Failure:
    status: WcStatus
    countdown: int  # requests still to post before the failing one


class FaultyEndpoint(Endpoint):
    """An endpoint of any backend with faults injected on demand (see module docstring)."""

    def __init__(self, inner: Endpoint, faults: Faults | None = None) -> None:
        self._inner = inner
        self._faults = faults or Faults()
        self._slots: deque[_Slot] = deque()
        self._by_seq: dict[int, _Slot] = {}
        self._next_seq = 0
        self._torn: TornReads | None = None
        self._min_delay = self._max_delay = self._spacing = 0.0
        self._last_release = 0.0
        self._pending_failure: _Failure | None = None
        self._failed = False
        self._closed = False
        self._outstanding = 0

    # -- switches ----------------------------------------------------------------------------------------

    def tear_reads(self, how: TornReads | None = TornReads()) -> None:
        """Tear every READ posted from now on (None switches it off)."""
        self._torn = how

    def delay_completions(self, max_delay_s: float, min_delay_s: float = 0.0, spacing_s: float = 0.0) -> None:
        if not 0 <= min_delay_s <= max_delay_s:
            raise UsageError("delays must satisfy 0 <= min_delay_s <= max_delay_s")
        if spacing_s < 0:
            raise UsageError("spacing_s must be >= 0")
        self._min_delay, self._max_delay, self._spacing = min_delay_s, max_delay_s, spacing_s

    def fail(self, status: WcStatus = WcStatus.RETRY_EXC_ERR, after: int | None = None) -> None:
        """Fail as a QP does: now (after=None) or at the `after`-th request posted from now (0 = the next)."""
        if status in (WcStatus.SUCCESS, WcStatus.WR_FLUSH_ERR):
            raise UsageError("inject a real error status (e.g. RETRY_EXC_ERR, REM_ACCESS_ERR)")
        if after is None:
            self._fail_now(status)
        else:
            if after < 0:
                raise UsageError("after must be >= 0")
            self._pending_failure = _Failure(status, after)

    # -- Endpoint ----------------------------------------------------------------------------------------

    @property
    def inner(self) -> Endpoint:
        return self._inner

    @property
    def state(self) -> EndpointState:
        if self._closed:
            return EndpointState.CLOSED
        if self._failed:
            return EndpointState.ERROR
        return self._inner.state

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def asynchronous(self) -> bool:
        """As the wrapped endpoint (torn READs run synchronously inside `post`, everything else moves as there)."""
        return self._inner.asynchronous

    @property
    def sends_in_background(self) -> bool:
        return self._inner.sends_in_background

    def post(self, wrs: Sequence[WorkRequest]) -> None:
        if self._closed:
            raise UsageError("endpoint is closed")
        for wr in wrs:
            check_work_request(wr)
        batch: list[WorkRequest] = []
        for wr in wrs:
            slot = self._new_slot(wr)
            if self._failed:
                self._finish(slot, WcStatus.WR_FLUSH_ERR)
                continue
            failure = self._pending_failure
            if failure is not None:
                if failure.countdown == 0:
                    self._flush_inner(batch)
                    self._pending_failure = None
                    self._failed = True
                    self._finish(slot, failure.status)  # the inner QP is closed once earlier ones complete
                    continue
                failure.countdown -= 1
            if self._torn and wr.opcode == Opcode.READ and wr.length >= max(self._torn.min_length, 2):
                self._flush_inner(batch)
                self._tear(slot, self._torn)
                continue
            batch.append(replace(wr, wr_id=slot.seq))
        self._flush_inner(batch)

    def poll(self, max_entries: int = 64) -> list[Completion]:
        self._drain_inner()
        now = self._faults.clock()
        out: list[Completion] = []
        while self._slots and len(out) < max_entries:
            slot = self._slots[0]
            if slot.status is None or slot.release_at > now:
                break
            self._slots.popleft()
            del self._by_seq[slot.seq]
            if slot.wr.signaled or slot.status != WcStatus.SUCCESS:
                if slot.wr.signaled:
                    self._outstanding -= 1
                length = slot.wr.length if slot.status == WcStatus.SUCCESS else 0
                out.append(Completion(slot.wr.wr_id, slot.status, slot.wr.opcode, length))
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inner.close()

    # -- internals ---------------------------------------------------------------------------------------

    def _new_slot(self, wr: WorkRequest) -> _Slot:
        slot = _Slot(wr, self._next_seq)
        self._next_seq += 1
        self._slots.append(slot)
        self._by_seq[slot.seq] = slot
        if wr.signaled:
            self._outstanding += 1
        return slot

    def _finish(self, slot: _Slot, status: WcStatus) -> None:
        if slot.status is not None:
            return
        slot.status = status
        release = self._faults.clock()
        if self._max_delay:
            release += self._faults.rng.uniform(self._min_delay, self._max_delay)
        self._last_release = slot.release_at = max(self._last_release + self._spacing, release)

    def _flush_inner(self, batch: list[WorkRequest]) -> None:
        if batch:
            self._inner.post(batch)
            batch.clear()

    def _drain_inner(self) -> None:
        if self._closed or self._inner.state == EndpointState.CLOSED:
            return
        for c in self._inner.poll(1 << 16):
            self._route(c)
        if self._failed and all(s.status is not None for s in self._slots):
            self._inner.close()

    def _route(self, c: Completion) -> None:
        slot = self._by_seq.get(c.wr_id)
        if slot is None or slot.torn:
            return
        # in order: every earlier unsignalled request has been executed (or flushed, if this one was)
        earlier = WcStatus.WR_FLUSH_ERR if c.status == WcStatus.WR_FLUSH_ERR else WcStatus.SUCCESS
        for s in self._slots:
            if s.seq >= slot.seq:
                break
            if not s.torn and s.status is None and not s.wr.signaled:
                self._finish(s, earlier)
        self._finish(slot, c.status)
        if c.status != WcStatus.SUCCESS:
            self._failed = True

    def _fail_now(self, status: WcStatus) -> None:
        self._drain_inner()
        pending = [s for s in self._slots if s.status is None]
        if not pending:  # nothing in flight: the next request is the one that finds the QP broken
            self._pending_failure = _Failure(status, 0)
            return
        self._finish(pending[0], status)
        for slot in pending[1:]:
            self._finish(slot, WcStatus.WR_FLUSH_ERR)
        self._failed = True
        self._inner.close()

    def _tear(self, slot: _Slot, how: TornReads) -> None:
        """Run the READ as sub-reads in random order; its status is the first error or SUCCESS."""
        slot.torn = True
        pieces = _split(slot.wr.sgl, how.pieces)
        order = list(range(len(pieces)))
        self._faults.rng.shuffle(order)
        status = WcStatus.SUCCESS
        for done, i in enumerate(order):
            offset, sgl = pieces[i]
            sub = WorkRequest(slot.seq, Opcode.READ, sgl, slot.wr.remote_addr + offset, slot.wr.rkey)
            self._inner.post([sub])
            got = self._wait_for(slot.seq, how.timeout_s)
            if got != WcStatus.SUCCESS:
                status = got
                break
            if done + 1 < len(order):
                if how.delay_s:
                    time.sleep(how.delay_s)
                if how.hook is not None:
                    how.hook(slot.wr, done + 1)
        self._finish(slot, status)
        if status != WcStatus.SUCCESS:
            self._failed = True

    def _wait_for(self, seq: int, timeout: float) -> WcStatus:
        """Wait for the inner completion of a sub-read (routing others as they come)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in self._inner.poll(1 << 16):
                if c.wr_id == seq and self._by_seq[seq].torn:
                    return c.status
                self._route(c)
            time.sleep(20e-6)
        return WcStatus.RETRY_EXC_ERR


def _split(sgl: tuple[Sge, ...], pieces: int) -> list[tuple[int, tuple[Sge, ...]]]:
    """Cut an SGE list into up to `pieces` contiguous byte ranges: [(offset, sub-SGE list), ...]."""
    total = sum(s.length for s in sgl)
    pieces = min(pieces, total)
    bounds = [total * i // pieces for i in range(pieces + 1)]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        sub, pos = [], 0
        for s in sgl:
            a, b = max(lo, pos), min(hi, pos + s.length)
            if a < b:
                sub.append(Sge(s.addr + a - pos, b - a, s.lkey))
            pos += s.length
        out.append((lo, tuple(sub)))
    return out


@dataclass
class FaultyTransport(Transport):
    """A transport whose endpoints are `FaultyEndpoint`s sharing one `Faults`; everything else is delegated.
    The endpoints it made are in `endpoints`, so a test can switch faults on for them."""

    inner: Transport
    faults: Faults = field(default_factory=Faults)
    endpoints: list[FaultyEndpoint] = field(default_factory=list)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"faulty-{self.inner.name}"

    def allocate(self, length: int, kind: MemoryKind = MemoryKind.HOST, access: Any = None) -> MemoryRegion:
        return self.inner.allocate(length, kind) if access is None else self.inner.allocate(length, kind, access)

    def register(self, buffer: Any, access: Any = None) -> MemoryRegion:
        return self.inner.register(buffer) if access is None else self.inner.register(buffer, access)

    def deregister(self, region: MemoryRegion) -> None:
        self.inner.deregister(region)

    def peer_info(self) -> dict:
        return self.inner.peer_info()

    def connect(self, peer_info: dict, exchange: Exchange | None = None, timeout: float = 5.0) -> Endpoint:
        ep = self.faults.wrap(self.inner.connect(peer_info, exchange, timeout))
        self.endpoints.append(ep)
        return ep

    def accept(self, request: dict) -> dict:
        return self.inner.accept(request)

    def close(self) -> None:
        self.inner.close()
