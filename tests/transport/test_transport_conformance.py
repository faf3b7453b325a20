"""The transport conformance suite: the RC semantics of rdmapool.transport.base, checked against every backend
listed in backends.py (a backend that does not import is skipped with the reason)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import xxhash
from transport_harness import PEER, ROOT, TIMEOUT_SCALE, digest, make, pattern, settle

from rdmapool.errors import UsageError
from rdmapool.transport import Access, EndpointState, Opcode, Sge, TransferPlan, WcStatus, WorkRequest
from rdmapool.transport.base import CompletionTimeout

T = 20.0 * TIMEOUT_SCALE  # generous completion timeout: CI machines are slow; a hang still fails


def ok(completions) -> None:
    bad = [c for c in completions if c.status != WcStatus.SUCCESS]
    assert not bad, bad


# -- data movement -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 7, 4096, 65536 + 3, 1 << 20, 64 << 20])
def test_read_write_roundtrip_byte_exact(pair, size):
    server, client = pair
    remote = server.allocate(size + 64)
    src, dst = client.allocate(size), client.allocate(size)
    data = pattern(size, size)
    src.view[:] = data
    with client.connect(server.peer_info()) as ep:
        ok(ep.execute([WorkRequest.write(1, src.sge(), remote.remote(13), remote.rkey)], T))
        assert bytes(remote.view[13:13 + size]) == data
        assert bytes(remote.view[:13]) == b"\0" * 13 and bytes(remote.view[13 + size:]) == b"\0" * (51)
        (c,) = ep.execute([WorkRequest.read(2, dst.sge(), remote.remote(13), remote.rkey)], T)
        ok([c])
        assert c.wr_id == 2 and c.opcode == Opcode.READ
        assert digest(dst.view) == digest(data)


def test_cross_process_roundtrip(backend, spawn_peer):
    size = 8 << 20
    peer = spawn_peer([size])
    (desc,) = peer.regions
    peer.call(cmd="fill", region=0, seed=5)
    client = make(backend)
    try:
        local = client.allocate(size)
        with client.connect(peer.peer_info) as ep:
            ok(ep.execute([WorkRequest.read(1, local.sge(), desc.addr, desc.rkey)], T))
            assert digest(local.view) == digest(pattern(size, 5))
            local.view[:] = pattern(size, 6)
            ok(ep.execute([WorkRequest.write(2, local.sge(1, 1 << 20), desc.addr + 7, desc.rkey)], T))
        assert peer.call(cmd="hash", region=0, offset=7, length=1 << 20)["hash"] == digest(local.view[1:(1 << 20) + 1])
    finally:
        client.close()


def test_batch_of_thousands_of_small_ops(pair):
    server, client = pair
    n, size = 4000, 64
    remote = server.allocate(n * size)
    src, dst = client.allocate(n * size), client.allocate(n * size)
    src.view[:] = pattern(n * size, 1)
    with client.connect(server.peer_info()) as ep:
        writes = [WorkRequest.write(i, src.sge(i * size, size), remote.remote(i * size), remote.rkey)
                  for i in range(n)]
        ok(ep.execute(writes, T))
        assert bytes(remote.view) == bytes(src.view)
        plan = TransferPlan.build([dst.sge(i * size, size) for i in range(n)],
                                  [(remote.remote(i * size), remote.rkey) for i in range(n)])
        pairs = [(i, n - 1 - i) for i in range(n)]  # reversed: local i <- remote n-1-i
        signalled = ep.post_plan(plan, Opcode.READ, pairs, wr_id_base=100_000, signal_every=32)
        assert signalled == len(range(31, n, 32)) + (0 if (n - 1) % 32 == 31 else 1)
        got = ep.wait(signalled, T)
        ok(got)
        assert [c.wr_id for c in got] == sorted(c.wr_id for c in got)
        assert got[-1].wr_id == 100_000 + n - 1
        a = np.frombuffer(dst.view, np.uint8).reshape(n, size)
        b = np.frombuffer(remote.view, np.uint8).reshape(n, size)
        assert (a == b[::-1]).all()


def test_scatter_gather(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    local.view[0:10] = b"A" * 10
    local.view[100:105] = b"B" * 5
    local.view[1000:1003] = b"C" * 3
    sgl = (local.sge(0, 10), local.sge(100, 5), local.sge(1000, 3))
    with client.connect(server.peer_info()) as ep:
        ok(ep.execute([WorkRequest(1, Opcode.WRITE, sgl, remote.remote(50), remote.rkey)], T))
        assert bytes(remote.view[50:68]) == b"A" * 10 + b"B" * 5 + b"C" * 3
        remote.view[200:218] = bytes(range(18))
        gather = (local.sge(2000, 4), local.sge(3000, 14))
        (c,) = ep.execute([WorkRequest(2, Opcode.READ, gather, remote.remote(200), remote.rkey)], T)
        ok([c])
        assert c.byte_len == 18
        assert bytes(local.view[2000:2004]) == bytes(range(4)) and bytes(local.view[3000:3014]) == bytes(range(4, 18))


# -- atomics -----------------------------------------------------------------------------------------------

def test_cas_and_faa_semantics(pair):
    server, client = pair
    remote = server.allocate(64)
    local = client.allocate(64)
    remote.view[8:16] = (2**64 - 2).to_bytes(8, "little")
    old = lambda: int.from_bytes(local.view[0:8], "little")  # noqa: E731
    cell = lambda: int.from_bytes(remote.view[8:16], "little")  # noqa: E731
    with client.connect(server.peer_info()) as ep:
        ok(ep.execute([WorkRequest.faa(1, local.sge(0, 8), remote.remote(8), remote.rkey, 5)], T))
        assert old() == 2**64 - 2 and cell() == 3  # wraps mod 2**64
        ok(ep.execute([WorkRequest.cas(2, local.sge(0, 8), remote.remote(8), remote.rkey, 4, 100)], T))
        assert old() == 3 and cell() == 3  # compare failed: unchanged, old value returned
        ok(ep.execute([WorkRequest.cas(3, local.sge(0, 8), remote.remote(8), remote.rkey, 3, 2**64 - 1)], T))
        assert old() == 3 and cell() == 2**64 - 1
        with pytest.raises(UsageError):
            ep.post([WorkRequest.faa(4, local.sge(0, 8), remote.remote(12), remote.rkey, 1)])  # misaligned
        with pytest.raises(UsageError):
            ep.post([WorkRequest.faa(5, local.sge(0, 4), remote.remote(8), remote.rkey, 1)])  # not 8 bytes
        assert ep.state == EndpointState.READY


def test_atomics_under_contention_from_processes(backend, spawn_peer):
    peer = spawn_peer([4096])
    (desc,) = peer.regions
    workers, count = 3, 150
    spec = json.dumps({"peer_info": peer.peer_info, "region": desc.to_wire(), "faa_offset": 0, "cas_offset": 64,
                       "count": count})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(PEER), "--backend", backend, "--client", spec],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(workers)]
    try:
        outs = [p.communicate(timeout=90 * TIMEOUT_SCALE)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    assert all(p.returncode == 0 for p in procs), outs
    assert peer.call(cmd="u64", region=0, offset=0)["value"] == workers * count
    assert peer.call(cmd="u64", region=0, offset=64)["value"] == workers * count


# -- errors ------------------------------------------------------------------------------------------------

def test_bad_rkey_and_out_of_bounds_then_server_keeps_serving(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    remote.view[0:4] = b"live"
    cases = [
        WorkRequest.read(1, local.sge(0, 16), remote.remote(0), remote.rkey ^ 0x5A5A5A5A),
        WorkRequest.read(1, local.sge(0, 16), remote.remote(4090), remote.rkey),  # runs past the end
        WorkRequest.write(1, local.sge(0, 16), remote.remote(0) + 2**40, remote.rkey),
        WorkRequest.faa(1, local.sge(0, 8), remote.remote(4096), remote.rkey, 1),
    ]
    for bad in cases:
        ep = client.connect(server.peer_info())
        tail = WorkRequest.read(2, local.sge(100, 4), remote.remote(0), remote.rkey)
        got = ep.execute([bad, tail], T)
        assert [c.status for c in got] == [WcStatus.REM_ACCESS_ERR, WcStatus.WR_FLUSH_ERR], (bad, got)
        assert ep.state == EndpointState.ERROR
        ep.post([tail])  # posted after the error: flushed
        assert [c.status for c in ep.wait(1, T)] == [WcStatus.WR_FLUSH_ERR]
        ep.close()
        with client.connect(server.peer_info()) as fresh:  # the serving side still serves
            ok(fresh.execute([WorkRequest.read(3, local.sge(200, 4), remote.remote(0), remote.rkey)], T))
            assert bytes(local.view[200:204]) == b"live"


def test_access_flags_enforced(pair):
    server, client = pair
    ro = server.allocate(4096, access=Access.LOCAL_WRITE | Access.REMOTE_READ)
    local = client.allocate(4096)
    with client.connect(server.peer_info()) as ep:
        ok(ep.execute([WorkRequest.read(1, local.sge(0, 8), ro.remote(0), ro.rkey)], T))
    with client.connect(server.peer_info()) as ep:
        (c,) = ep.execute([WorkRequest.write(2, local.sge(0, 8), ro.remote(0), ro.rkey)], T)
        assert c.status == WcStatus.REM_ACCESS_ERR
    with client.connect(server.peer_info()) as ep:
        (c,) = ep.execute([WorkRequest.faa(3, local.sge(0, 8), ro.remote(0), ro.rkey, 1)], T)
        assert c.status == WcStatus.REM_ACCESS_ERR


def test_bad_local_key_is_a_local_protection_error(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    with client.connect(server.peer_info()) as ep:
        bogus = Sge(local.addr, 16, local.lkey ^ 0x1234567)
        (c,) = ep.execute([WorkRequest.read(1, bogus, remote.remote(0), remote.rkey)], T)
        assert c.status == WcStatus.LOC_PROT_ERR and ep.state == EndpointState.ERROR


def test_serving_peer_killed_mid_batch_gives_errors_not_a_hang(backend, spawn_peer):
    size = 32 << 20
    peer = spawn_peer([size])
    (desc,) = peer.regions
    client = make(backend)
    try:
        local = client.allocate(size)
        ep = client.connect(peer.peer_info)
        chunk = 256 << 10
        wrs = [WorkRequest.read(i, local.sge((i * chunk) % size, chunk), desc.addr + (i * chunk) % size, desc.rkey)
               for i in range(2000)]
        ep.post(wrs)
        os.kill(peer.pid, signal.SIGKILL)
        peer.proc.wait(10)
        got = ep.wait(len(wrs), T)  # every request completes, with success or an error: no hang
        statuses = [c.status for c in got]
        allowed = {WcStatus.SUCCESS, WcStatus.RETRY_EXC_ERR, WcStatus.WR_FLUSH_ERR}
        assert set(statuses) <= allowed, set(statuses)
        first_err = next((i for i, s in enumerate(statuses) if s != WcStatus.SUCCESS), len(statuses))
        assert all(s != WcStatus.SUCCESS for s in statuses[first_err:]), "success after an error"
        # whatever was in flight, a request posted after the death must fail, within the timeout
        ep.post([WorkRequest.read(99_999, local.sge(0, 8), desc.addr, desc.rkey)])
        (late,) = ep.wait(1, T)
        assert late.status in (WcStatus.RETRY_EXC_ERR, WcStatus.WR_FLUSH_ERR)
        assert ep.state == EndpointState.ERROR
        ep.close()
    finally:
        client.close()


# -- deregistration ----------------------------------------------------------------------------------------

def test_deregistered_memory_is_unreachable(pair):
    server, client = pair
    remote = server.allocate(4096)
    keep = server.allocate(4096)
    local = client.allocate(4096)
    with client.connect(server.peer_info()) as ep:
        ok(ep.execute([WorkRequest.read(1, local.sge(0, 8), remote.remote(0), remote.rkey)], T))
    desc = remote.descriptor
    server.deregister(remote)
    for wr in (WorkRequest.read(2, local.sge(0, 8), desc.addr, desc.rkey),
               WorkRequest.write(3, local.sge(0, 8), desc.addr, desc.rkey),
               WorkRequest.faa(4, local.sge(0, 8), desc.addr, desc.rkey, 1)):
        with client.connect(server.peer_info()) as ep:
            (c,) = ep.execute([wr], T)
            assert c.status == WcStatus.REM_ACCESS_ERR, wr
    with client.connect(server.peer_info()) as ep:  # other regions unaffected
        ok(ep.execute([WorkRequest.read(5, local.sge(0, 8), keep.remote(0), keep.rkey)], T))
    with pytest.raises(UsageError):
        server.deregister(remote)


def test_deregister_in_a_peer_process(backend, spawn_peer):
    peer = spawn_peer([4096, 4096])
    a, b = peer.regions
    client = make(backend)
    try:
        local = client.allocate(64)
        peer.call(cmd="dereg", region=0)
        with client.connect(peer.peer_info) as ep:
            (c,) = ep.execute([WorkRequest.read(1, local.sge(0, 8), a.addr, a.rkey)], T)
            assert c.status == WcStatus.REM_ACCESS_ERR
        with client.connect(peer.peer_info) as ep:
            ok(ep.execute([WorkRequest.read(2, local.sge(0, 8), b.addr, b.rkey)], T))
    finally:
        client.close()


def test_deregister_during_concurrent_traffic(pair):
    """Deregistering under load: every request either succeeds (ordered before) or fails with
    REM_ACCESS_ERR (after); nothing crashes or hangs."""
    server, client = pair
    remote = server.allocate(1 << 20)
    local = client.allocate(1 << 20)
    stop = threading.Event()
    statuses: list[WcStatus] = []

    def traffic() -> None:
        while not stop.is_set():
            with client.connect(server.peer_info()) as ep:
                wrs = [WorkRequest.write(i, local.sge(0, 64 << 10), remote.remote((i % 16) * (64 << 10)), remote.rkey)
                       for i in range(32)]
                got = ep.execute(wrs, T)
                statuses.extend(c.status for c in got)
                if got[-1].status != WcStatus.SUCCESS:
                    return

    t = threading.Thread(target=traffic)
    t.start()
    settle(lambda: len(statuses) > 64, 5)
    server.deregister(remote)
    t.join(T)
    stop.set()
    assert not t.is_alive()
    assert WcStatus.REM_ACCESS_ERR in statuses
    assert set(statuses) <= {WcStatus.SUCCESS, WcStatus.REM_ACCESS_ERR, WcStatus.WR_FLUSH_ERR}


# -- lifecycle ---------------------------------------------------------------------------------------------

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_no_fd_or_thread_leak_across_connect_close_cycles(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    for _ in range(3):  # warm up lazily created resources
        with client.connect(server.peer_info()) as ep:
            ok(ep.execute([WorkRequest.read(0, local.sge(0, 8), remote.remote(0), remote.rkey)], T))
    settle(lambda: False, 0.2)
    fds, threads = _fds(), _threads()
    for i in range(40):
        ep = client.connect(server.peer_info())
        ok(ep.execute([WorkRequest.read(i, local.sge(0, 8), remote.remote(0), remote.rkey)], T))
        if i % 4 == 0:  # some end in error, some with requests still outstanding
            ep.execute([WorkRequest.read(i, local.sge(0, 8), remote.remote(0), remote.rkey + 1)], T)
        elif i % 4 == 1:
            ep.post([WorkRequest.read(i, local.sge(0, 4096), remote.remote(0), remote.rkey)])
        ep.close()
    assert settle(lambda: _fds() <= fds and _threads() <= threads), (fds, _fds(), threads, _threads())


def test_closed_endpoint_and_transport_refuse_work(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    ep = client.connect(server.peer_info())
    ep.close()
    assert ep.state == EndpointState.CLOSED
    with pytest.raises(UsageError):
        ep.post([WorkRequest.read(1, local.sge(0, 8), remote.remote(0), remote.rkey)])
    client.close()
    client.close()  # idempotent
    with pytest.raises(UsageError):
        client.connect(server.peer_info())


# -- signalling and ordering -------------------------------------------------------------------------------

def test_selective_signalling(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    with client.connect(server.peer_info()) as ep:
        wrs = [WorkRequest.write(i, local.sge(i * 8, 8), remote.remote(i * 8), remote.rkey, signaled=(i == 9))
               for i in range(10)]
        local.view[:80] = bytes(range(80))
        ep.post(wrs)
        assert ep.outstanding == 1
        got = ep.wait(1, T)
        assert [c.wr_id for c in got] == [9]
        assert bytes(remote.view[:80]) == bytes(range(80))  # the signalled one implies all before it
        assert ep.poll() == [] and ep.outstanding == 0
        with pytest.raises(CompletionTimeout):
            ep.wait(1, 0.05)


def test_posted_requests_progress_without_polling(pair):
    """As on hardware, posted requests execute while the caller does something else (here: sleeps)."""
    server, client = pair
    size = 32 << 20
    remote = server.allocate(size)
    src, dst = client.allocate(size), client.allocate(size)
    src.view[:] = pattern(size, 9)
    remote.view[size - 8:] = b"\xff" * 8
    with client.connect(server.peer_info()) as ep:
        chunk = 1 << 20
        ep.post([WorkRequest.write(i, src.sge(i * chunk, chunk), remote.remote(i * chunk), remote.rkey, signaled=False)
                 for i in range(size // chunk)] +
                [WorkRequest.read(999, dst.sge(0, 8), remote.remote(size - 8), remote.rkey)])
        assert settle(lambda: bytes(remote.view[size - 8:]) == bytes(src.view[size - 8:]), 10)
        assert digest(remote.view) == digest(src.view)
        (c,) = ep.wait(1, T)
        assert c.ok and c.wr_id == 999 and bytes(dst.view[:8]) == bytes(src.view[size - 8:])


def test_ordering_within_an_endpoint(pair):
    server, client = pair
    remote = server.allocate(4096)
    local = client.allocate(4096)
    local.view[0:8] = b"AAAAAAAA"
    local.view[8:16] = b"BBBBBBBB"
    x = remote.remote(512)
    with client.connect(server.peer_info()) as ep:
        wrs = [
            WorkRequest.write(1, local.sge(0, 8), x, remote.rkey, signaled=False),
            WorkRequest.read(2, local.sge(100, 8), x, remote.rkey),
            WorkRequest.write(3, local.sge(8, 8), x, remote.rkey),
            WorkRequest.read(4, local.sge(200, 8), x, remote.rkey),
            WorkRequest.faa(5, local.sge(304, 8), remote.remote(1024), remote.rkey, 7),
            WorkRequest.read(6, local.sge(400, 8), remote.remote(1024), remote.rkey),
        ]
        got = ep.execute(wrs, T)
        ok(got)
        assert [c.wr_id for c in got] == [2, 3, 4, 5, 6]
        assert bytes(local.view[100:108]) == b"A" * 8
        assert bytes(local.view[200:208]) == b"B" * 8
        assert int.from_bytes(local.view[400:408], "little") == 7
        # a long alternating stream keeps its order too
        wrs = []
        for i in range(300):
            local.view[1024 + i * 8:1032 + i * 8] = i.to_bytes(8, "little")
            wrs.append(WorkRequest.write(2 * i, local.sge(1024 + i * 8, 8), x, remote.rkey))
            wrs.append(WorkRequest.read(2 * i + 1, local.sge(3072, 8), x, remote.rkey))
        got = ep.execute(wrs, T)
        ok(got)
        assert [c.wr_id for c in got] == list(range(600))
        assert int.from_bytes(local.view[3072:3080], "little") == 299


def test_wait_is_bounded(pair):
    _, client = pair
    server = pair[0]
    remote = server.allocate(64)
    with client.connect(server.peer_info()) as ep:
        with pytest.raises(UsageError):
            ep.wait(1, 0)
        with pytest.raises(CompletionTimeout):
            ep.wait(1, 0.05)
        assert remote.length == 64


def test_result_tuples_say_what_completions_say(pair):
    """`poll_results` / `wait_results` (the pool's hot path) report the same wr_id, status, opcode and length as
    `Completion`s, a failure included, and the digest where the backend computed one."""
    server, client = pair
    remote = server.allocate(8192)
    local = client.allocate(8192)
    local.view[:] = pattern(8192, 3)
    with client.connect(server.peer_info()) as ep:
        ep.post([WorkRequest.write(1, local.sge(0, 4096), remote.remote(0), remote.rkey),
                 WorkRequest(2, Opcode.READ, (local.sge(4096, 4096),), remote.remote(0), remote.rkey, digest=0)])
        got = ep.wait_results(2, T)
        assert [(c[0], c[1], c[2], c[3]) for c in got] == [
            (1, int(WcStatus.SUCCESS), int(Opcode.WRITE), 4096), (2, int(WcStatus.SUCCESS), int(Opcode.READ), 4096)]
        if len(got[1]) == 5 and got[1][4] is not None:  # a backend that digests READs: the bytes that landed
            assert got[1][4] == xxhash.xxh3_128_digest(pattern(8192, 3)[:4096])
        with pytest.raises(CompletionTimeout):
            ep.wait_results(1, 0.05)
        ep.post([WorkRequest.read(3, local.sge(0, 64), remote.remote(0), remote.rkey ^ 0x5A5A)])
        (bad,) = ep.wait_results(1, T)
        assert bad[0] == 3 and bad[1] != int(WcStatus.SUCCESS)


def test_initiator_killed_mid_run_leaves_the_server_serving(backend, spawn_peer):
    peer = spawn_peer([4096])
    (desc,) = peer.regions
    spec = json.dumps({"peer_info": peer.peer_info, "region": desc.to_wire(), "faa_offset": 0, "cas_offset": 64,
                       "count": 1_000_000})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hammer = subprocess.Popen([sys.executable, str(PEER), "--backend", backend, "--client", spec],
                              stdout=subprocess.DEVNULL, env=env)
    try:
        assert settle(lambda: peer.call(cmd="u64", region=0, offset=0)["value"] > 100, 20)
    finally:
        hammer.kill()
        hammer.wait(10)
    client = make(backend)
    try:
        local = client.allocate(64)
        with client.connect(peer.peer_info) as ep:
            ok(ep.execute([WorkRequest.faa(1, local.sge(0, 8), desc.addr, desc.rkey, 1)], T))
    finally:
        client.close()


# -- optional digests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [5, 16385, 3 << 20])
def test_digest_is_the_hash_of_the_local_sge_or_none(pair, size):
    """A backend lists the opcodes it digests; their completions carry xxh3-128 of the named local SGE (what
    landed / what was sent), every other completion carries None. A digest never stands for stale bytes."""
    import xxhash

    server, client = pair
    remote = server.allocate(size + 64)
    buf = client.allocate(size + 16)
    buf.view[:] = pattern(size + 16, 3)
    with client.connect(server.peer_info()) as ep:
        offered = ep.digests
        assert offered <= {Opcode.READ, Opcode.WRITE}
        sgl = (buf.sge(0, 8), buf.sge(8, size), buf.sge(8 + size, 8))
        want = xxhash.xxh3_128_digest(bytes(buf.view[8 : 8 + size]))
        (w,) = ep.execute([WorkRequest(1, Opcode.WRITE, sgl, remote.remote(0), remote.rkey, digest=1)], T)
        ok([w])
        assert w.digest == (want if Opcode.WRITE in offered else None)
        remote.view[9] ^= 0x5A  # the payload changes remotely: a READ's digest is that of the new bytes
        buf.view[:] = bytes(size + 16)
        (r,) = ep.execute([WorkRequest(2, Opcode.READ, sgl, remote.remote(0), remote.rkey, digest=1)], T)
        ok([r])
        landed = xxhash.xxh3_128_digest(bytes(buf.view[8 : 8 + size]))
        assert landed != want
        assert r.digest == (landed if Opcode.READ in offered else None)
        (plain,) = ep.execute([WorkRequest.read(3, buf.sge(), remote.remote(0), remote.rkey)], T)
        assert plain.digest is None
        with pytest.raises(UsageError):
            ep.post([WorkRequest(4, Opcode.READ, (buf.sge(0, 8),), remote.remote(0), remote.rkey, digest=1)])


def test_digests_of_a_batch_of_reads_of_mixed_sizes(pair):
    """One post of many READs (small ones share a receive on tcp, large ones span many): each lands byte-exact,
    and where the backend digests READs each completion's digest is that of its own landed payload SGE."""
    import xxhash

    server, client = pair
    sizes = [1, 63, 4096, 70000, 1 << 20, 9, 300000, 2 << 20] * 4
    remote = server.allocate(sum(sizes) + 64 * len(sizes))
    remote.view[:] = pattern(remote.length, 11)
    buf = client.allocate(sum(sizes) + 64 * len(sizes))
    with client.connect(server.peer_info()) as ep:
        offered = Opcode.READ in ep.digests
        wrs, off = [], 0
        for i, n in enumerate(sizes):
            sgl = (buf.sge(off, 16), buf.sge(off + 16, n), buf.sge(off + 16 + n, 16))
            wrs.append(WorkRequest(i, Opcode.READ, sgl, remote.remote(off), remote.rkey, digest=1))
            off += n + 32
        done = ep.execute(wrs, T)
        ok(done)
        off = 0
        by_id = {c.wr_id: c for c in done}
        for i, n in enumerate(sizes):
            landed = bytes(buf.view[off + 16 : off + 16 + n])
            assert landed == bytes(remote.view[off + 16 : off + 16 + n]), (i, n)
            assert by_id[i].digest == (xxhash.xxh3_128_digest(landed) if offered else None), (i, n)
            off += n + 32
