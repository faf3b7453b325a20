"""A memory-pool client round over verbs: put blocks of several sizes into running memory servers, read them
back one-sided, check every byte, delete half, check they miss; every server's connection holds two or more
queue pairs and each of them carried requests. Prints one JSON line; exit 0 only if all held.
Used by the two-VM test (tests/vm: server and client in different VMs joined by a virtual wire) and by the
Docker `pool` role.

    python3 scripts/vm/pool_check.py --servers 10.9.0.1:7400[,...] [--token T] [--wait 120]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rdmapool.client import PoolClient, PutStatus  # noqa: E402
from rdmapool.config import ClientConfig, parse_hostport  # noqa: E402

SIZES = (100, 64 << 10, 300 << 10, 1 << 20, 3 << 20)


def wait_for(addresses: list[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for addr in addresses:
        host, port = parse_hostport(addr)
        while True:
            try:
                socket.create_connection((host, port), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"memory server {addr} not reachable within {seconds:.0f}s") from None
                time.sleep(0.5)


def payload(i: int, size: int) -> bytes:
    seed = hashlib.blake2b(i.to_bytes(4, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", required=True, help="comma-separated HOST:PORT")
    parser.add_argument("--token", default=os.environ.get("RDMAPOOL_TOKEN", "vm-test-token"))
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the servers to listen")
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    wait_for(servers, args.wait)
    scale = max(1.0, float(os.environ.get("RDMAPOOL_TIMEOUT_SCALE", "1")))
    cfg = ClientConfig(token=args.token, staging_bytes=16 << 20, connect_timeout_s=10 * scale,
                       request_timeout_s=10 * scale, data_timeout_s=30 * scale)
    keys = [i.to_bytes(16, "big") for i in range(args.blocks)]
    blocks = [payload(i, SIZES[i % len(SIZES)]) for i in range(args.blocks)]
    t0 = time.monotonic()
    with PoolClient(servers, cfg, transport_name="verbs") as client:
        put = client.put(keys, blocks)
        bufs = [bytearray(len(b)) for b in blocks]
        got = client.get(keys, bufs)
        exact = [g == len(b) and bytes(buf) == b for g, buf, b in zip(got, bufs, blocks, strict=True)]
        deleted = client.delete(keys[::2])
        again = client.get(keys, [bytearray(len(b)) for b in blocks])
        transport = client.transport
        # requests posted on each data endpoint (verbs: queue pair) of each server's connection
        per_qp = [[getattr(ep, "_seq", None) for ep in client._conn(addr).endpoints]
                  for addr in client.router.servers]
        report = {
            "transport": transport.name,
            "device": getattr(getattr(transport, "device", None), "name", None),
            "stored": sum(p == PutStatus.STORED for p in put),
            "read_exact": sum(exact),
            "bytes": sum(len(b) for b in blocks),
            "deleted": sum(bool(d) for d in deleted),
            "miss_after_delete": sum(again[i] is None for i in range(0, args.blocks, 2)),
            "kept_after_delete": sum(again[i] == len(blocks[i]) for i in range(1, args.blocks, 2)),
            "wrs_per_qp": per_qp,
            "seconds": round(time.monotonic() - t0, 2),
        }
    half = len(keys[::2])
    report["ok"] = (report["transport"] == "verbs" and report["stored"] == args.blocks
                    and report["read_exact"] == args.blocks and report["miss_after_delete"] == half
                    and report["kept_after_delete"] == args.blocks - half
                    and all(len(qps) >= 2 and all(n for n in qps) for qps in per_qp))
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
