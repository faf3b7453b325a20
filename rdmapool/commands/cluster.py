"""`rdmapool cluster ...`: status of a cluster in etcd, a standalone member agent, a local etcd, the scale
simulation that writes docs/scale.md."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from rdmapool.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise UsageError(f"not a byte count: {text!r} (e.g. 64G, 512M, 1048576)") from None
    if value < 0:
        raise UsageError(f"byte count must be >= 0: {text!r}")
    return int(value * _UNITS[unit])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _etcd(args: argparse.Namespace):
    from rdmapool.cluster.gateway import GatewayEtcd

    return GatewayEtcd(args.etcd, timeout=args.timeout)


def status(args: argparse.Namespace) -> int:
    from rdmapool.cluster.coordinator import read_members
    from rdmapool.cluster.keys import ClusterKeys
    from rdmapool.cluster.shardmap import ShardMap

    keys = ClusterKeys(args.cluster)
    with _etcd(args) as etcd:
        kvs, rev = etcd.get_prefix(keys.members)
        members = read_members({kv.key: kv for kv in kvs}, keys)
        map_kv, _ = etcd.get(keys.shard_map)
        coord_kv, _ = etcd.get(keys.coordinator)
    smap = ShardMap.decode(map_kv.value) if map_kv else None
    counts = smap.shard_counts() if smap else {}
    total_cap = sum(m.capacity for m in members if m.state.value == "active") or 1
    slots = smap.num_shards * smap.replicas if smap else 0
    rows = []
    for m in members:
        first, anyr = counts.get(m.id, (0, 0))
        share = anyr / slots if slots else 0.0
        cap_share = m.capacity / total_cap if m.state.value == "active" else 0.0
        rows.append({"id": m.id, "state": m.state.value, "control": m.control, "host": m.host, "rack": m.rack,
                     "zone": m.zone, "capacity_host": m.capacity_host, "capacity_gpu": m.capacity_gpu,
                     "primary_shards": first, "replica_slots": anyr, "share": share, "capacity_share": cap_share})
    stale = sorted(set(counts) - {m.id for m in members})
    doc = {
        "cluster": args.cluster, "etcd_revision": rev, "members": rows,
        "coordinator": coord_kv.value.decode() if coord_kv else None,
        "coordinator_token": coord_kv.create_revision if coord_kv else None,
        "map": None if smap is None else {
            "epoch": smap.epoch, "mod_revision": map_kv.mod_revision, "num_shards": smap.num_shards,
            "replicas": smap.replicas, "written_by": smap.coordinator, "fence": smap.fence,
            "servers_not_members": stale},
    }
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"cluster {args.cluster}: {len(members)} members, etcd revision {rev}, "
          f"coordinator {doc['coordinator'] or '-'} (token {doc['coordinator_token'] or '-'})")
    if smap:
        print(f"map epoch {smap.epoch} (mod revision {map_kv.mod_revision}), {smap.num_shards} shards x "
              f"R={smap.replicas}, written by {smap.coordinator} under token {smap.fence}")
        if stale:
            print(f"  servers in the map that are not members: {', '.join(stale)}")
    else:
        print("no shard map yet")
    print(f"{'id':<16} {'state':<9} {'control':<22} {'rack':<8} {'host':<10} {'capacity':>11} "
          f"{'primary':>8} {'slots':>8} {'share':>7} {'cap.share':>9}")
    for r in rows:
        print(f"{r['id']:<16} {r['state']:<9} {r['control']:<22} {r['rack']:<8} {r['host']:<10} "
              f"{_human(r['capacity_host'] + r['capacity_gpu']):>11} {r['primary_shards']:>8} "
              f"{r['replica_slots']:>8} {r['share']:>7.3f} {r['capacity_share']:>9.3f}")
    return 0


def join(args: argparse.Namespace) -> int:
    from rdmapool.cluster.agent import AgentConfig, ClusterAgent
    from rdmapool.cluster.keys import ClusterKeys
    from rdmapool.cluster.membership import MemberRecord

    record = MemberRecord(id=args.id, control=args.control, capacity_host=parse_bytes(args.capacity),
                          capacity_gpu=parse_bytes(args.gpu), host=args.host or args.id, rack=args.rack,
                          zone=args.zone)
    cfg = AgentConfig(ttl=args.ttl, num_shards=args.shards, replicas=args.replicas,
                      coordinator=not args.no_coordinator)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    def emit(**kw: object) -> None:
        print(json.dumps({"t": time.time(), "id": args.id, **kw}), flush=True)

    with _etcd(args) as etcd:
        agent = ClusterAgent(etcd, ClusterKeys(args.cluster), record, cfg).start()
        emit(event="started", lease=agent.session.lease_id)
        accepting, leading = None, None
        try:
            while not done.wait(0.05):
                for kind, detail in agent.session.take_events():
                    emit(event=kind, detail=str(detail))
                a = agent.accepting_writes()
                if a != accepting:
                    accepting = a
                    emit(event="accepting_writes", value=a)
                ld = agent.coordinator.leading.is_set() if agent.coordinator else False
                if ld != leading:
                    leading = ld
                    emit(event="leading", value=ld, token=agent.coordinator.token if agent.coordinator else 0)
        finally:
            agent.stop(leave=not args.no_leave)
            emit(event="stopped")
    return 0


def local_etcd(args: argparse.Namespace) -> int:
    from rdmapool.cluster.local_etcd import LocalEtcd

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with LocalEtcd(args.members) as cluster:
        print(json.dumps({"endpoints": cluster.endpoints}), flush=True)
        done.wait()
    return 0


def scale(args: argparse.Namespace) -> int:
    from rdmapool.cluster import scale_sim

    return scale_sim.main(args)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cluster", help="cluster membership and the shard map (etcd)")
    csub = parser.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--etcd", required=True, help="etcd endpoints, comma separated (http://127.0.0.1:2379)")
        p.add_argument("--cluster", default="default", help="cluster name (etcd prefix /rdmapool/NAME/)")
        p.add_argument("--timeout", type=float, default=2.0, help="etcd request timeout, seconds")

    p = csub.add_parser("status", help="members, capacities, states, shard distribution, map version")
    common(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=status)

    p = csub.add_parser("join", help="run a member agent (membership + coordinator candidacy) until stopped")
    common(p)
    p.add_argument("--id", required=True)
    p.add_argument("--control", default="", help="host:port of the server's control endpoint")
    p.add_argument("--capacity", default="1G", help="host memory offered (e.g. 64G)")
    p.add_argument("--gpu", default="0", help="GPU memory offered")
    p.add_argument("--host", default="")
    p.add_argument("--rack", default="")
    p.add_argument("--zone", default="")
    p.add_argument("--ttl", type=int, default=5, help="lease TTL, seconds (>= 2)")
    p.add_argument("--shards", type=int, default=65536)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--no-coordinator", action="store_true", help="never run for coordinator")
    p.add_argument("--no-leave", action="store_true", help="on exit, let the lease expire instead of revoking")
    p.set_defaults(func=join)

    p = csub.add_parser("etcd", help="run a local etcd cluster on loopback until interrupted")
    p.add_argument("--members", type=int, default=1)
    p.set_defaults(func=local_etcd)

    p = csub.add_parser("scale", help="simulate placement at 10/100/1000 servers; writes docs/scale.md + plots")
    p.add_argument("--out", default="docs", help="directory for scale.md and scale-*.png")
    p.add_argument("--shards", type=int, default=65536)
    p.add_argument("--quick", action="store_true", help="smaller run (no 1000-server cases)")
    p.set_defaults(func=scale)

    parser.set_defaults(func=lambda a: (parser.print_help(file=sys.stderr), 2)[1])
