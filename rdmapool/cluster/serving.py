"""Joining a running memory server to a cluster: its membership record, its agent, its write gate.

`join_cluster(server, etcd, keys, ...)` builds the server's `MemberRecord` (id, control address, transport
endpoint info, capacity = the pool it allocated unless overridden, failure-domain labels), starts a
`ClusterAgent` (membership lease + coordinator candidacy) and installs the agent as the server's write gate:
while the server cannot be sure of its membership, `allocate` answers REFUSED for every key, so a server cut off
from etcd stops taking writes about when the cluster writes it off (reads of what it holds still work).
"""

from __future__ import annotations

import json

import msgpack

from rdmapool.cluster.agent import AgentConfig, ClusterAgent
from rdmapool.cluster.etcd import Etcd
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.membership import MemberRecord


def member_record(server, member_id: str | None = None, capacity: int | None = None, host: str = "",
                  rack: str = "", zone: str = "") -> MemberRecord:
    info = server.info
    endpoints = {}
    try:
        msgpack.packb(info.peer_info)
        endpoints = {info.transport: info.peer_info}
    except (TypeError, ValueError):
        endpoints = {info.transport: {}}
    capacity_gpu = gpu = 0
    if server.config.memory == "cuda":
        capacity_gpu, gpu = (capacity if capacity is not None else info.capacity), 1
    return MemberRecord(
        id=member_id or info.server_id, control=server.address, endpoints=endpoints,
        capacity_host=0 if gpu else (capacity if capacity is not None else info.capacity),
        capacity_gpu=capacity_gpu, host=host, rack=rack, zone=zone,
    )


def join_cluster(server, etcd: Etcd, keys: ClusterKeys, record: MemberRecord,
                 config: AgentConfig | None = None) -> ClusterAgent:
    agent = ClusterAgent(etcd, keys, record, config or AgentConfig())
    server.handler.write_gate = agent.accepting_writes
    return agent.start()


def add_arguments(p) -> None:
    """The cluster flags of `rdmapool server` (all optional: without --etcd the server runs alone)."""
    g = p.add_argument_group("cluster (etcd membership and shard map)")
    g.add_argument("--etcd", help="join the cluster in these etcd endpoints (comma separated)")
    g.add_argument("--cluster", default="default", help="cluster name (etcd prefix /rdmapool/NAME/)")
    g.add_argument("--member-id", help="member id (default: the server id)")
    g.add_argument("--capacity", help="capacity to announce (default: the pool allocated), e.g. 64GiB")
    g.add_argument("--host-label", default="", help="failure domain: host (default: the member id)")
    g.add_argument("--rack", default="", help="failure domain: rack")
    g.add_argument("--zone", default="", help="failure domain: zone")
    g.add_argument("--member-ttl", type=int, default=5, help="membership lease TTL, s (>= 2)")
    g.add_argument("--shards", type=int, default=65536, help="shards in the map (when this server coordinates)")
    g.add_argument("--replicas", type=int, default=2, help="replicas per shard (when this server coordinates)")
    g.add_argument("--no-coordinator", action="store_true", help="never run for coordinator")
    p.set_defaults(**CLUSTER_DEFAULTS)


#: the cluster flags' defaults (a flag given with another value means the user expects a cluster)
CLUSTER_DEFAULTS = {"cluster": "default", "member_id": None, "capacity": None, "host_label": "", "rack": "",
                    "zone": "", "member_ttl": 5, "shards": 65536, "replicas": 2, "no_coordinator": False}


def check_args(args) -> None:
    """The cluster flags mean nothing without --etcd: refuse them there rather than start as if they applied;
    with --etcd, check their values before the server allocates its pool."""
    from rdmapool.config import parse_size
    from rdmapool.errors import UsageError

    if not args.etcd:
        given = [f"--{f.replace('_', '-')}" for f, d in CLUSTER_DEFAULTS.items() if getattr(args, f) != d]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise UsageError(f"{', '.join(given)} {verb} --etcd (without it the server runs alone)")
        return
    if args.capacity:
        parse_size(args.capacity)
    from rdmapool.cluster.lease import MIN_TTL

    if args.member_ttl < MIN_TTL:  # checked here too: before the server allocates its pool
        raise UsageError(f"--member-ttl must be >= {MIN_TTL} seconds, got {args.member_ttl}")
    if args.replicas < 1 or args.shards < 1:
        raise UsageError("--replicas and --shards must be >= 1")


def start_from_args(server, args) -> ClusterAgent:
    from rdmapool.cluster.gateway import GatewayEtcd
    from rdmapool.config import parse_size

    etcd = GatewayEtcd(args.etcd, timeout=min(2.0, args.member_ttl / 4))
    record = member_record(server, args.member_id, parse_size(args.capacity) if args.capacity else None,
                           args.host_label, args.rack, args.zone)
    cfg = AgentConfig(ttl=args.member_ttl, num_shards=args.shards, replicas=args.replicas,
                      coordinator=not args.no_coordinator)
    return join_cluster(server, etcd, ClusterKeys(args.cluster), record, cfg)


def drain_step(agent: ClusterAgent) -> bool:
    """One step of `rdmapool server`'s drain (SIGUSR1): mark DRAINING once; True when the map no longer lists
    this server, so the server can leave (revoking its lease removes the record at once)."""
    from rdmapool.cluster.membership import MemberState
    from rdmapool.errors import ServerUnavailable

    try:
        if agent.session.record.state is not MemberState.DRAINING:
            agent.drain()
            print(json.dumps({"cluster_event": "draining"}), flush=True)
        if agent.drained():
            print(json.dumps({"cluster_event": "drained"}), flush=True)
            return True
    except ServerUnavailable:
        pass  # etcd unreachable: try again on the next tick
    return False
