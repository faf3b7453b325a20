"""The shm endpoint's Mover thread: large batches run asynchronously, in posting order with everything else,
errors flush what was queued behind them, and deregistration / close wait for queued copies."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import xxhash
from shm_harness import TIMEOUT, transport_pair

from rdmapool import _shmatomics
from rdmapool.transport import EndpointState, Opcode, WcStatus, WorkRequest
from rdmapool.transport.shm import ShmTransport
from rdmapool.transport.shm import endpoint as shm_endpoint

BIG = 8 << 20  # well above ASYNC_BYTES: runs on the Mover


@pytest.fixture
def shm_pair() -> Iterator[tuple[ShmTransport, ShmTransport]]:
    yield from transport_pair()


def test_large_batch_returns_before_it_completes_and_keeps_order(shm_pair):
    assert BIG >= 4 * shm_endpoint.ASYNC_BYTES
    srv, cli = shm_pair
    region = srv.allocate(4 * BIG)
    src = cli.allocate(4 * BIG)
    src.view[:] = os.urandom(BIG) * 4
    small = bytearray(b"after the big ones")
    ls = cli.register(small)
    with cli.connect(srv.peer_info()) as ep:
        big = [WorkRequest(i, Opcode.WRITE, (src.sge(i * BIG, BIG),), region.remote(i * BIG), region.rkey,
                           digest=0) for i in range(4)]
        ep.post(big)
        assert ep.outstanding == 4  # queued on the Mover, not complete yet (a copy of 32 MiB takes ms)
        # a small WRITE to the same place posted behind them lands after them (RC order), completes after them
        ep.post([WorkRequest.write(9, ls.sge(), region.remote(0), region.rkey)])
        done = ep.wait(5, TIMEOUT)
    assert [c.wr_id for c in done] == [0, 1, 2, 3, 9] and all(c.ok for c in done)
    assert done[0].digest == xxhash.xxh3_128_digest(bytes(src.view[:BIG])) or not _shmatomics.DIGEST
    assert bytes(region.view[: len(small)]) == bytes(small)
    assert bytes(region.view[len(small) : BIG]) == bytes(src.view[len(small) : BIG])
    assert bytes(region.view[3 * BIG : 4 * BIG]) == bytes(src.view[3 * BIG : 4 * BIG])


def test_failure_on_the_mover_flushes_everything_queued_behind_it(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4 * BIG)
    gone = srv.allocate(4096)
    src = cli.allocate(4 * BIG)
    buf = cli.register(bytearray(64))
    with cli.connect(srv.peer_info()) as ep:
        ep.execute([WorkRequest.read(0, buf.sge(), gone.remote(0), gone.rkey)], TIMEOUT)  # mapped: encodes fine
        ep.post([WorkRequest(i, Opcode.WRITE, (src.sge(i * BIG, BIG),), region.remote(i * BIG), region.rkey)
                 for i in range(4)])
        ep.post([WorkRequest.read(10, buf.sge(), gone.remote(0), gone.rkey)])  # queued behind the big WRITEs
        ep.post([WorkRequest.read(11, buf.sge(), region.remote(0), region.rkey)])
        srv.deregister(gone)  # while the WRITEs still move: the queued READ finds the region gone
        done = ep.wait(6, TIMEOUT)
        statuses = {c.wr_id: c.status for c in done}
        if statuses[10] is WcStatus.SUCCESS:
            pytest.skip("the Mover ran the READ before the deregistration (machine too fast for this test)")
        assert [statuses[i] for i in range(4)] == [WcStatus.SUCCESS] * 4
        assert statuses[10] is WcStatus.REM_ACCESS_ERR and statuses[11] is WcStatus.WR_FLUSH_ERR
        assert ep.state is EndpointState.ERROR
        ep.post([WorkRequest.read(12, buf.sge(), region.remote(0), region.rkey)])
        assert ep.wait(1, TIMEOUT)[0].status is WcStatus.WR_FLUSH_ERR


def test_deregistering_a_local_region_waits_for_queued_copies(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4 * BIG)
    src = cli.allocate(4 * BIG)
    src.view[:] = os.urandom(BIG) * 4
    with cli.connect(srv.peer_info()) as ep:
        ep.post([WorkRequest(i, Opcode.WRITE, (src.sge(i * BIG, BIG),), region.remote(i * BIG), region.rkey)
                 for i in range(4)])
        cli.deregister(src)  # quiesces the endpoint: returns only after the Mover finished with src
        assert ep.outstanding == 4  # the completions are still there to collect
        assert all(c.ok for c in ep.wait(4, TIMEOUT))
    assert bytes(region.view[BIG : 2 * BIG]) == bytes(region.view[:BIG])


def test_close_with_batches_queued_returns_and_releases_the_thread(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4 * BIG)
    src = cli.allocate(4 * BIG)
    for _ in range(3):
        ep = cli.connect(srv.peer_info())
        ep.post([WorkRequest(i, Opcode.WRITE, (src.sge(i * BIG, BIG),), region.remote(i * BIG), region.rkey)
                 for i in range(4)])
        t0 = time.monotonic()
        ep.close()
        assert time.monotonic() - t0 < TIMEOUT
        assert ep.state is EndpointState.CLOSED


def test_the_native_mover_rejects_misuse():
    import numpy as np

    state = np.ones(1, dtype=np.uint64)
    m = _shmatomics.Mover(state.ctypes.data, 1, -1)
    with pytest.raises(ValueError):
        m.submit(bytearray(32), 1)  # shorter than one record
    with pytest.raises(BufferError):
        m.submit(b"\0" * 64, 1)  # records must be writable (digests are written back)
    assert m.wait(0.01) is True and m.wait(0.01, True) is True and m.reap() == []  # nothing to wait for
    m.close()
    with pytest.raises(RuntimeError):
        m.submit(bytearray(64), 1)
