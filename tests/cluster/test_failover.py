"""Member processes SIGKILLed: leases expire, the map changes, routers reroute; the coordinator killed: another
takes over; etcd restarted: agents re-register and routers resume. Convergence times are measured."""

from __future__ import annotations

import json
import signal
import time

import pytest

from rdmapool.cluster.gateway import GatewayEtcd
from rdmapool.cluster.local_etcd import LocalEtcd
from rdmapool.cluster.router import ShardRouter
from tests.cluster.conftest import spawn_member
from tests.support.wait import wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.slow]
TTL = 2
S = 1024



def start_members(endpoints, cluster, n, racks=3):
    return [spawn_member(endpoints, cluster, f"s{i}", "--ttl", str(TTL), "--shards", str(S), "--replicas", "2",
                         "--rack", f"r{i % racks}", "--capacity", "1G", "--control", f"127.0.0.1:{7100 + i}")
            for i in range(n)]


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except Exception:
            p.kill()
            p.wait(timeout=5)
        p.stdout.close()
        p.stderr.close()


def keys_on(router: ShardRouter, server: str, n: int = 64) -> list[bytes]:
    out = []
    i = 0
    while len(out) < n:
        k = f"key-{i}".encode()
        if server in router.shard_map.replicas_for(k):
            out.append(k)
        i += 1
    return out


def test_sigkill_member_then_coordinator_convergence(etcd1: LocalEtcd, keys, record_property) -> None:
    client = GatewayEtcd(etcd1.endpoints)
    procs = start_members(etcd1.endpoints, keys.cluster, 4)
    router = ShardRouter(client, keys).start()
    try:
        assert wait_for(lambda: router.shard_map is not None and len(router.shard_map.servers) == 4, 20.0)
        coord = client.get(keys.coordinator)[0].value.decode()
        victim = next(f"s{i}" for i in range(4) if f"s{i}" != coord)
        probe = keys_on(router, victim)
        epoch = router.shard_map.epoch
        t0 = time.monotonic()
        procs[int(victim[1:])].send_signal(signal.SIGKILL)
        assert wait_for(lambda: all(victim not in [m.id for m in router.route(k).replicas] for k in probe), 6.0)
        reroute = time.monotonic() - t0
        assert wait_for(lambda: victim not in router.shard_map.servers, 6.0)
        converge = time.monotonic() - t0
        assert router.shard_map.epoch > epoch
        assert all(len(router.route(k).replicas) == 2 for k in probe), "every shard back to R replicas"
        # now the coordinator itself
        epoch = router.shard_map.epoch
        t1 = time.monotonic()
        procs[int(coord[1:])].send_signal(signal.SIGKILL)
        assert wait_for(lambda: coord not in router.shard_map.servers, 8.0)
        takeover = time.monotonic() - t1
        new_coord = client.get(keys.coordinator)[0].value.decode()
        assert new_coord not in (coord, victim) and router.shard_map.coordinator == new_coord
        result = {"ttl_s": TTL, "reroute_s": round(reroute, 3), "map_converged_s": round(converge, 3),
                  "coordinator_takeover_and_map_s": round(takeover, 3)}
        print("convergence", json.dumps(result))
        record_property("convergence", result)
        assert converge <= TTL + 1.0, result
        assert takeover <= TTL + 1.0, result
    finally:
        router.stop()
        stop_all(procs)
        client.close()


def test_etcd_restart_members_reregister_and_watches_resume(keys) -> None:
    with LocalEtcd(1) as cluster:
        client = GatewayEtcd(cluster.endpoints, timeout=1.0)
        procs = start_members(cluster.endpoints, keys.cluster, 3)
        router = ShardRouter(client, keys, idle_timeout=2.0).start()
        try:
            assert wait_for(lambda: router.shard_map is not None and len(router.shard_map.servers) == 3, 20.0)
            before = router.shard_map
            cluster.kill(0)
            # etcd down: routing continues on the last map
            assert wait_for(lambda: not router.connected, 5.0)
            assert router.route(b"k").replicas and router.shard_map is before
            time.sleep(TTL + 0.5)  # every lease is past its TTL on the members' clocks
            cluster.restart(0)
            assert wait_for(lambda: router.connected, 10.0)
            # members re-register (new leases), a coordinator writes a map again, routers see it
            assert wait_for(lambda: len(client.get_prefix(keys.members)[0]) == 3, 10.0)
            assert wait_for(lambda: router.shard_map.epoch >= before.epoch and len(router.members()) == 3, 10.0)
            procs.append(spawn_member(cluster.endpoints, keys.cluster, "s9", "--ttl", str(TTL), "--shards",
                                      str(S), "--rack", "r9"))
            assert wait_for(lambda: "s9" in router.shard_map.servers, 20.0), "router watch did not resume"
        finally:
            router.stop()
            stop_all(procs)
            client.close()


def test_one_etcd_member_of_three_killed_pool_keeps_working(keys) -> None:
    with LocalEtcd(3) as cluster:
        client = GatewayEtcd(cluster.endpoints, timeout=1.0)
        procs = start_members(cluster.endpoints, keys.cluster, 3)
        router = ShardRouter(client, keys, idle_timeout=2.0).start()
        try:
            assert wait_for(lambda: router.shard_map is not None and len(router.shard_map.servers) == 3, 20.0)
            cluster.kill(0)
            time.sleep(TTL + 1)  # leases survive: keep-alives move to the other members
            assert len(client.get_prefix(keys.members)[0]) == 3
            procs.append(spawn_member(cluster.endpoints, keys.cluster, "s9", "--ttl", str(TTL), "--shards",
                                      str(S), "--rack", "r9"))
            assert wait_for(lambda: "s9" in router.shard_map.servers, 20.0)
            procs[0].send_signal(signal.SIGKILL)
            assert wait_for(lambda: "s0" not in router.shard_map.servers, TTL + 3.0)
        finally:
            router.stop()
            stop_all(procs)
            client.close()
