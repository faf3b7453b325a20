"""One RC queue pair as an `Endpoint`: batched posting with selective signalling, CQ polling, error handling.

Theory of operation
-------------------
Every request gets an internal sequence number, which is the wr_id the device sees; `_inflight` holds them in
posting order. An RC send queue completes in order, so a completion for sequence k retires every earlier entry
(the unsignalled ones succeeded silently). The device must see a signalled request now and then or unsignalled
ones never leave the send queue: the last request of every posted chunk, and every `sq_depth // 4`-th, is
signalled towards the device even when the caller did not ask for it; those *hidden* completions are dropped.

The first error completion (bad rkey, out of bounds, retry exceeded when the peer is gone) moves the endpoint to
ERROR: that request is reported with its status (signalled or not), every request still in flight and every one
posted later is reported as WR_FLUSH_ERR, and the queue pair is never posted to again (what the hardware still
flushes is drained and dropped). Recovery is the caller's: connect a new endpoint, or fail over.

Progress watchdog: a NIC reports RETRY_EXC_ERR by itself once a peer stops acknowledging for the dead-peer time
of `QpParams`. rxe in Debian's 6.1 kernel does not when the peer's queue pair is destroyed (measured in the VM:
no completion at all after 15 s, for ack timeouts 10, 14 and 17), so a request would hang. When requests are in
flight and the device has produced no completion for `stall_timeout` (default twice the dead-peer time, at least
5 s), `poll` reports RETRY_EXC_ERR itself and moves the queue pair to ERR. Hidden signals every
`HIDDEN_SIGNAL_EVERY` requests keep completions flowing during long unsignalled batches, so a slow but live
transfer is never mistaken for a dead peer.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rdmapool.errors import ServerUnavailable, UsageError
from rdmapool.transport.base import (
    Completion,
    Endpoint,
    EndpointState,
    Opcode,
    WcStatus,
    WorkRequest,
    check_work_request,
)
from rdmapool.transport.verbs_conn import QpParams, timeout_scale
from rdmapool.transport.verbs_enums import EnumTable, import_pyverbs
from rdmapool.transport.verbs_wr import build_chain, completion

POLL_BATCH = 64
HIDDEN_SIGNAL_EVERY = 64


@dataclass(slots=True)
class _Inflight:
    seq: int
    wr_id: int
    opcode: Opcode
    user_signaled: bool


class VerbsEndpoint(Endpoint):
    def __init__(self, e: EnumTable, qp: Any, cq: Any, params: QpParams, sq_depth: int,
                 stall_timeout: float | None = None, space_timeout: float = 30.0) -> None:
        self._e = e
        self._qp = qp
        self._cq = cq
        self.params = params
        self._sq_depth = sq_depth
        self._signal_every = max(1, min(HIDDEN_SIGNAL_EVERY, sq_depth // 4))
        self._stall_timeout = stall_timeout if stall_timeout else max(5.0, 2 * params.dead_peer_seconds) * timeout_scale()
        self._last_progress = time.monotonic()
        self._space_timeout = space_timeout
        self._state = EndpointState.READY
        self._inflight: deque[_Inflight] = deque()
        self._ready: deque[Completion] = deque()
        self._seq = 0
        self._visible_inflight = 0

    @property
    def state(self) -> EndpointState:
        return self._state

    @property
    def qp_num(self) -> int:
        return int(self._qp.qp_num)

    @property
    def outstanding(self) -> int:
        return self._visible_inflight + len(self._ready)

    def post(self, wrs: Sequence[WorkRequest]) -> None:
        if self._state == EndpointState.CLOSED:
            raise UsageError("post on a closed endpoint")
        for wr in wrs:
            check_work_request(wr)
        if self._state == EndpointState.ERROR:
            self._ready.extend(self._flushed(wr.wr_id, wr.opcode) for wr in wrs)
            return
        chunk = max(1, self._sq_depth // 2)
        for start in range(0, len(wrs), chunk):
            if self._state != EndpointState.READY:
                self._ready.extend(self._flushed(wr.wr_id, wr.opcode) for wr in wrs[start:])
                return
            self._post_chunk(wrs[start:start + chunk])

    def _post_chunk(self, wrs: Sequence[WorkRequest]) -> None:
        self._make_room(len(wrs))
        if self._state != EndpointState.READY:
            self._ready.extend(self._flushed(wr.wr_id, wr.opcode) for wr in wrs)
            return
        seqs, hw_signal, entries = [], [], []
        for i, wr in enumerate(wrs):
            self._seq += 1
            seqs.append(self._seq)
            hw_signal.append(wr.signaled or i == len(wrs) - 1 or self._seq % self._signal_every == 0)
            entries.append(_Inflight(self._seq, wr.wr_id, wr.opcode, wr.signaled))
        chain = build_chain(self._e, wrs, seqs, hw_signal)
        if not self._inflight:
            self._last_progress = time.monotonic()
        try:
            self._qp.post_send(chain[0])
        except Exception as exc:  # the provider refused the list (e.g. QP already in error): nothing was queued
            self._enter_error()
            self._ready.extend(self._flushed(wr.wr_id, wr.opcode, f"post_send failed: {exc}") for wr in wrs)
            return
        self._inflight.extend(entries)
        self._visible_inflight += sum(1 for w in wrs if w.signaled)

    def _make_room(self, count: int) -> None:
        deadline = time.monotonic() + self._space_timeout
        while len(self._inflight) + count > self._sq_depth and self._state == EndpointState.READY:
            if not self._drain_device():
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"send queue full for {self._space_timeout:.0f}s: peer not responding")
                time.sleep(20e-6)

    def poll(self, max_entries: int = 64) -> list[Completion]:
        if max_entries < 1:
            raise UsageError("poll needs max_entries >= 1")
        if self._state != EndpointState.CLOSED and len(self._ready) < max_entries:
            self._drain_device()
            if self._inflight and time.monotonic() - self._last_progress > self._stall_timeout:
                self._declare_dead_peer()
        out = []
        while self._ready and len(out) < max_entries:
            out.append(self._ready.popleft())
        return out

    def _declare_dead_peer(self) -> None:
        entry = self._inflight.popleft()
        if entry.user_signaled:
            self._visible_inflight -= 1
        self._ready.append(Completion(entry.wr_id, WcStatus.RETRY_EXC_ERR, entry.opcode, 0,
                                      f"no progress for {self._stall_timeout:.1f}s (software watchdog)"))
        self._enter_error()
        with contextlib.suppress(Exception):  # stop the device retrying; we never post here again anyway
            attr = import_pyverbs("qp").QPAttr(qp_state=self._e.IBV_QPS_ERR)
            self._qp.modify(attr, self._e.IBV_QP_STATE)

    def _drain_device(self) -> int:
        """Move device completions into `_ready`; returns how many the device produced."""
        npolled, wcs = self._cq.poll(POLL_BATCH)
        if npolled:
            self._last_progress = time.monotonic()
        for wc in wcs[:npolled]:
            if self._state != EndpointState.READY:
                continue  # flushes of an endpoint already reported as failed
            self._retire(int(wc.wr_id), int(wc.status), int(wc.byte_len), int(wc.vendor_err))
        return npolled

    def _retire(self, seq: int, status: int, byte_len: int, vendor_err: int) -> None:
        while self._inflight and self._inflight[0].seq < seq:
            entry = self._inflight.popleft()  # unsignalled, completed before `seq`: succeeded
            if entry.user_signaled:  # cannot happen on RC (in-order completion); keep the count honest anyway
                self._visible_inflight -= 1
                self._ready.append(Completion(entry.wr_id, WcStatus.SUCCESS, entry.opcode))
        if not self._inflight or self._inflight[0].seq != seq:
            return  # a completion for something already retired: ignore
        entry = self._inflight.popleft()
        done = completion(entry.wr_id, entry.opcode, status, byte_len, vendor_err)
        if entry.user_signaled:
            self._visible_inflight -= 1
        if done.ok:
            if entry.user_signaled:
                self._ready.append(done)
            return
        self._ready.append(done)
        self._enter_error()

    def _enter_error(self) -> None:
        self._state = EndpointState.ERROR
        while self._inflight:
            entry = self._inflight.popleft()
            self._ready.append(self._flushed(entry.wr_id, entry.opcode))
        self._visible_inflight = 0

    @staticmethod
    def _flushed(wr_id: int, opcode: Opcode, detail: str = "endpoint in error state") -> Completion:
        return Completion(wr_id, WcStatus.WR_FLUSH_ERR, opcode, 0, detail)

    def close(self) -> None:
        if self._state == EndpointState.CLOSED:
            return
        while self._inflight:
            entry = self._inflight.popleft()
            self._ready.append(self._flushed(entry.wr_id, entry.opcode, "endpoint closed"))
        self._visible_inflight = 0
        self._state = EndpointState.CLOSED
        for obj in (self._qp, self._cq):
            with contextlib.suppress(Exception):  # already released with its protection domain / context
                obj.close()

    def _block(self, remaining: float) -> None:
        time.sleep(min(remaining, 20e-6))
