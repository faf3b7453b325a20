"""Real server processes on loopback, both transports: round trips, racing writers, killed clients, restarts,
a put flood, and the metrics/health endpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rdmapool.client import PoolClient, PutStatus
from rdmapool.commands.stats import fetch
from rdmapool.config import ClientConfig, ServerAddress
from rdmapool.server.slots import stride_for
from tests.support import procs

TRANSPORTS = ["tcp", "shm"]
FAST = ("--lease-s", "1", "--grace-s", "0.2", "--reservation-s", "1")


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def client(server: procs.ServerProc, transport: str, tenant: str = "a", **options) -> PoolClient:
    cfg = ClientConfig(token=procs.TOKENS[tenant], staging_bytes=4 << 20, **options)
    return PoolClient([server.address], cfg, transport_name=transport)


def child(server: procs.ServerProc, transport: str, mode: str, k: bytes, *args: str, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.support.client_child", server.address, transport, procs.TOKENS["a"], mode,
           k.hex(), *args]
    return subprocess.Popen(cmd, cwd=procs.ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(procs.ROOT), **(env or {})})


def classes(server: procs.ServerProc, tenant: str = "a") -> list[dict]:
    return fetch(ServerAddress.parse(server.address), procs.TOKENS[tenant])["tenants"][tenant]["classes"]


def wait_for(predicate, timeout: float = 10.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of the process is in the stopped state (T) by now."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    return bool(states) and all(state == "T" for state in states)


@contextlib.contextmanager
def frozen(server: procs.ServerProc, thaw_after: float = 10.0) -> Iterator[None]:
    """The server stopped (SIGSTOP: alive, its sockets still accept, nothing answers), then continued, also
    when the test fails; a call that hangs despite its timeouts ends (failing its time check) after
    `thaw_after`."""
    os.kill(server.pid, signal.SIGSTOP)
    thaw = threading.Timer(thaw_after, os.kill, (server.pid, signal.SIGCONT))
    thaw.start()
    try:
        # the signal is delivered asynchronously: a request sent right after kill() may still be served
        assert wait_for(lambda: all_threads_stopped(server.pid), 5.0, 0.001), "SIGSTOP did not take"
        yield
    finally:
        thaw.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_round_trip_tenants_and_endpoints(transport: str) -> None:
    with procs.running(transport, "16MiB", "--metrics", "127.0.0.1:0") as srv, \
            client(srv, transport, "a") as a, client(srv, transport, "b") as b:
        payloads = [os.urandom(n) for n in (100, 64 << 10, 1 << 20, 3 << 20)]
        keys = [key(i) for i in range(4)]
        assert a.put(keys, payloads) == [PutStatus.STORED] * 4
        bufs = [bytearray(4 << 20) for _ in keys]
        assert a.get(keys, bufs) == [len(p) for p in payloads]
        assert all(bytes(buf[: len(p)]) == p for buf, p in zip(bufs, payloads, strict=True))
        assert len(a.lookup_prefix(keys)) == 4 and len(b.lookup_prefix(keys)) == 0  # pairwise isolation
        metrics_port = srv.info["metrics_port"]
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5))
        assert health["status"] == "ok" and health["server_id"] == srv.info["server_id"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'rdmapool_events_total{event="commits"} 4.0' in text
        assert 'rdmapool_slots{size_class="1048576",state="resident",tenant="a"}' in text
        table = subprocess.run([sys.executable, "-m", "rdmapool", "stats", srv.address, "--once"], cwd=procs.ROOT,
                               env={**os.environ, "RDMAPOOL_TOKEN": procs.TOKENS["b"]}, capture_output=True,
                               text=True, timeout=30)
        assert table.returncode == 0, table.stderr
        assert srv.info["server_id"] in table.stdout and "commits" in table.stdout
        registry = CollectorRegistry()
        a.counters.register(registry)
        assert registry.get_sample_value("rdmapool_client_events_total", {"event": "put_stored"}) == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_writers_of_one_key(transport: str) -> None:
    with procs.running(transport, "16MiB") as srv:
        start_at = str(time.time() + 1.5)
        kids = [child(srv, transport, "put", key(7), str(v), env={"START_AT": start_at}) for v in range(1, 5)]
        statuses = [json.loads(k.communicate(timeout=30)[0])["status"] for k in kids]
        assert sorted(statuses) == ["exists"] * 3 + ["stored"]
        winner = statuses.index("stored") + 1
        with client(srv, transport) as c:
            buf = bytearray(50_000)
            assert c.get([key(7)], [buf]) == [50_000]
            assert bytes(buf) == bytes([winner]) * 50_000


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_killed_mid_write_and_mid_read_is_reclaimed(transport: str) -> None:
    """A writer killed after half its WRITE and a reader killed while its READs of a 4 MiB block still move
    (tcp: the server's engine is mid-send to it; shm: its mover is mid-copy) leak no reservation or lease, and
    the block stays intact for other clients."""
    srv = procs.start(transport, "16MiB", "127.0.0.1:0", *FAST)
    try:
        with client(srv, transport) as c:
            _kill_a_writer_and_a_reader(srv, transport, c)
        procs.stop(srv, timeout=8.0)
        assert srv.proc.returncode == 0  # its serving threads all ended: none hangs on the killed reader
    finally:
        procs.stop(srv)


def _kill_a_writer_and_a_reader(srv: procs.ServerProc, transport: str, c: PoolClient) -> None:
    writer = child(srv, transport, "hang-write", key(1))
    assert "reserved" in json.loads(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    assert sum(cl["writing"] for cl in classes(srv)) == 1
    assert c.lookup_prefix([key(1)]).refs == ()  # uncommitted: invisible
    assert c.put([key(1)], [b"x"]) == [PutStatus.EXISTS]  # the reservation still holds the key
    assert wait_for(lambda: sum(cl["writing"] + cl["retired"] for cl in classes(srv)) == 0, 5.0)
    assert c.put([key(1)], [b"y" * 50_000]) == [PutStatus.STORED]

    large = os.urandom(4 << 20)  # the 4 MiB class
    assert c.put([key(2)], [large]) == [PutStatus.STORED]
    reader = child(srv, transport, "hang-read", key(2), "32")  # 32 READs of 4 MiB, none waited for
    ready = json.loads(reader.stdout.readline())
    assert ready["hits"] == 1 and ready["posted"] == 32 and ready["outstanding"] > 0
    reader.send_signal(signal.SIGKILL)
    reader.wait(10)
    reader.stdout.close()
    assert sum(cl["leased"] for cl in classes(srv)) == 1
    assert wait_for(lambda: sum(cl["leased"] for cl in classes(srv)) == 0, 5.0)
    buf = bytearray(4 << 20)
    assert c.get([key(2)], [buf]) == [4 << 20] and buf == large  # another client reads it byte-exact
    assert c.delete([key(1), key(2)]) == [True, True]
    assert wait_for(lambda: sum(cl["retired"] for cl in classes(srv)) == 0, 3.0)
    assert c.put([key(3)], [large[::-1]]) == [PutStatus.STORED]  # the slot the reader read is reused
    buf = bytearray(4 << 20)
    assert c.get([key(3)], [buf]) == [4 << 20] and buf == large[::-1]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_key_rewritten_into_its_slot_is_a_miss_for_a_stalled_reader(transport: str) -> None:
    """A slot forced into reuse under a slow reader, by the SAME key and length: only the generation differs
    between what the stalled READ finds and what its lookup promised, so the miss proves the client compares
    the block's generation with the lookup reply's (not with the block's own header)."""
    one_slot = str(stride_for(64 << 10))  # the tenant's quota holds exactly one 64 KiB slot: reuse is forced
    with procs.running(transport, one_slot, "--size-classes", "64KiB", "--lease-s", "0.5", "--grace-s", "0.2",
                       "--reservation-s", "1") as srv, client(srv, transport) as c:
        old, new = os.urandom(64 << 10), os.urandom(64 << 10)
        assert c.put([key(1)], [old]) == [PutStatus.STORED]
        (ref,) = c.lookup_prefix([key(1)]).refs
        assert c.delete([key(1)]) == [True]
        assert c.put([key(1)], [new]) == [PutStatus.FULL]  # not reused while the reader's lease runs
        # lease + grace later, the same key takes the same slot again, with a new generation
        assert wait_for(lambda: c.put([key(1)], [new]) == [PutStatus.STORED], 5.0, 0.05)
        (fresh,) = c.lookup_prefix([key(1)]).refs
        assert (fresh.hit.addr, fresh.length) == (ref.hit.addr, ref.length)
        assert fresh.hit.generation != ref.hit.generation
        # a READ stalled past its lease (the client's lease check would skip it: this one reaches the slot)
        stalled = ref._replace(lease_until=float("inf"))
        corrupt = c.counters["corrupt_blocks"]
        buf = bytearray(64 << 10)
        assert c.read([stalled], [buf]) == [None]
        assert c.counters["corrupt_blocks"] == corrupt + 1
        assert c.get([key(1)], [buf]) == [64 << 10] and buf == new


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_restart_gives_misses_then_reconnects(transport: str) -> None:
    srv = procs.start(transport, "16MiB")
    port = srv.info["port"]
    c = client(srv, transport, retry_after_s=0.2, request_timeout_s=1.0, connect_timeout_s=1.0)
    try:
        assert c.put([key(1)], [b"before"]) == [PutStatus.STORED]
        srv.kill()
        t = time.monotonic()
        assert c.get([key(1)], [bytearray(16)]) == [None]
        assert c.put([key(2)], [b"x"]) == [PutStatus.UNAVAILABLE]
        assert time.monotonic() - t < 3.0
        srv = procs.start(transport, "16MiB", f"127.0.0.1:{port}")
        time.sleep(0.3)
        assert c.get([key(1)], [bytearray(16)]) == [None]  # a restarted server is empty
        assert c.put([key(1)], [b"after"]) == [PutStatus.STORED]
        buf = bytearray(16)
        assert c.get([key(1)], [buf]) == [5] and bytes(buf[:5]) == b"after"
        assert c.counters["unavailable"] >= 1
    finally:
        c.close()
        procs.stop(srv)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_frozen_between_lookup_and_read(transport: str) -> None:
    """SIGSTOP the server after a lookup. tcp: its engine serves the READs, so they cost misses within the data
    timeout (no hang), and after SIGCONT the client reconnects. shm: the reads are one-sided memory copies that
    need no server CPU, so they return the data."""
    srv = procs.start(transport, "64MiB")
    c = client(srv, transport, data_timeout_s=1.0, request_timeout_s=1.0, retry_after_s=0.2)
    try:
        keys = [key(i) for i in range(8)]
        blocks = [os.urandom(1 << 20) for _ in keys]
        assert c.put(keys, blocks) == [PutStatus.STORED] * len(keys)
        refs = c.lookup_prefix(keys)
        assert len(refs) == len(keys)
        bufs = [bytearray(1 << 20) for _ in keys]
        with frozen(srv):
            t = time.monotonic()
            got = c.read(refs, bufs)
            elapsed = time.monotonic() - t
        if transport == "tcp":
            assert got == [None] * len(keys) and elapsed < 3.0
        else:
            assert got == [1 << 20] * len(keys) and bufs == blocks
        time.sleep(0.3)
        bufs = [bytearray(1 << 20) for _ in keys]
        assert c.get(keys, bufs) == [1 << 20] * len(keys) and bufs == blocks
    finally:
        c.close()
        procs.stop(srv)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_control_calls_to_a_frozen_server_fail_within_the_request_timeout(transport: str) -> None:
    """Every control call to a server that is alive but does not answer costs a miss or a failure within the
    request timeout, never a hang or an exception: first each call on an open connection (frozen right before
    it), then each on a reconnect whose hello gets no reply. After SIGCONT the same client works again."""
    timeout = 0.5
    srv = procs.start(transport, "16MiB")
    c = client(srv, transport, request_timeout_s=timeout, connect_timeout_s=timeout, data_timeout_s=timeout,
               retry_after_s=0.0)  # no retry pause: every call tries the frozen server again

    def calls(delete: bytes) -> dict[str, tuple[Callable[[], object], object]]:
        """name -> (the call, what it must give while the server is frozen)."""
        return {"lookup_prefix": (lambda: len(c.lookup_prefix([key(1)])), 0),
                "put": (lambda: c.put([key(2)], [b"x"]), [PutStatus.UNAVAILABLE]),
                "get": (lambda: c.get([key(1)], [bytearray(16)]), [None]),
                "delete": (lambda: c.delete([delete]), [False])}

    def timed(call: Callable[[], object]) -> tuple[object, float]:
        t = time.monotonic()
        return call(), time.monotonic() - t

    try:
        assert c.put([key(1), key(4), key(5)], [b"before"] * 3) == [PutStatus.STORED] * 3
        outcomes: list[tuple[str, object, object, float]] = []  # (call, wanted, got, seconds it took)
        for name, (call, failed) in calls(key(4)).items():  # (the server runs this delete once it continues)
            assert len(c.lookup_prefix([key(1)])) == 1  # connected
            with frozen(srv):
                outcomes.append((f"{name} (open connection)", failed, *timed(call)))
        with frozen(srv):
            for name, (call, failed) in calls(key(5)).items():
                outcomes.append((f"{name} (reconnect)", failed, *timed(call)))
        for name, failed, got, elapsed in outcomes:
            assert got == failed and elapsed < timeout + 1.5, f"{name}: {got!r} after {elapsed:.2f}s"
        assert c.counters["unavailable"] >= len(outcomes)
        assert c.put([key(3)], [b"after"]) == [PutStatus.STORED]
        bufs = [bytearray(16), bytearray(16)]
        assert c.get([key(3), key(5)], bufs) == [5, 6]  # key 5's delete never reached the server
        assert bytes(bufs[0][:5]) == b"after" and bytes(bufs[1][:6]) == b"before"
        assert c.delete([key(5)]) == [True]
    finally:
        c.close()
        procs.stop(srv)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_put_flood_stays_bounded(transport: str) -> None:
    with procs.running(transport, "8MiB", "--size-classes", "64KiB") as srv, client(srv, transport) as c:
        payload = os.urandom(64 << 10)
        rss_before = srv.rss_kib()
        stored = 0
        for batch in range(30):
            keys = [key(batch * 32 + i) for i in range(32)]
            stored += c.put(keys, [payload] * 32).count(PutStatus.STORED)
        assert stored == 30 * 32  # every put found room: eviction, not refusal
        (cl,) = classes(srv)
        assert cl["resident"] <= cl["slots"] < 30 * 32
        snapshot = fetch(ServerAddress.parse(srv.address), procs.TOKENS["a"])
        assert snapshot["counters"]["evictions"] >= 30 * 32 - cl["slots"]
        # 60 MiB went through an 8 MiB pool: the server's memory grew by far less than that
        assert srv.rss_kib() - rss_before < 24 << 10
        keys = [key(30 * 32 - 1 - i) for i in range(4)]
        assert c.get(keys, [bytearray(64 << 10) for _ in keys]) == [64 << 10] * 4  # the newest are resident


def test_ttl_expires_blocks_end_to_end() -> None:
    with procs.running("tcp", "4MiB", "--size-classes", "64KiB", "--ttl-s", "0.5") as srv, client(srv, "tcp") as c:
        assert c.put([key(1)], [b"short-lived"]) == [PutStatus.STORED]
        assert c.get([key(1)], [bytearray(16)]) == [11]
        time.sleep(0.8)
        assert c.get([key(1)], [bytearray(16)]) == [None]
        assert fetch(ServerAddress.parse(srv.address), procs.TOKENS["a"])["counters"]["expired_ttl"] == 1


def test_sigusr1_stops_a_server_outside_a_cluster_cleanly() -> None:
    """SIGUSR1 drains a cluster member; a server without --etcd has nothing to drain to and stops as on SIGTERM,
    saying why, instead of dying by the signal's default action."""
    srv = procs.start("tcp")
    try:
        srv.proc.send_signal(signal.SIGUSR1)
        assert srv.proc.wait(10) == 0
        err = srv.proc.stderr.read()
        assert "no --etcd" in err and '"stopped": true' in err
    finally:
        procs.stop(srv)
