"""A pool client driven over stdin/stdout, run inside a network namespace by test_netns.py.

    python -m tests.cluster.netns_client ETCD_ENDPOINTS CLUSTER TOKEN
Commands (one JSON object per line in, one per line out): {"op": "wait_map", "n": 3}, {"op": "put", "keys":
[hex...]}, {"op": "get", "keys": [...]}, {"op": "map"}, {"op": "members"}, {"op": "put_direct", "address": A,
"keys": [...]}.
"""

from __future__ import annotations

import json
import sys
import time

from rdmapool.client import PoolClient
from rdmapool.cluster.client import ClusterRouter, ReplicatedPoolClient
from rdmapool.cluster.gateway import GatewayEtcd
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.router import ShardRouter
from rdmapool.config import ClientConfig


def main() -> int:
    endpoints, cluster, token = sys.argv[1:4]
    etcd = GatewayEtcd(endpoints, timeout=1.0)
    router = ShardRouter(etcd, ClusterKeys(cluster), idle_timeout=2.0).start(timeout=20)
    cfg = ClientConfig(token=token, staging_bytes=4 << 20, retry_after_s=0.5, connect_timeout_s=1.0,
                       request_timeout_s=1.0, data_timeout_s=2.0)
    client = ReplicatedPoolClient(ClusterRouter(router), cfg)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        t0 = time.monotonic()
        out: dict = {"op": op}
        if op == "wait_map":
            deadline = time.monotonic() + msg.get("timeout", 20)
            while time.monotonic() < deadline:
                m = router.shard_map
                if m is not None and len(m.servers) == msg["n"] and len(router.members()) == msg["n"]:
                    break
                time.sleep(0.02)
        elif op in ("put", "get"):
            keys = [bytes.fromhex(k) for k in msg["keys"]]
            if op == "put":
                out["status"] = [s.value for s in client.put(keys, [k * 64 for k in keys])]
            else:
                bufs = [bytearray(1024) for _ in keys]
                got = client.get(keys, bufs)
                out["hits"] = sum(n is not None for n in got)
                out["correct"] = sum(n == 1024 and bytes(b) == k * 64 for n, b, k in zip(got, bufs, keys,
                                                                                         strict=True))
                out["failovers"] = client.counters.snapshot().get("replica_failovers", 0)
            out["replicas"] = [list(router.shard_map.replicas_for(k)) for k in keys]
        elif op == "put_direct":
            with PoolClient([msg["address"]], cfg) as plain:
                keys = [bytes.fromhex(k) for k in msg["keys"]]
                out["status"] = [s.value for s in plain.put(keys, [k * 64 for k in keys])]
        if op in ("map", "wait_map", "members", "put", "get"):
            m = router.shard_map
            out["map_servers"] = list(m.servers) if m else []
            out["epoch"] = m.epoch if m else 0
            out["members"] = sorted(router.members())
        out["elapsed_s"] = round(time.monotonic() - t0, 3)
        print(json.dumps(out), flush=True)
    client.close()
    router.stop()
    etcd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
