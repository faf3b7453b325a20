"""The etcd interface against real etcd: KV and txn semantics, leases with our keep-alive, watches that
resume, report compaction, carry large values; fork safety; a three-member cluster losing a member."""

from __future__ import annotations

import os
import threading
import time

import pytest

from rdmapool.cluster.etcd import Compare, Delete, EtcdUnavailable, Get, LeaseNotFound, Put, WatchCompacted
from rdmapool.cluster.gateway import GatewayEtcd, parse_endpoints
from rdmapool.cluster.lease import LeaseClock, LeaseKeeper
from rdmapool.cluster.local_etcd import LocalEtcd
from rdmapool.cluster.mirror import PrefixMirror
from rdmapool.errors import UsageError
from tests.support.wait import wait_for

pytestmark = pytest.mark.etcd



def test_kv_and_txn(client: GatewayEtcd, keys) -> None:
    p = keys.prefix
    r1 = client.put(p + b"a", b"1")
    kv, rev = client.get(p + b"a")
    assert kv.value == b"1" and kv.mod_revision == r1 == rev
    assert client.get(p + b"missing")[0] is None
    # create-if-absent: exactly one of two wins
    first = client.txn([Compare(p + b"c", "create", "==", 0)], [Put(p + b"c", b"x")], [Get(p + b"c")])
    second = client.txn([Compare(p + b"c", "create", "==", 0)], [Put(p + b"c", b"y")], [Get(p + b"c")])
    assert first.succeeded and not second.succeeded
    assert second.results[0][0].value == b"x"
    # fenced on mod revision
    kv, _ = client.get(p + b"c")
    assert client.txn([Compare(p + b"c", "mod", "==", kv.mod_revision)], [Put(p + b"c", b"z")]).succeeded
    assert not client.txn([Compare(p + b"c", "mod", "==", kv.mod_revision)], [Put(p + b"c", b"w")]).succeeded
    kvs, _ = client.get_prefix(p)
    assert [k.key for k in kvs] == [p + b"a", p + b"c"]
    client.txn([], [Delete(p, prefix=True)])
    assert client.get_prefix(p)[0] == []
    with pytest.raises(UsageError):
        Compare(p, "bogus", "==", 0)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        parse_endpoints("https://x:1")


def test_unreachable_endpoint_is_etcd_unavailable() -> None:
    from rdmapool.cluster.local_etcd import free_port

    c = GatewayEtcd([f"127.0.0.1:{free_port()}"], timeout=0.5)
    t = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        c.get(b"/x")
    assert time.monotonic() - t < 2


def test_ports_distinct_and_a_taken_port_moves_the_cluster() -> None:
    """Ports picked one at a time could repeat (CI once gave a member's client port to another's peer), and
    another process may take one before etcd binds it: start then moves the new cluster to other ports."""
    import socket

    cluster = LocalEtcd(3)
    ports = [p for m in cluster.members for p in (m.client_port, m.peer_port)]
    assert len(set(ports)) == 6
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cluster.members[0].client_port))
        squatter.listen()
        with cluster:
            taken = squatter.getsockname()[1]
            assert taken not in [p for m in cluster.members for p in (m.client_port, m.peer_port)]
            c = GatewayEtcd(cluster.endpoints, timeout=2.0)
            try:
                c.put(b"/ports", b"ok")
                assert c.get(b"/ports")[0].value == b"ok"
            finally:
                c.close()


def test_lease_keepalive_and_expiry(client: GatewayEtcd, keys) -> None:
    keeper = LeaseKeeper(client, ttl=2)
    lease = keeper.grant()
    client.put(keys.prefix + b"l", b"v", lease=lease)
    time.sleep(3.0)  # longer than the TTL: only our keep-alive keeps it
    assert keeper.alive() and client.get(keys.prefix + b"l")[0] is not None
    keeper.stop(revoke=False)
    t0 = time.monotonic()
    assert wait_for(lambda: client.get(keys.prefix + b"l")[0] is None, 4.0)
    assert time.monotonic() - t0 <= 2.0 + 1.0
    with pytest.raises(LeaseNotFound):
        client.put(keys.prefix + b"m", b"v", lease=lease)
    assert client.lease_keepalive(lease) <= 0


def test_lease_clock_is_conservative() -> None:
    c = LeaseClock(2.0)
    assert not c.alive(0.0)
    c.refreshed(sent_at=10.0, granted_ttl=2)
    assert c.alive(11.9) and not c.alive(12.0)
    c.refreshed(sent_at=9.0, granted_ttl=2)  # a late reply to an older refresh never shortens it
    assert c.alive(11.9)
    c.refreshed(sent_at=11.0, granted_ttl=0)  # etcd: lease gone
    assert not c.alive(11.1)


def test_watch_resume_compaction_and_large_values(etcd1: LocalEtcd, client: GatewayEtcd, keys) -> None:
    p = keys.prefix
    start = client.put(p + b"k", b"0")
    for i in range(1, 4):
        client.put(p + b"k", str(i).encode())
    client.put(p + b"big", b"x" * 700_000)  # spans many HTTP chunks
    w = client.watch_prefix(p, start + 1, idle_timeout=3.0)
    seen = []
    for batch in w:
        seen.extend(batch.events)
        if any(e.kv.key == p + b"big" for e in seen):
            break
    w.close()
    assert [e.kv.value for e in seen if e.kv.key == p + b"k"] == [b"1", b"2", b"3"]
    assert len([e for e in seen if e.kv.key == p + b"big"][0].kv.value) == 700_000
    _, rev = client.get(p + b"k")
    etcd1.compact(rev)
    with pytest.raises(WatchCompacted) as exc:
        for _ in client.watch_prefix(p, start + 1, idle_timeout=3.0):
            pass
    assert exc.value.compact_revision >= rev


def test_watch_close_from_another_thread(client: GatewayEtcd, keys) -> None:
    _, rev = client.get(keys.prefix)
    w = client.watch_prefix(keys.prefix, rev + 1, idle_timeout=30.0)
    ended = threading.Event()

    def run() -> None:
        for _ in w:
            pass
        ended.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.3)
    w.close()
    assert ended.wait(3.0), "closing a watch must end its iteration promptly"


def test_fork_safety(client: GatewayEtcd, keys) -> None:
    """Parent and forked child hammer the same client object: each process gets its own sessions."""
    client.get(keys.prefix)  # the parent's session exists before the fork
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            for i in range(200):
                client.put(keys.prefix + b"child", str(i).encode())
                if client.get(keys.prefix + b"child")[0].value != str(i).encode():
                    code = 3
        except BaseException:
            code = 4
        os._exit(code)
    errors = 0
    for i in range(200):
        client.put(keys.prefix + b"parent", str(i).encode())
        if client.get(keys.prefix + b"parent")[0].value != str(i).encode():
            errors += 1
    _, status = os.waitpid(pid, 0)
    assert errors == 0 and os.waitstatus_to_exitcode(status) == 0


def test_mirror_follows_changes(client: GatewayEtcd, keys) -> None:
    client.put(keys.prefix + b"a", b"1")
    m = PrefixMirror(client, keys.prefix, idle_timeout=3.0).start()
    try:
        assert m.snapshot()[0][keys.prefix + b"a"].value == b"1"
        v = m.version
        client.put(keys.prefix + b"b", b"2")
        client.delete(keys.prefix + b"a")
        assert wait_for(lambda: set(m.snapshot()[0]) == {keys.prefix + b"b"}, 3.0)
        assert m.version > v
    finally:
        m.stop()


@pytest.mark.slow
def test_three_members_one_killed_and_compaction_while_away(keys) -> None:
    """Kill the member a mirror and a lease keeper talk to: both move to the others. The killed member
    comes back after history was compacted: a watch on it re-lists instead of silently stopping."""
    with LocalEtcd(3) as cluster:
        c = GatewayEtcd(cluster.endpoints, timeout=1.0, retry_s=6.0)  # an election under load can take seconds
        # the servers' default TTL: killing the leader costs an election (1-2 s, longer on a loaded 2-core CI
        # machine) during which no keep-alive succeeds; a 2 s TTL made that a coin toss there
        keeper = LeaseKeeper(c, ttl=5)
        lease = keeper.grant()
        c.put(keys.prefix + b"lease", b"v", lease=lease)
        m = PrefixMirror(c, keys.prefix, idle_timeout=2.0).start()
        only0 = GatewayEtcd([cluster.endpoints[0]], timeout=1.0)  # a client that knows only member 0
        m0 = PrefixMirror(only0, keys.prefix, idle_timeout=2.0, retry_s=0.1).start()
        try:
            cluster.kill(0)  # the endpoint every client starts with
            for i in range(20):
                c.put(keys.prefix + b"k", str(i).encode())
            assert wait_for(lambda: m.snapshot()[0].get(keys.prefix + b"k") is not None
                            and m.snapshot()[0][keys.prefix + b"k"].value == b"19", 8.0)
            time.sleep(5.5)  # longer than the TTL
            assert keeper.alive() and c.get(keys.prefix + b"lease")[0] is not None
            # m0 is stuck at its old revision; compact past it while member 0 is down, then bring it back
            assert keys.prefix + b"k" not in m0.snapshot()[0] and not m0.connected
            _, rev = c.get(keys.prefix)
            cluster.compact(rev)
            cluster.restart(0)
            assert wait_for(lambda: m0.relists >= 1 and keys.prefix + b"k" in m0.snapshot()[0], 10.0)
            assert m0.snapshot()[0][keys.prefix + b"k"].value == b"19"
        finally:
            m0.stop()
            only0.close()
            m.stop()
            keeper.stop()
            c.close()
