"""Memory servers joined to a cluster (`rdmapool server --etcd`) and the replicated client routed by the shard
map: writes land on R replicas, a SIGKILLed server costs no hits (reads fail over), the map converges, and a
server that cannot reach etcd refuses writes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from rdmapool.client import PoolClient, PutStatus
from rdmapool.cluster.client import ClusterRouter, ReplicatedPoolClient
from rdmapool.cluster.gateway import GatewayEtcd
from rdmapool.cluster.local_etcd import LocalEtcd
from rdmapool.cluster.router import ShardRouter
from rdmapool.config import ClientConfig
from rdmapool.errors import ServerUnavailable
from tests.support import procs
from tests.support.wait import wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.slow]
TTL = 2



def start_servers(endpoints: list[str], cluster: str, n: int, *extra: str) -> list[procs.ServerProc]:
    return [procs.start("tcp", "8MiB", "127.0.0.1:0", "--etcd", ",".join(endpoints), "--cluster", cluster,
                        "--member-ttl", str(TTL), "--shards", "1024", "--replicas", "2", "--rack", f"r{i}",
                        "--member-id", f"m{i}", "--size-classes", "8KiB,1MiB", *extra) for i in range(n)]


def config(**kw) -> ClientConfig:
    return ClientConfig(token=procs.TOKENS["a"], staging_bytes=4 << 20, retry_after_s=0.5, **kw)


def holders(servers: list[procs.ServerProc], keys: list[bytes], size: int) -> dict[bytes, set[str]]:
    """Which servers hold each key, asked one by one with plain single-server clients."""
    out: dict[bytes, set[str]] = {k: set() for k in keys}
    for s in servers:
        if s.proc.poll() is not None:
            continue
        with PoolClient([s.address], config()) as c:
            got = c.get(keys, [bytearray(size) for _ in keys])
            for k, n in zip(keys, got, strict=True):
                if n is not None:
                    out[k].add(s.info["member_id"])
    return out


def test_replicated_writes_failover_and_convergence(etcd1: LocalEtcd, keys) -> None:
    etcd = GatewayEtcd(etcd1.endpoints)
    servers = start_servers(etcd1.endpoints, keys.cluster, 3)
    router = ShardRouter(etcd, keys).start()
    client = ReplicatedPoolClient(ClusterRouter(router), config())
    try:
        assert wait_for(lambda: router.shard_map is not None and len(router.shard_map.servers) == 3, 15.0)
        ks = [os.urandom(16) for _ in range(48)]
        data = {k: os.urandom(4096) for k in ks}
        assert client.put(ks, [data[k] for k in ks]) == [PutStatus.STORED] * len(ks)
        where = holders(servers, ks, 4096)
        for k in ks:
            assert where[k] == set(router.shard_map.replicas_for(k)), "each key on exactly its R replicas"
        # readers keep going while the first replica of the first key is SIGKILLed
        victim_id = router.shard_map.replicas_for(ks[0])[0]
        victim = next(s for s in servers if s.info["member_id"] == victim_id)
        rounds: list[tuple[float, int, int]] = []  # (time, hits, correct)
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                bufs = [bytearray(4096) for _ in ks]
                got = client.get(ks, bufs)
                rounds.append((time.monotonic(), sum(n == 4096 for n in got),
                               sum(bytes(b) == data[k] for b, k in zip(bufs, ks, strict=True))))
        th = threading.Thread(target=reader, daemon=True)
        th.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        victim.kill()
        time.sleep(TTL + 1.5)
        stop.set()
        th.join(10)
        after = [r for r in rounds if r[0] > t0]
        assert after and all(h == c == len(ks) for _, h, c in after), "a dead server must cost no hit"
        first_read = after[0][0] - t0
        print(f"under load: {len(after)} read rounds of {len(ks)} keys after the kill, all hits")
        counts = client.counters.snapshot()
        assert counts.get("replica_failovers", 0) + counts.get("replica_read_retries", 0) > 0
        assert first_read < 3.0
        print(f"failover: first read of {len(ks)} keys after SIGKILL took {first_read:.3f}s, all hits")
        assert wait_for(lambda: victim_id not in router.shard_map.servers, TTL + 1.0 + 0.5)
        # new writes go to the two live servers only, both of them
        more = [os.urandom(16) for _ in range(16)]
        assert client.put(more, [b"x" * 1000] * len(more)) == [PutStatus.STORED] * len(more)
        where = holders(servers, more, 1000)
        assert all(len(where[k]) == 2 and victim_id not in where[k] for k in more)
    finally:
        client.close()
        router.stop()
        for s in servers:
            procs.stop(s)
        etcd.close()


def test_a_client_from_etcd_routes_by_the_map_and_stops_its_mirrors_on_close(etcd1: LocalEtcd, keys) -> None:
    """`ReplicatedPoolClient.from_etcd`: one call waits for the map, routes by it; close stops the mirrors."""
    with pytest.raises(ServerUnavailable, match="did not name 1 server"):
        ReplicatedPoolClient.from_etcd(etcd1.endpoints, config(), keys.cluster, timeout=0.5)
    servers = start_servers(etcd1.endpoints, keys.cluster, 2)
    before = threading.active_count()
    client = ReplicatedPoolClient.from_etcd(etcd1.endpoints, config(), keys.cluster, min_servers=2, timeout=15.0)
    try:
        assert threading.active_count() > before  # the membership and map mirrors
        ks = [os.urandom(16) for _ in range(8)]
        assert client.put(ks, [k * 8 for k in ks]) == [PutStatus.STORED] * len(ks)
        bufs = [bytearray(128) for _ in ks]
        assert client.get(ks, bufs) == [128] * len(ks) and all(b == k * 8 for b, k in zip(bufs, ks, strict=True))
        where = holders(servers, ks, 128)
        assert all(where[k] == set(client.cluster_router.shard_router.shard_map.replicas_for(k)) for k in ks)
    finally:
        client.close()
        for s in servers:
            procs.stop(s)
    assert wait_for(lambda: threading.active_count() <= before, 5.0), "close left the mirrors running"


def test_server_without_etcd_refuses_writes(keys) -> None:
    """The server's own etcd goes away: within the lease TTL it stops taking writes; reads keep working."""
    with LocalEtcd(1) as cluster:
        [server] = start_servers(cluster.endpoints, keys.cluster, 1)
        plain = PoolClient([server.address], config())
        try:
            assert wait_for(lambda: plain.put([b"k" * 16], [b"v" * 100]) == [PutStatus.STORED], 10.0)
            cluster.kill(0)
            t0 = time.monotonic()
            assert wait_for(lambda: plain.put([os.urandom(16)], [b"v" * 100]) == [PutStatus.UNAVAILABLE],
                            TTL + 2.0, step=0.05)
            refused_after = time.monotonic() - t0
            assert refused_after <= TTL + 0.5, refused_after
            print(f"write gate: writes refused {refused_after:.2f}s after etcd died (TTL {TTL}s)")
            assert plain.get([b"k" * 16], [bytearray(100)]) == [100]
            assert plain.server_stats(server.address)["counters"].get("writes_refused", 0) >= 1
        finally:
            plain.close()
            procs.stop(server)


def test_drain_moves_shards_then_server_leaves(etcd1: LocalEtcd, keys) -> None:
    etcd = GatewayEtcd(etcd1.endpoints)
    servers = start_servers(etcd1.endpoints, keys.cluster, 3)
    router = ShardRouter(etcd, keys).start()
    client = ReplicatedPoolClient(ClusterRouter(router), config())
    try:
        assert wait_for(lambda: router.shard_map is not None and len(router.shard_map.servers) == 3, 15.0)
        ks = [os.urandom(16) for _ in range(24)]
        assert client.put(ks, [b"d" * 512] * len(ks)) == [PutStatus.STORED] * len(ks)
        leaving = servers[2]
        leaving.proc.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: "m2" not in router.shard_map.servers, TTL + 3.0)
        assert leaving.proc.wait(10) == 0, "a drained server leaves by itself"
        assert wait_for(lambda: "m2" not in router.members(), 3.0)
        got = client.get(ks, [bytearray(512) for _ in ks])
        assert all(n == 512 for n in got), "every key still has a replica after a drain"
        more = [os.urandom(16) for _ in range(8)]
        assert client.put(more, [b"e" * 512] * len(more)) == [PutStatus.STORED] * len(more)
    finally:
        client.close()
        router.stop()
        for s in servers:
            procs.stop(s)
        etcd.close()
