"""Fault injection (rdmapool.transport.faults) around endpoints of every backend."""

from __future__ import annotations

import contextlib
import time

import pytest

from rdmapool.errors import UsageError
from rdmapool.transport import EndpointState, Opcode, Sge, WcStatus, WorkRequest
from rdmapool.transport.faults import Faults, FaultyEndpoint, FaultyTransport, TornReads, _split

T = 20.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_split_covers_the_sge_list_exactly():
    sgl = (Sge(1000, 10, 1), Sge(5000, 3, 2), Sge(9000, 7, 3))
    pieces = _split(sgl, 4)
    assert [off for off, _ in pieces] == [0, 5, 10, 15]
    flat = [(s.addr + i, s.lkey) for _, sub in pieces for s in sub for i in range(s.length)]
    want = [(s.addr + i, s.lkey) for s in sgl for i in range(s.length)]
    assert flat == want
    assert len(_split((Sge(0, 3, 1),), 8)) == 3  # never more pieces than bytes


def test_torn_read_returns_a_mix_of_old_and_new_bytes(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(8192)
    remote.view[:] = b"A" * 4096
    local.view[4096:] = b"B" * 4096
    faults = Faults(seed=3)
    with client.connect(server.peer_info()) as raw, client.connect(server.peer_info()) as writer:
        ep = faults.wrap(raw)
        calls = []

        def overwrite(wr: WorkRequest, done: int) -> None:
            calls.append(done)
            if done == 1:  # a concurrent WRITE lands between the first and the second piece
                (c,) = writer.execute([WorkRequest.write(9, local.sge(4096, 4096), remote.remote(0), remote.rkey)], T)
                assert c.ok

        ep.tear_reads(TornReads(pieces=4, hook=overwrite))
        (c,) = ep.execute([WorkRequest.read(1, local.sge(0, 4096), remote.remote(0), remote.rkey)], T)
        assert c.ok and c.wr_id == 1 and c.byte_len == 4096
        assert calls == [1, 2, 3]
        quarters = [bytes(local.view[i * 1024:(i + 1) * 1024]) for i in range(4)]
        assert sorted(q[:1] for q in quarters) == [b"A", b"B", b"B", b"B"]  # one piece old, three new
        assert all(q in (b"A" * 1024, b"B" * 1024) for q in quarters)
        ep.tear_reads(None)  # off again: whole READs
        (c,) = ep.execute([WorkRequest.read(2, local.sge(0, 4096), remote.remote(0), remote.rkey)], T)
        assert c.ok and bytes(local.view[:4096]) == b"B" * 4096


def test_torn_reads_keep_order_with_other_requests(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    local.view[:8] = b"12345678"
    with client.connect(server.peer_info()) as raw:
        ep = FaultyEndpoint(raw, Faults(seed=1))
        ep.tear_reads(TornReads(pieces=3))
        wrs = [WorkRequest.write(1, local.sge(0, 8), remote.remote(0), remote.rkey, signaled=False),
               WorkRequest.read(2, local.sge(100, 8), remote.remote(0), remote.rkey),
               WorkRequest.write(3, local.sge(0, 8), remote.remote(8), remote.rkey)]
        got = ep.execute(wrs, T)
        assert [(c.wr_id, c.status) for c in got] == [(2, WcStatus.SUCCESS), (3, WcStatus.SUCCESS)]
        assert bytes(local.view[100:108]) == b"12345678"


def test_completions_delayed_and_reordered_across_endpoints(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    clock = FakeClock()
    faults = Faults(seed=7, clock=clock)
    with client.connect(server.peer_info()) as a_raw, client.connect(server.peer_info()) as b_raw:
        a, b = faults.wrap(a_raw), faults.wrap(b_raw)
        for ep in (a, b):
            ep.delay_completions(1.0)
        n = 20
        posted = []
        for i in range(n):  # posted alternately: a0 b0 a1 b1 ...
            a.post([WorkRequest.read(i, local.sge(0, 8), remote.remote(0), remote.rkey)])
            b.post([WorkRequest.read(100 + i, local.sge(8, 8), remote.remote(0), remote.rkey)])
            posted += [i, 100 + i]
        arrivals: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # let the inner endpoints finish (tcp: in polls); the fake clock
            arrivals += [c.wr_id for c in a.poll() + b.poll()]  # stands still, so nothing is released
            if a.inner.outstanding == 0 and b.inner.outstanding == 0:
                break
            time.sleep(0.001)
        assert a.inner.outstanding == 0 and b.inner.outstanding == 0 and arrivals == []
        steps = 0
        while len(arrivals) < 2 * n and steps < 200:
            clock.now += 0.01
            steps += 1
            arrivals += [c.wr_id for c in a.poll()] + [c.wr_id for c in b.poll()]
        assert sorted(arrivals) == list(range(n)) + list(range(100, 100 + n))
        from_a = [w for w in arrivals if w < 100]
        from_b = [w for w in arrivals if w >= 100]
        assert from_a == sorted(from_a) and from_b == sorted(from_b)  # order kept within an endpoint
        assert arrivals != posted  # ... but reordered across endpoints
        assert steps > 10  # and delayed


def test_fail_now_like_a_vanished_peer(pair):
    server, client = pair
    remote = server.allocate(8 << 20)
    local = client.allocate(8 << 20)
    with client.connect(server.peer_info()) as raw:
        ep = FaultyEndpoint(raw)
        ep.post([WorkRequest.read(i, local.sge(0, 8 << 20), remote.remote(0), remote.rkey) for i in range(8)])
        ep.fail(WcStatus.RETRY_EXC_ERR)
        got = ep.wait(8, T)
        statuses = [c.status for c in got]
        assert [c.wr_id for c in got] == list(range(8))
        errs = [s for s in statuses if s != WcStatus.SUCCESS]
        ep.post([WorkRequest.read(50, local.sge(0, 8), remote.remote(0), remote.rkey)])
        (late,) = ep.wait(1, T)
        if errs:  # the failure hit requests in flight: the first gets the status, the rest flush
            assert errs[0] == WcStatus.RETRY_EXC_ERR and set(errs[1:]) <= {WcStatus.WR_FLUSH_ERR}
            assert statuses[statuses.index(WcStatus.RETRY_EXC_ERR):].count(WcStatus.SUCCESS) == 0
            assert late.status == WcStatus.WR_FLUSH_ERR
        else:  # a synchronous backend had finished everything: the next request finds the QP broken
            assert late.status == WcStatus.RETRY_EXC_ERR
        assert ep.state == EndpointState.ERROR
        ep.post([WorkRequest.read(51, local.sge(0, 8), remote.remote(0), remote.rkey)])
        assert [(c.wr_id, c.status) for c in ep.wait(1, T)] == [(51, WcStatus.WR_FLUSH_ERR)]


def test_fail_at_the_nth_request_like_a_remote_access_error(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    with client.connect(server.peer_info()) as raw:
        ep = FaultyEndpoint(raw)
        ep.fail(WcStatus.REM_ACCESS_ERR, after=2)
        got = ep.execute([WorkRequest.write(i, local.sge(0, 8), remote.remote(0), remote.rkey) for i in range(5)], T)
        assert [c.status for c in got] == [WcStatus.SUCCESS] * 2 + [WcStatus.REM_ACCESS_ERR] + [WcStatus.WR_FLUSH_ERR] * 2
        assert ep.state == EndpointState.ERROR


def test_fail_with_nothing_in_flight_hits_the_next_request(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    ep = FaultyEndpoint(client.connect(server.peer_info()))
    ep.fail(WcStatus.RETRY_EXC_ERR)
    got = ep.execute([WorkRequest.read(i, local.sge(0, 8), remote.remote(0), remote.rkey) for i in range(3)], T)
    assert [c.status for c in got] == [WcStatus.RETRY_EXC_ERR, WcStatus.WR_FLUSH_ERR, WcStatus.WR_FLUSH_ERR]
    ep.close()
    assert ep.state == EndpointState.CLOSED
    with pytest.raises(UsageError):
        ep.fail(WcStatus.SUCCESS)


def test_real_errors_pass_through(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    with client.connect(server.peer_info()) as raw:
        ep = FaultyEndpoint(raw)
        got = ep.execute([WorkRequest.write(0, local.sge(0, 8), remote.remote(0), remote.rkey, signaled=False),
                          WorkRequest.read(1, local.sge(0, 8), remote.remote(0), remote.rkey + 1),
                          WorkRequest.read(2, local.sge(0, 8), remote.remote(0), remote.rkey)], T)
        assert [(c.wr_id, c.status) for c in got] == [(1, WcStatus.REM_ACCESS_ERR), (2, WcStatus.WR_FLUSH_ERR)]
        assert ep.state == EndpointState.ERROR


def test_faulty_transport_wraps_every_endpoint(backend, pair):
    server, client = pair
    faulty = FaultyTransport(client, Faults(seed=2))
    remote = server.allocate(4096)
    local = faulty.allocate(4096)
    ep = faulty.connect(server.peer_info())
    assert faulty.endpoints == [ep] and faulty.name == f"faulty-{client.name}"
    ep.tear_reads(TornReads(pieces=2))
    remote.view[:16] = b"x" * 16
    (c,) = ep.execute([WorkRequest(1, Opcode.READ, (local.sge(0, 16),), remote.remote(0), remote.rkey)], T)
    assert c.ok and bytes(local.view[:16]) == b"x" * 16
    ep.close()


@contextlib.contextmanager
def _held_reads(pair, seed: int, count: int, **delays: float):
    """`count` 8-byte READs through a faulty endpoint with these `delays` and a clock that stands still: yields
    (endpoint, clock) once the inner endpoint has finished them all, none released yet."""
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    clock = FakeClock()
    with client.connect(server.peer_info()) as raw:
        ep = Faults(seed=seed, clock=clock).wrap(raw)
        ep.delay_completions(**delays)
        ep.post([WorkRequest.read(i, local.sge(8 * i, 8), remote.remote(0), remote.rkey) for i in range(count)])
        deadline = time.monotonic() + 10
        while raw.outstanding and time.monotonic() < deadline:  # the inner endpoint finishes (tcp: in polls)
            assert ep.poll() == []  # the fake clock stands still, so nothing is released
            time.sleep(0.001)
        assert raw.outstanding == 0
        yield ep, clock


def test_a_delay_floor_holds_every_completion_back_at_least_that_long(pair):
    with _held_reads(pair, 3, 10, max_delay_s=0.3, min_delay_s=0.2) as (ep, clock):
        with pytest.raises(UsageError, match="min_delay_s"):
            ep.delay_completions(0.1, min_delay_s=0.2)
        clock.now += 0.199
        assert ep.poll() == []
        clock.now += 0.102
        assert sorted(c.wr_id for c in ep.poll()) == list(range(10))


def test_spaced_completions_arrive_one_by_one_however_late_the_caller_polls(pair):
    """A slow link of limited bandwidth: completions that the inner endpoint finished at once are released at
    least `spacing_s` apart, so a caller polling late still sees them arrive one at a time."""
    with _held_reads(pair, 5, 4, max_delay_s=0.01, min_delay_s=0.01, spacing_s=0.05) as (ep, clock):
        with pytest.raises(UsageError, match="spacing_s"):
            ep.delay_completions(0.1, spacing_s=-1)
        got = []
        for _ in range(4):
            clock.now += 0.05
            got.append([c.wr_id for c in ep.poll()])
        assert got == [[0], [1], [2], [3]]
