"""VerbsEndpoint's bookkeeping against a fake RC queue pair that behaves like the hardware: in-order execution,
a completion per signalled request, an error completion for a failing one (signalled or not) and flushes for
everything after it."""

from dataclasses import dataclass, field

import pytest

from rdmapool.errors import UsageError
from rdmapool.transport import verbs_endpoint
from rdmapool.transport.base import EndpointState, Sge, WcStatus, WorkRequest
from rdmapool.transport.verbs_conn import QpParams
from rdmapool.transport.verbs_endpoint import VerbsEndpoint

GOOD, BAD = 7, 8
SIG, FLUSH, REM_ACCESS = 2, 5, 10


@dataclass
class FakeWR:
    wr_id: int
    rkey: int
    signaled: bool
    next_wr: "FakeWR | None" = None


@dataclass
class FakeWC:
    wr_id: int
    status: int
    byte_len: int = 8
    vendor_err: int = 0


@dataclass
class FakeQueuePair:
    depth: int
    queue: list = field(default_factory=list)  # posted, not yet executed
    cqes: list = field(default_factory=list)
    in_error: bool = False
    posted: int = 0
    max_depth_seen: int = 0
    closed: bool = False
    dead: bool = False  # the peer vanished and the device never says so (rxe in 6.1)
    qp_num: int = 17

    def post_send(self, head):
        wr = head
        while wr is not None:
            self.queue.append(wr)
            self.posted += 1
            wr = wr.next_wr
        self.max_depth_seen = max(self.max_depth_seen, len(self.queue))
        if len(self.queue) > self.depth:
            raise RuntimeError("send queue overflow")

    def run(self):
        if self.dead:
            return
        for wr in self.queue:
            if self.in_error:
                self.cqes.append(FakeWC(wr.wr_id, FLUSH))
            elif wr.rkey == BAD:
                self.in_error = True
                self.cqes.append(FakeWC(wr.wr_id, REM_ACCESS))
            elif wr.signaled:
                self.cqes.append(FakeWC(wr.wr_id, 0))
        self.queue.clear()

    # the CQ side
    def poll(self, n):
        self.run()
        out, self.cqes = self.cqes[:n], self.cqes[n:]
        return len(out), out

    def close(self):
        self.closed = True

    def modify(self, attr, mask):
        self.in_error = True


@pytest.fixture()
def fake(monkeypatch):
    def chain(e, wrs, ids, signaled):
        objs = [FakeWR(i, wr.rkey, s) for wr, i, s in zip(wrs, ids, signaled, strict=True)]
        for a, b in zip(objs, objs[1:], strict=False):
            a.next_wr = b
        return objs

    monkeypatch.setattr(verbs_endpoint, "build_chain", chain)
    qp = FakeQueuePair(depth=16)
    ep = VerbsEndpoint(None, qp, qp, QpParams(3, 16, 16, 17, 7), sq_depth=16)
    return qp, ep


def read(i, rkey=GOOD, signaled=True):
    return WorkRequest.read(i, Sge(0x1000, 8, 1), 0x2000, rkey, signaled=signaled)


def test_selective_signalling_returns_only_signalled(fake):
    qp, ep = fake
    done = ep.execute([read(i, signaled=i % 4 == 3) for i in range(8)], timeout=1)
    assert [c.wr_id for c in done] == [3, 7] and all(c.ok for c in done)
    assert ep.outstanding == 0 and ep.poll() == []


def test_long_unsignalled_batches_never_overflow_the_send_queue(fake):
    qp, ep = fake
    ep.post([read(i, signaled=False) for i in range(100)])  # hidden signals retire them
    ep.execute([read(100)], timeout=1)
    assert qp.posted == 101 and qp.max_depth_seen <= 16
    assert ep.outstanding == 0


def test_error_moves_endpoint_to_error_and_flushes_the_rest(fake):
    qp, ep = fake
    ep.post([read(0), read(1, rkey=BAD, signaled=False), read(2, signaled=False), read(3)])
    done = ep.wait(3, timeout=1)  # the failing unsignalled request is reported too
    rest = ep.poll()
    statuses = [(c.wr_id, c.status) for c in done + rest]
    assert statuses == [(0, WcStatus.SUCCESS), (1, WcStatus.REM_ACCESS_ERR), (2, WcStatus.WR_FLUSH_ERR),
                        (3, WcStatus.WR_FLUSH_ERR)]
    assert ep.state == EndpointState.ERROR
    posted = qp.posted
    later = ep.execute([read(9)], timeout=1)
    assert later[0].status == WcStatus.WR_FLUSH_ERR and qp.posted == posted  # never touches the QP again
    assert ep.poll() == []  # the fake's own flushes were drained and dropped


def test_close_flushes_outstanding_and_forbids_posting(fake):
    qp, ep = fake
    ep.post([read(0), read(1)])
    ep.close()
    assert [c.status for c in ep.poll()] == [WcStatus.WR_FLUSH_ERR] * 2
    assert qp.closed and ep.state == EndpointState.CLOSED
    with pytest.raises(UsageError):
        ep.post([read(2)])


def test_local_mistakes_are_usage_errors_before_posting(fake):
    qp, ep = fake
    with pytest.raises(UsageError):
        ep.post([WorkRequest.cas(1, Sge(0x1000, 8, 1), 0x2001, GOOD, 0, 1)])  # misaligned atomic
    assert qp.posted == 0


def test_watchdog_turns_a_silent_dead_peer_into_retry_exceeded(monkeypatch):
    qp = FakeQueuePair(depth=16, dead=True)
    monkeypatch.setattr(verbs_endpoint, "build_chain", lambda e, wrs, ids, sig: [
        FakeWR(i, w.rkey, s) for w, i, s in zip(wrs, ids, sig, strict=True)][:1])
    ep = VerbsEndpoint(None, qp, qp, QpParams(3, 16, 16, 17, 7), sq_depth=16, stall_timeout=0.05)
    ep.post([read(0, signaled=False), read(1)])
    got = ep.wait(2, timeout=5)
    assert [(c.wr_id, c.status) for c in got] == [(0, WcStatus.RETRY_EXC_ERR), (1, WcStatus.WR_FLUSH_ERR)]
    assert "watchdog" in got[0].detail and ep.state == EndpointState.ERROR


def test_default_watchdog_is_twice_the_dead_peer_time(fake):
    qp, _ = fake
    ep = VerbsEndpoint(None, qp, qp, QpParams(3, 16, 16, 17, 7), sq_depth=16)
    assert ep._stall_timeout == pytest.approx(2 * 4.295, rel=1e-3)
