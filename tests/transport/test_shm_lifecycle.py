"""shm lifecycle: owner death detected through the pidfd, clean close, the stale sweep (dead, unreaped and
foreign-namespace owners), fd/thread/segment leaks across cycles, peer info checks and file modes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from shm_harness import CTX, SHM, TIMEOUT, open_fds, ours, owner_process

from rdmapool.errors import ServerUnavailable, UsageError
from rdmapool.transport import WcStatus, WorkRequest
from rdmapool.transport.shm import ShmTransport, naming, sweep_stale


# --- owner lifecycle ----------------------------------------------------------------------------------------
def test_owner_killed_gives_retry_exceeded_and_segments_are_swept():
    with ShmTransport() as cli, owner_process() as (proc, info, wire):
        addr, _length, rkey = wire
        buf = bytearray(64)
        lr = cli.register(buf)
        ep = cli.connect(info)
        assert ep.execute([WorkRequest.read(1, lr.sge(), addr, rkey)], TIMEOUT)[0].ok
        assert buf == b"\x07" * 64
        assert ours(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(TIMEOUT)
        ep.post([WorkRequest.read(2, lr.sge(), addr, rkey, signaled=False), WorkRequest.read(3, lr.sge(), addr, rkey)])
        done = ep.wait(2, TIMEOUT)
        assert [c.status for c in done] == [WcStatus.RETRY_EXC_ERR, WcStatus.WR_FLUSH_ERR]
        assert "died" in done[0].detail
        assert ours(proc.pid) == []  # the client that noticed removed the orphans
        ep.close()
        with pytest.raises(ServerUnavailable):
            cli.connect(info)


def test_owner_killed_mid_batch_fails_the_whole_batch():
    size = 16 << 20
    with ShmTransport() as cli, owner_process(size) as (proc, info, wire):
        addr, _length, rkey = wire
        lr = cli.register(bytearray(size))
        ep = cli.connect(info)
        batch = [WorkRequest.read(i, lr.sge(), addr, rkey) for i in range(200)]  # 3.2 GB: far longer than 20 ms
        killer = threading.Timer(0.02, os.kill, (proc.pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        ep.post(batch)  # a large batch runs on the endpoint's mover thread: wait for its completions
        done = ep.wait(200, TIMEOUT)
        took = time.monotonic() - t0
        killer.join()
        proc.join(TIMEOUT)
        assert took > 0.05, "batch finished before the kill: test is not testing anything"
        assert done[0].status is WcStatus.RETRY_EXC_ERR
        assert all(c.status is WcStatus.WR_FLUSH_ERR for c in done[1:]) and len(done) == 200
        ep.close()


def test_owner_close_gives_retry_exceeded():
    with ShmTransport() as cli:
        srv = ShmTransport()
        region = srv.allocate(4096)
        lr = cli.register(bytearray(8))
        ep = cli.connect(srv.peer_info())
        srv.close()
        c = ep.execute([WorkRequest.read(1, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0]
        assert c.status is WcStatus.RETRY_EXC_ERR and "closed" in c.detail
        ep.close()


def test_stale_segments_of_a_dead_owner_are_swept_at_next_start():
    with owner_process() as (proc, _info, _wire):
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(TIMEOUT)
        left = ours(proc.pid)
        assert len(left) == 2  # control + region segment, orphaned
        with ShmTransport() as t:
            t.allocate(4096)  # starting to serve sweeps
            assert ours(proc.pid) == []


def test_an_unreaped_owner_counts_as_dead():
    with owner_process() as (proc, info, wire), ShmTransport() as cli:
        lr = cli.register(bytearray(8))
        ep = cli.connect(info)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT  # wait for the zombie, without reaping it
        while naming.process_start(proc.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert naming.process_start(proc.pid) is None
        c = ep.execute([WorkRequest.read(1, lr.sge(), wire[0], wire[2])], TIMEOUT)[0]
        assert c.status is WcStatus.RETRY_EXC_ERR
        assert ours(proc.pid) == []
        ep.close()


def test_sweep_leaves_live_owners_and_foreign_files_alone(tmp_path):
    live = naming.base_name(naming.Owner.current(), "abcd")
    dead = naming.base_name(naming.Owner(os.getpid(), 1), "abcd")  # our pid, another start time: dead
    foreign = naming.base_name(naming.Owner(os.getpid(), 1), "abcd", ns=naming.pid_namespace() + 1)
    kept = [naming.ctl_name(live), naming.ctl_name(foreign), "other.file", "rdmapool.1.2.ctl"]
    for name in [*kept, naming.ctl_name(dead), naming.region_name(dead, 0x1001)]:
        (tmp_path / name).write_bytes(b"x")
    removed = sweep_stale(str(tmp_path))
    assert sorted(removed) == sorted([naming.ctl_name(dead), naming.region_name(dead, 0x1001)])
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_no_fd_thread_or_segment_leaks_across_cycles():
    def cycle() -> None:
        with ShmTransport() as srv, ShmTransport() as cli:
            region = srv.allocate(1 << 16)
            lr = cli.register(bytearray(4096))
            for _ in range(3):
                with cli.connect(srv.peer_info()) as ep:
                    assert ep.execute([WorkRequest.read(1, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok
            srv.deregister(region)

    cycle()
    fds, threads = open_fds(), threading.active_count()
    for _ in range(20):
        cycle()
    assert open_fds() == fds
    assert threading.active_count() == threads
    assert ours() == []


def test_forgotten_transport_is_unlinked_when_collected():
    t = ShmTransport(cuda="off")
    t.allocate(4096)
    assert ours()
    del t
    import gc

    gc.collect()
    assert ours() == []


def test_bad_peer_info_and_file_modes():
    with ShmTransport() as cli:
        with pytest.raises(UsageError):
            cli.connect({"transport": "tcp"})
        with pytest.raises(UsageError):
            cli.connect({"transport": "shm", "base": "x", "dir": SHM, "pid": 1, "start": 1})
        gone = {"transport": "shm", "base": naming.base_name(naming.Owner(2**22 + 7, 5), "00"), "dir": SHM,
                "pid": 2**22 + 7, "start": 5}
        with pytest.raises(ServerUnavailable):
            cli.connect(gone)
        with ShmTransport() as srv:
            info = srv.peer_info()
            elsewhere = dict(info, base=naming.base_name(naming.Owner(info["pid"], info["start"]), "00",
                                                         ns=naming.pid_namespace() + 1))
            with pytest.raises(ServerUnavailable, match="pid namespace"):
                cli.connect(elsewhere)
    with ShmTransport(mode=0o640) as srv:
        region = srv.allocate(4096)
        st = os.stat(os.path.join(SHM, naming.region_name(srv.base, region.rkey)))
        assert st.st_mode & 0o777 == 0o640
    with pytest.raises(UsageError):
        ShmTransport(mode=0o1777)
    with pytest.raises(UsageError):
        ShmTransport(cuda="sometimes")


def _other_user_worker(info, wire, conn) -> None:
    """As user nobody: try to connect, READ and WRITE; report what happened."""
    os.setgid(65534)
    os.setuid(65534)
    addr, _length, rkey = wire
    with ShmTransport(cuda="off") as t:
        lr = t.register(bytearray(8))
        try:
            ep = t.connect(info)
        except Exception as exc:
            conn.send((type(exc).__name__,))
            return
        with ep:
            r = ep.execute([WorkRequest.read(1, lr.sge(), addr, rkey)], TIMEOUT)[0].status
        with t.connect(info) as ep:
            w = ep.execute([WorkRequest.write(2, lr.sge(), addr, rkey)], TIMEOUT)[0].status
        conn.send(("connected", int(r), int(w)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user (file modes)")
@pytest.mark.parametrize(("mode", "want"), [
    (0o600, ("AuthError",)),
    (0o644, ("connected", int(WcStatus.SUCCESS), int(WcStatus.REM_ACCESS_ERR))),
])
def test_file_mode_is_the_isolation_boundary(mode, want):
    with ShmTransport(mode=mode) as srv:
        region = srv.allocate(4096)
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=_other_user_worker, args=(srv.peer_info(), region.descriptor.to_wire(), child))
        proc.start()
        try:
            assert parent.poll(TIMEOUT * 2), "client process did not report"
            assert parent.recv() == want
        finally:
            proc.join(TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join(TIMEOUT)
            parent.close()
            child.close()
