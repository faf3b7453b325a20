"""A memory server's cluster agent: its membership session plus a coordinator candidacy.

This is the one object a server process needs (`rdmapool server --etcd ...`): it registers the server, keeps
its lease, runs for coordinator (any server can be one), and answers `accepting_writes()` for the write path.
`rdmapool cluster join` runs an agent alone (tests, demos), printing its events as JSON lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rdmapool.cluster.coordinator import Coordinator
from rdmapool.cluster.etcd import Etcd
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.membership import MemberRecord, MemberState
from rdmapool.cluster.session import MembershipSession


@dataclass(frozen=True, slots=True)
class AgentConfig:
    ttl: int = 5
    num_shards: int = 65536
    replicas: int = 2
    coordinator: bool = True  # run for coordinator
    idle_timeout: float = 3.0


class ClusterAgent:
    def __init__(self, etcd: Etcd, keys: ClusterKeys, record: MemberRecord, config: AgentConfig = AgentConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd, self.keys, self.config = etcd, keys, config
        self.session = MembershipSession(etcd, keys, record, config.ttl, clock)
        self.coordinator = (Coordinator(etcd, keys, record.id, config.num_shards, config.replicas, config.ttl,
                                        clock, config.idle_timeout) if config.coordinator else None)

    def start(self, active: bool = True) -> ClusterAgent:
        self.session.start()
        if active:
            self.session.set_state(MemberState.ACTIVE)
        if self.coordinator is not None:
            self.coordinator.start()
        return self

    def accepting_writes(self) -> bool:
        return self.session.accepting_writes()

    def drain(self) -> None:
        """Ask to be placed nowhere; `drained()` turns true once the map no longer lists this server."""
        self.session.set_state(MemberState.DRAINING)

    def drained(self) -> bool:
        from rdmapool.cluster.shardmap import ShardMap

        kv, _ = self.etcd.get(self.keys.shard_map)
        return kv is None or self.session.record.id not in ShardMap.decode(kv.value).servers

    def set_capacity(self, host_bytes: int, gpu_bytes: int = 0) -> None:
        r = self.session.record
        self.session.update(MemberRecord(r.id, r.control, host_bytes, gpu_bytes, r.host, r.rack, r.zone, r.state,
                                         r.endpoints))

    def stop(self, leave: bool = True) -> None:
        if self.coordinator is not None:
            self.coordinator.stop(resign=leave)
        self.session.close(leave=leave)

    def __enter__(self) -> ClusterAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
