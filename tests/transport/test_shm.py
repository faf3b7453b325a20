"""shm-specific tests of the data path (the generic conformance suite in this folder also runs against "shm"):
byte-exact round trips, native atomics across processes, errors as completions, the local-only meaning of
register(), deregistration and its race, native plan batching. Lifecycle, GPU and model tests are in the
test_shm_*.py files next to this one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shm_harness import CTX, SHM, TIMEOUT, ours, transport_pair

from rdmapool.errors import UsageError
from rdmapool.transport import Access, EndpointState, MemoryKind, WcStatus, WorkRequest
from rdmapool.transport.shm import ShmTransport, naming


@pytest.fixture
def shm_pair() -> Iterator[tuple[ShmTransport, ShmTransport]]:
    yield from transport_pair()


# --- data path ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 7, 4096, 65537, 3 << 20])
def test_round_trip_byte_exact(shm_pair, size):
    srv, cli = shm_pair
    region = srv.allocate(size + 64)
    src = bytearray(os.urandom(size))
    dst = bytearray(size)
    ls, ld = cli.register(src), cli.register(dst)
    with cli.connect(srv.peer_info()) as ep:
        done = ep.execute([WorkRequest.write(1, ls.sge(), region.remote(13), region.rkey),
                           WorkRequest.read(2, ld.sge(), region.remote(13), region.rkey)], TIMEOUT)
        assert [c.status for c in done] == [WcStatus.SUCCESS] * 2
        assert [c.byte_len for c in done] == [size, size]
    assert dst == src
    assert bytes(region.view[13:13 + size]) == bytes(src)


def _rss_kib(addr: int) -> int:
    """Resident kB of this process's mapping that starts at `addr` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{addr:x}-"))
    return next(int(line.split()[1]) for line in lines[start + 1 :] if line.startswith("Rss:"))


def test_first_touch_of_a_large_mapping_populates_whole_chunks(shm_pair, monkeypatch):
    """A mapping too large for MAP_POPULATE gets each 2 MiB chunk's page tables filled by one populate record
    ahead of the first request that reaches it (write: MADV_POPULATE_WRITE; read-only mapping: _READ), not page by
    page inside the copy; bytes are unaffected, and a warm chunk is never populated again."""
    from rdmapool.transport.shm import endpoint as shm_endpoint
    from rdmapool.transport.shm import segment

    monkeypatch.setattr(segment, "POPULATE_MAX", 4 << 20)
    monkeypatch.setattr(shm_endpoint, "POPULATE_MAX", 4 << 20)
    srv, cli = shm_pair
    rw = srv.allocate(16 << 20)
    ro = srv.allocate(16 << 20, access=Access.LOCAL_WRITE | Access.REMOTE_READ)
    ro.view[(2 << 20) - 100 : (2 << 20) + 100] = os.urandom(200)
    src, dst = bytearray(os.urandom(4096)), bytearray(200)
    ls, ld = cli.register(src), cli.register(dst)
    populated = []
    run = shm_endpoint.native.run
    monkeypatch.setattr(shm_endpoint.native, "run", lambda recs, n, *a: populated.append(
        sum(1 for i in range(n) if shm_endpoint._REC.unpack_from(recs, i * 64)[0] == shm_endpoint._OP_POPULATE))
        or run(recs, n, *a))
    with cli.connect(srv.peer_info()) as ep:
        assert ep.execute([WorkRequest.write(1, ls.sge(), rw.remote(5 << 20), rw.rkey)], TIMEOUT)[0].ok
        rem = ep._remotes[rw.rkey]
        assert list(rem.cold) == [1, 1, 0] + [1] * 5
        assert _rss_kib(rem.seg.addr) >= 2048  # the whole chunk, not just the page written
        assert ep.execute([WorkRequest.read(2, ld.sge(), ro.remote((2 << 20) - 100), ro.rkey)], TIMEOUT)[0].ok
        assert list(ep._remotes[ro.rkey].cold[:3]) == [0, 0, 1]  # a request across a boundary: both chunks
        assert dst == ro.view[(2 << 20) - 100 : (2 << 20) + 100]
        assert ep.execute([WorkRequest.write(3, ls.sge(), rw.remote((5 << 20) + 8192), rw.rkey)], TIMEOUT)[0].ok
    assert populated == [1, 1, 0]  # one record per cold run of chunks; none for a warm one
    assert bytes(rw.view[5 << 20 : (5 << 20) + 4096]) == bytes(src) == bytes(rw.view[(5 << 20) + 8192 :][:4096])


def test_scatter_gather_lists(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4096)
    region.view[:300] = bytes(range(256)) + bytes(range(44))
    buf = bytearray(1000)
    lr = cli.register(buf)
    sgl = (lr.sge(0, 100), lr.sge(500, 50), lr.sge(900, 100))
    wr = WorkRequest(1, WorkRequest.read(0, sgl[0], 0, 0).opcode, sgl, region.remote(10), region.rkey)
    with cli.connect(srv.peer_info()) as ep:
        assert ep.execute([wr], TIMEOUT)[0].ok
    want = bytes(region.view[10:260])
    assert bytes(buf[0:100]) + bytes(buf[500:550]) + bytes(buf[900:1000]) == want


def test_batches_and_selective_signalling(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(1 << 16)
    region.view[:] = os.urandom(1 << 16)
    buf = bytearray(1 << 16)
    lr = cli.register(buf)
    n = 4096
    wrs = [WorkRequest.read(i, lr.sge(i * 16, 16), region.remote(i * 16), region.rkey, signaled=i % 64 == 63)
           for i in range(n)]
    with cli.connect(srv.peer_info()) as ep:
        done = ep.execute(wrs, TIMEOUT)
        assert [c.wr_id for c in done] == list(range(63, n, 64))
        assert ep.poll() == []
    assert bytes(buf) == bytes(region.view)


def test_atomics_semantics(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(64)
    out = bytearray(16)
    lr = cli.register(out)
    with cli.connect(srv.peer_info()) as ep:
        region.view[8:16] = (2**64 - 1).to_bytes(8, "little")
        done = ep.execute([WorkRequest.faa(1, lr.sge(0, 8), region.remote(8), region.rkey, 2)], TIMEOUT)
        assert done[0].ok and int.from_bytes(out[:8], "little") == 2**64 - 1
        assert int.from_bytes(region.view[8:16], "little") == 1  # wraps mod 2**64
        done = ep.execute([WorkRequest.cas(2, lr.sge(8, 8), region.remote(8), region.rkey, 5, 9),
                           WorkRequest.cas(3, lr.sge(0, 8), region.remote(8), region.rkey, 1, 9)], TIMEOUT)
        assert all(c.ok for c in done)
        assert int.from_bytes(out[8:], "little") == 1 and int.from_bytes(out[:8], "little") == 1
        assert int.from_bytes(region.view[8:16], "little") == 9


def _faa_worker(info, wire, n: int, conn) -> None:
    t = ShmTransport(cuda="off")
    out = bytearray(8)
    lr = t.register(out)
    addr, _length, rkey = wire
    ep = t.connect(info)
    ok = 0
    for _ in range(n // 100):
        done = ep.execute([WorkRequest.faa(0, lr.sge(), addr, rkey, 1, ) for _ in range(100)], TIMEOUT)
        ok += sum(c.ok for c in done)
    conn.send(ok)
    t.close()


def _cas_lock_worker(info, wire, n: int, conn) -> None:
    """Take a CAS spin lock at offset 0, then increment the (non-atomic) counter at offset 8 by READ+WRITE."""
    t = ShmTransport(cuda="off")
    buf = bytearray(16)
    lr = t.register(buf)
    base, _length, rkey = wire
    me = os.getpid()
    ep = t.connect(info)
    for _ in range(n):
        deadline = time.monotonic() + TIMEOUT
        while True:
            c = ep.execute([WorkRequest.cas(0, lr.sge(0, 8), base, rkey, 0, me)], TIMEOUT)[0]
            if not c.ok:
                conn.send(-1)
                return
            if int.from_bytes(buf[:8], "little") == 0:
                break
            if time.monotonic() > deadline:
                conn.send(-2)
                return
            os.sched_yield()
        ep.execute([WorkRequest.read(1, lr.sge(8, 8), base + 8, rkey)], TIMEOUT)
        buf[8:16] = (int.from_bytes(buf[8:16], "little") + 1).to_bytes(8, "little")
        ep.execute([WorkRequest.write(2, lr.sge(8, 8), base + 8, rkey),
                    WorkRequest.cas(3, lr.sge(0, 8), base, rkey, me, 0)], TIMEOUT)
    conn.send(n)
    t.close()


@pytest.mark.parametrize("worker", [_faa_worker, _cas_lock_worker])
def test_atomics_under_multiprocess_contention(worker):
    procs_n, n = 4, 20000 if worker is _faa_worker else 300
    with ShmTransport() as srv:
        region = srv.allocate(4096)
        info, wire = srv.peer_info(), region.descriptor.to_wire()
        pipes = [CTX.Pipe() for _ in range(procs_n)]
        procs = [CTX.Process(target=worker, args=(info, wire, n, child), daemon=True) for _p, child in pipes]
        try:
            for p in procs:
                p.start()
            results = []
            for parent, _child in pipes:
                assert parent.poll(60), "worker did not finish"
                results.append(parent.recv())
        finally:
            for p in procs:
                p.join(TIMEOUT)
                if p.is_alive():
                    p.kill()
                    p.join(TIMEOUT)
            for a, b in pipes:
                a.close()
                b.close()
        assert results == [n] * procs_n
        word = 0 if worker is _faa_worker else 8
        assert int.from_bytes(region.view[word:word + 8], "little") == procs_n * n
    assert ours() == []


# --- errors -------------------------------------------------------------------------------------------------
def test_bad_rkey_and_out_of_bounds_flush_and_keep_serving(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4096)
    buf = bytearray(64)
    lr = cli.register(buf)
    info = srv.peer_info()
    cases = [
        (WorkRequest.read(1, lr.sge(), region.remote(0), region.rkey ^ 0x7000), "names no registered region"),
        (WorkRequest.read(1, lr.sge(), region.remote(4096 - 63), region.rkey), "outside region"),
        (WorkRequest.read(1, lr.sge(), region.remote(0) - 8, region.rkey), "outside region"),
    ]
    for bad, why in cases:
        ep = cli.connect(info)
        ep.post([WorkRequest.read(0, lr.sge(), region.remote(0), region.rkey, signaled=False), bad,
                 WorkRequest.read(2, lr.sge(), region.remote(0), region.rkey, signaled=False)])
        done = ep.wait(2, TIMEOUT)
        assert [c.status for c in done] == [WcStatus.REM_ACCESS_ERR, WcStatus.WR_FLUSH_ERR]
        assert why in done[0].detail
        assert ep.state is EndpointState.ERROR
        ep.post([WorkRequest.read(3, lr.sge(), region.remote(0), region.rkey)])
        assert ep.wait(1, TIMEOUT)[0].status is WcStatus.WR_FLUSH_ERR
        ep.close()
    with cli.connect(info) as ep:  # the owner is unaffected
        assert ep.execute([WorkRequest.read(9, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok


def test_local_sge_outside_registration_is_loc_prot_err(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4096)
    lr = cli.register(bytearray(64))
    with cli.connect(srv.peer_info()) as ep:
        bad = WorkRequest.read(1, type(lr.sge())(lr.addr + 32, 64, lr.lkey), region.remote(0), region.rkey)
        assert ep.execute([bad], TIMEOUT)[0].status is WcStatus.LOC_PROT_ERR


def test_access_flags_are_enforced(shm_pair):
    srv, cli = shm_pair
    ro = srv.allocate(4096, access=Access.LOCAL_WRITE | Access.REMOTE_READ)
    lr = cli.register(bytearray(8))
    with cli.connect(srv.peer_info()) as ep:
        assert ep.execute([WorkRequest.read(1, lr.sge(), ro.remote(0), ro.rkey)], TIMEOUT)[0].ok
        c = ep.execute([WorkRequest.write(2, lr.sge(), ro.remote(0), ro.rkey)], TIMEOUT)[0]
        assert c.status is WcStatus.REM_ACCESS_ERR and "does not allow WRITE" in c.detail


def test_register_is_local_only(shm_pair):
    srv, cli = shm_pair
    private = srv.register(bytearray(4096))
    assert private.rkey & (1 << 31)
    lr = cli.register(bytearray(8))
    with cli.connect(srv.peer_info()) as ep:
        c = ep.execute([WorkRequest.read(1, lr.sge(), private.remote(0), private.rkey)], TIMEOUT)[0]
        assert c.status is WcStatus.REM_ACCESS_ERR and "local-only" in c.detail
    with pytest.raises(UsageError):
        cli.register(b"read-only bytes")  # LOCAL_WRITE needs a writable buffer
    assert cli.register(b"read-only bytes", access=Access.REMOTE_READ).length == 15
    with pytest.raises(UsageError):
        srv.allocate(4096, kind=MemoryKind.CUDA)


def test_register_pointer_host_memory(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(4096)
    region.view[:4] = b"ptr!"
    owner = bytearray(64)
    from rdmapool import _shmatomics

    addr, length = _shmatomics.address(owner)
    lr = cli.register_pointer(addr, length, MemoryKind.HOST, owner=owner)
    with cli.connect(srv.peer_info()) as ep:
        assert ep.execute([WorkRequest.read(1, lr.sge(0, 4), region.remote(0), region.rkey)], TIMEOUT)[0].ok
    assert owner[:4] == b"ptr!"
    cli.deregister(lr)


def test_deregistered_region_is_unreachable(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(8192)
    lr = cli.register(bytearray(64))
    name = naming.region_name(srv.base, region.rkey)
    with cli.connect(srv.peer_info()) as ep:
        assert ep.execute([WorkRequest.read(1, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok
        srv.deregister(region)  # the endpoint still has the region mapped: the valid word must stop it
        assert name not in os.listdir(SHM)
        c = ep.execute([WorkRequest.read(2, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0]
        assert c.status is WcStatus.REM_ACCESS_ERR
    again = srv.allocate(8192)  # reuses the slot under a new rkey: the old rkey stays dead
    assert again.rkey != region.rkey
    with cli.connect(srv.peer_info()) as ep:
        c = ep.execute([WorkRequest.read(3, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0]
        assert c.status is WcStatus.REM_ACCESS_ERR
    with pytest.raises(UsageError):
        srv.deregister(region)


def test_read_racing_deregistration_sees_old_bytes_or_error(shm_pair):
    srv, cli = shm_pair
    region = srv.allocate(1 << 20)
    region.view[:] = b"\x5a" * (1 << 20)
    buf, mine = bytearray(1 << 20), bytearray(8)
    lr, lm = cli.register(buf), cli.register(mine)
    info = srv.peer_info()
    racer, ep = cli.connect(info), cli.connect(info)
    statuses: list[WcStatus] = []
    torn: list[int] = []

    def reader() -> None:
        deadline = time.monotonic() + TIMEOUT
        while racer.state is EndpointState.READY and time.monotonic() < deadline:
            buf[:] = bytes(1 << 20)
            c = racer.execute([WorkRequest.read(0, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0]
            statuses.append(c.status)
            if c.ok and buf != b"\x5a" * (1 << 20):
                torn.append(len(statuses))

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.05)
    srv.deregister(region)
    after = ep.execute([WorkRequest.read(1, lm.sge(), region.remote(0), region.rkey)], TIMEOUT)[0]
    th.join(TIMEOUT)
    racer.close()
    ep.close()
    assert after.status is WcStatus.REM_ACCESS_ERR
    # Every read before the flip saw the region's bytes intact; the first after it failed, and nothing after.
    assert torn == []
    assert statuses[-1] is WcStatus.REM_ACCESS_ERR
    assert set(statuses[:-1]) == {WcStatus.SUCCESS}


def test_deregistering_a_local_region_waits_for_running_copies(shm_pair):
    """A local allocate()d region is unmapped on deregistration; a copy into it running on another thread
    must finish first (else the process would crash), and later requests get LOC_PROT_ERR."""
    srv, cli = shm_pair
    size = 16 << 20
    remote = srv.allocate(size)
    local = cli.allocate(size)
    ep = cli.connect(srv.peer_info())
    statuses: list[WcStatus] = []

    def reader() -> None:
        deadline = time.monotonic() + TIMEOUT
        while ep.state is EndpointState.READY and time.monotonic() < deadline:
            wrs = [WorkRequest.read(i, local.sge(), remote.remote(0), remote.rkey) for i in range(8)]
            statuses.extend(c.status for c in ep.execute(wrs, TIMEOUT))

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.05)
    seg = cli._owned[local.lkey][1]
    cli.deregister(local)
    assert seg.mm.closed  # really unmapped: without the wait this would crash the reader
    th.join(TIMEOUT)
    ep.close()
    assert not th.is_alive()
    assert WcStatus.SUCCESS in statuses and WcStatus.LOC_PROT_ERR in statuses
    with pytest.raises(ValueError):
        local.view[0]  # the region's view was released with it


# --- native batching (post_plan) -------------------------------------------------------------------------------
def test_post_plan_round_trip_and_signalling(shm_pair):
    from rdmapool.transport import Opcode, TransferPlan

    srv, cli = shm_pair
    region = srv.allocate(1 << 16)
    region.view[:] = os.urandom(1 << 16)
    buf = bytearray(1 << 16)
    lr = cli.register(buf)
    plan = TransferPlan.build([lr.sge(i * 256, 256) for i in range(256)],
                              [(region.remote(i * 256), region.rkey) for i in range(256)])
    with cli.connect(srv.peer_info()) as ep:
        pairs = [(i, 255 - i) for i in range(250)]
        assert ep.post_plan(plan, Opcode.READ, pairs, wr_id_base=1000, signal_every=64) == 4
        done = ep.wait(4, TIMEOUT)
        assert [c.wr_id for c in done] == [1063, 1127, 1191, 1249] and all(c.ok for c in done)
        for i in range(250):
            assert buf[i * 256:(i + 1) * 256] == region.view[(255 - i) * 256:(256 - i) * 256]
        buf[:] = bytes(1 << 16)
        assert ep.post_plan(plan, Opcode.WRITE, [(0, 3)]) == 1
        assert ep.wait(1, TIMEOUT)[0].ok and bytes(region.view[768:1024]) == bytes(256)
        with pytest.raises(UsageError):
            ep.post_plan(plan, Opcode.READ, [(0, 256)])
        assert ep.state is EndpointState.READY


def test_post_plan_errors_match_the_slow_path(shm_pair):
    from rdmapool.transport import Opcode, TransferPlan

    srv, cli = shm_pair
    keep, doomed = srv.allocate(4096), srv.allocate(4096)
    lr = cli.register(bytearray(8192))
    plan = TransferPlan.build([lr.sge(0, 4096), lr.sge(4096, 4096)],
                              [(keep.remote(0), keep.rkey), (doomed.remote(0), doomed.rkey),
                               (keep.remote(8), keep.rkey)])
    info = srv.peer_info()
    with cli.connect(info) as ep:  # out of bounds: 4096 bytes at offset 8
        ep.post_plan(plan, Opcode.READ, [(0, 0), (0, 2), (1, 0)], signal_every=8)
        done = ep.wait(2, TIMEOUT)
        assert [(c.wr_id, c.status) for c in done] == [(1, WcStatus.REM_ACCESS_ERR), (2, WcStatus.WR_FLUSH_ERR)]
        assert "outside region" in done[0].detail
    with cli.connect(info) as ep:  # deregistered after the plan was resolved
        ep.post_plan(plan, Opcode.WRITE, [(0, 1)])
        assert ep.wait(1, TIMEOUT)[0].ok
        srv.deregister(doomed)
        ep.post_plan(plan, Opcode.WRITE, [(0, 0), (1, 1)])
        done = ep.wait(2, TIMEOUT)
        assert [c.status for c in done] == [WcStatus.SUCCESS, WcStatus.REM_ACCESS_ERR]
        assert "deregistered" in done[1].detail


# --- fused digests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 16383, 16385, 3 << 20])
def test_digest_of_read_and_write_equals_hashing_the_local_bytes(shm_pair, size):
    import xxhash

    from rdmapool import _shmatomics
    from rdmapool.transport import Opcode

    if not _shmatomics.DIGEST:
        pytest.skip("this CPU has no AVX2: the shm mover does not digest (callers hash)")
    srv, cli = shm_pair
    region = srv.allocate(size + 200)
    src = bytearray(os.urandom(size + 16))
    dst = bytearray(size + 16)
    ls, ld = cli.register(src), cli.register(dst)
    with cli.connect(srv.peer_info()) as ep:
        assert ep.digests == {Opcode.READ, Opcode.WRITE}
        wsgl = (ls.sge(0, 8), ls.sge(8, size), ls.sge(8 + size, 8))
        write = WorkRequest(1, Opcode.WRITE, wsgl, region.remote(3), region.rkey, digest=1)
        read = WorkRequest(2, Opcode.READ, (ld.sge(0, 8), ld.sge(8, size)), region.remote(3), region.rkey, digest=1)
        plain = WorkRequest.read(3, ld.sge(), region.remote(3), region.rkey)
        w, r, p = ep.execute([write, read, plain], TIMEOUT)
        assert w.ok and r.ok and p.ok and p.digest is None
        want = xxhash.xxh3_128_digest(bytes(src[8 : 8 + size]))
        assert w.digest == want and r.digest == want
        # a payload changed between write and read: the read's digest is that of what landed, not the old one
        region.view[3 + 8 + size // 2] ^= 0xFF if size else 0
        (r2,) = ep.execute([read], TIMEOUT)
        assert r2.digest == xxhash.xxh3_128_digest(bytes(dst[8 : 8 + size]))
        assert (r2.digest == want) == (size == 0)
        with pytest.raises(UsageError):
            ep.post([WorkRequest(4, Opcode.READ, (ld.sge(0, 8),), region.remote(3), region.rkey, digest=1)])


def test_native_digest_matches_the_xxhash_package():
    import xxhash

    from rdmapool import _shmatomics

    if not _shmatomics.DIGEST:
        pytest.skip("this CPU has no AVX2: the shm mover does not digest (callers hash)")
    for n in (0, 1, 17, 240, 241, 16384, 1 << 20, 3 * (1 << 20) + 5):
        data = os.urandom(n)
        assert _shmatomics.digest(data) == xxhash.xxh3_128_digest(data)


def test_cuda_mode_defaults_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("RDMAPOOL_SHM_CUDA", "off")
    with ShmTransport() as t:
        assert t.cuda_mode == "off"
    with ShmTransport(cuda="auto") as t:  # an explicit option wins
        assert t.cuda_mode == "auto"
    monkeypatch.setenv("RDMAPOOL_SHM_CUDA", "sometimes")
    with pytest.raises(UsageError, match="RDMAPOOL_SHM_CUDA must be one of auto, off, require, got 'sometimes'"):
        ShmTransport()
    monkeypatch.delenv("RDMAPOOL_SHM_CUDA")
    with ShmTransport() as t:
        assert t.cuda_mode == "auto"
