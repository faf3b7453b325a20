"""Election and fenced map writes: races, stale coordinators, takeover; map follows membership."""

from __future__ import annotations

import time

import pytest

from rdmapool.cluster.coordinator import Coordinator, compute_map, write_map
from rdmapool.cluster.membership import MemberRecord, MemberState
from rdmapool.cluster.router import ShardRouter
from rdmapool.cluster.session import MembershipSession
from rdmapool.cluster.shardmap import ShardMap
from rdmapool.errors import ProtocolError
from tests.support.wait import wait_for

pytestmark = pytest.mark.etcd
S = 1024



def record(i: int, rack: str = "", cap: int = 1 << 30) -> MemberRecord:
    return MemberRecord(f"s{i}", f"127.0.0.1:{7000 + i}", cap, host=f"h{i}", rack=rack or f"r{i % 3}",
                        state=MemberState.ACTIVE)


def test_shard_map_roundtrip_and_validation() -> None:
    m = compute_map([record(i) for i in range(5)], None, S, 2, "s0", 7, 3)
    back = ShardMap.decode(m.encode())
    assert back.same_placement(m) and back.epoch == 1 and back.fence == 7
    assert back.replicas_for(b"key") == m.replicas_for(b"key")
    assert len(set(m.replicas_for(b"key"))) == 2
    for bad in (b"", b"\x01\x02", m.encode()[:-10]):
        with pytest.raises(ProtocolError):
            ShardMap.decode(bad)


def test_fencing_rejects_stale_token_and_stale_base(client, keys) -> None:
    lease = client.lease_grant(5)
    client.put(keys.coordinator, b"A", lease=lease)
    token_a, _ = client.get(keys.coordinator)
    token_a = token_a.create_revision
    m1 = compute_map([record(i) for i in range(4)], None, S, 2, "A", token_a, 0)
    assert write_map(client, keys, m1, 0, token_a).ok
    base = client.get(keys.shard_map)[0].mod_revision
    # two writers computed from the same base: exactly one wins
    m2 = compute_map([record(i) for i in range(5)], m1, S, 2, "A", token_a, 0)
    m3 = compute_map([record(i) for i in range(6)], m1, S, 2, "A", token_a, 0)
    results = [write_map(client, keys, m, base, token_a) for m in (m2, m3)]
    assert [r.ok for r in results] == [True, False] and results[1].still_coordinator
    # A's lease ends, B is elected: A's token no longer writes, whatever base it uses
    client.lease_revoke(lease)
    client.put(keys.coordinator, b"B")
    current = client.get(keys.shard_map)[0]
    stale = write_map(client, keys, m3, current.mod_revision, token_a)
    assert not stale.ok and not stale.still_coordinator
    assert ShardMap.decode(client.get(keys.shard_map)[0].value).same_placement(m2)


def test_two_coordinators_race_one_leads_map_follows_members(client, keys) -> None:
    sessions = [MembershipSession(client, keys, record(i), ttl=2).start() for i in range(3)]
    coords = [Coordinator(client, keys, f"s{i}", S, 2, ttl=2).start() for i in range(2)]
    router = ShardRouter(client, keys).start()
    try:
        assert wait_for(lambda: router.shard_map is not None and len(router.shard_map.servers) == 3, 5.0)
        assert sum(c.leading.is_set() for c in coords) == 1
        leader = next(c for c in coords if c.leading.is_set())
        other = next(c for c in coords if not c.leading.is_set())
        assert router.shard_map.fence == leader.token and other.maps_written == 0
        # a join changes the map; the new server gets its capacity share
        sessions.append(MembershipSession(client, keys, record(3), ttl=2).start())
        assert wait_for(lambda: "s3" in router.shard_map.servers, 5.0)
        counts = router.shard_map.shard_counts()
        assert abs(counts["s3"][1] - S * 2 / 4) <= 2
        # capacity change: s3 doubles, its share follows
        before = router.shard_map.shard_counts()["s3"][1]
        r3 = sessions[3].record
        sessions[3].update(MemberRecord(r3.id, r3.control, 2 * r3.capacity_host, 0, r3.host, r3.rack,
                                        state=MemberState.ACTIVE))
        assert wait_for(lambda: router.shard_map.shard_counts()["s3"][1] > before * 1.25, 5.0)  # rack r0 is capped at 1/R
        # drain: the map stops listing the server, then it leaves
        sessions[3].set_state(MemberState.DRAINING)
        assert wait_for(lambda: "s3" not in router.shard_map.servers, 5.0)
        # the leader dies without resigning: the other takes over within a TTL or so, epochs keep growing
        epoch = router.shard_map.epoch
        leader.stop(resign=False)
        t0 = time.monotonic()
        assert wait_for(other.leading.is_set, 6.0)
        took = time.monotonic() - t0
        assert took <= 2 + 1.5, took
        sessions[0].close(leave=True)
        assert wait_for(lambda: "s0" not in router.shard_map.servers, 5.0)
        assert router.shard_map.epoch > epoch and router.shard_map.fence == other.token
    finally:
        router.stop()
        for c in coords:
            c.stop()
        for s in sessions:
            s.close()


def test_stale_coordinator_that_still_believes_it_leads_cannot_write(client, keys) -> None:
    """Pause a leader (its lease is revoked behind its back, as after a long GC pause); a new coordinator is
    elected; the old one's next write is fenced off and it steps down."""
    s = MembershipSession(client, keys, record(0), ttl=2).start()
    a = Coordinator(client, keys, "A", S, 2, ttl=2).start()
    try:
        assert wait_for(a.leading.is_set, 3.0)
        assert wait_for(lambda: client.get(keys.shard_map)[0] is not None, 3.0)
        old_token = a.token
        client.lease_revoke(a._keeper.lease_id)
        b = Coordinator(client, keys, "B", S, 2, ttl=2).start()
        try:
            assert wait_for(b.leading.is_set, 3.0)
            assert b.token != old_token
            kv = client.get(keys.shard_map)[0]
            smap = ShardMap.decode(kv.value)
            forged = compute_map([record(0), record(1)], smap, S, 2, "A", old_token, 0)
            assert not write_map(client, keys, forged, kv.mod_revision, old_token).ok
            assert wait_for(lambda: not a.leading.is_set(), 3.0)
            assert not ShardMap.decode(client.get(keys.shard_map)[0].value).same_placement(forged)
        finally:
            b.stop()
    finally:
        a.stop()
        s.close()
