"""Control-plane cost per key: `rdmapool bench control [--keys 1024] [--calls 40] [--record]`.

Over one real `rdmapool server` process (tcp, loopback) and one client connection, times in turn, per call of
`--keys` keys: `allocate` (the round trip), parsing its grants at the client, `commit` (the round trip) and
`delete`; then the server's core alone, in this process (`PoolCore` with the default eviction policy), for
allocate, commit and delete. Each figure is the median over `--calls` calls (the first three not counted),
divided by the keys per call: microseconds per key. These are the per-block costs a put of small blocks pays
on top of its WRITEs (docs/decisions.md, "protocol v3"). JSON on the last line; --record writes
bench/results/control-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import code_version, record  # noqa: E402

from rdmapool import block  # noqa: E402
from rdmapool.client import PoolClient  # noqa: E402
from rdmapool.client.protocol import commit_fields, parse_grants  # noqa: E402
from rdmapool.config import ClientConfig, ServerConfig, TenantConfig  # noqa: E402
from rdmapool.server import wire  # noqa: E402
from rdmapool.server.core import PoolCore  # noqa: E402
from rdmapool.server.slots import stride_for  # noqa: E402
from rdmapool.transport.base import RegionDescriptor  # noqa: E402
from tests.support import procs  # noqa: E402

SIZE = 64 << 10
WARMUP = 3


def _per_key(times: list[float], keys: int) -> float:
    return round(statistics.median(times[WARMUP:]) / keys * 1e6, 3)


def over_the_wire(keys: int, calls: int) -> dict:
    quota = (keys * 2 + 1) * (block.block_size(SIZE) + 64) + (1 << 20)
    times: dict[str, list[float]] = {k: [] for k in ("allocate", "parse_grants", "commit", "delete")}
    with procs.running("tcp", str(quota), "--size-classes", str(SIZE), "--grace-s", "0") as srv, \
            PoolClient([srv.address], ClientConfig(token=procs.TOKENS["a"]), transport_name="tcp") as c:
        conn = c._conn(c.router.servers[0])
        conn.ensure()
        lengths = wire.pack_u64s([SIZE] * keys)
        for n in range(calls):
            ks = [(n * keys + i).to_bytes(16, "big") for i in range(keys)]
            t = time.perf_counter()
            reply = conn.call("allocate", keys=wire.pack_keys(ks), lengths=lengths)
            times["allocate"].append(time.perf_counter() - t)
            t = time.perf_counter()
            grants = parse_grants(reply, keys)
            times["parse_grants"].append(time.perf_counter() - t)
            fields = commit_fields(ks, [g.generation for g in grants])
            t = time.perf_counter()
            conn.call("commit", **fields)
            times["commit"].append(time.perf_counter() - t)
            t = time.perf_counter()
            deleted = c.delete(ks)
            times["delete"].append(time.perf_counter() - t)
            if deleted != [True] * keys:
                raise RuntimeError("a committed key was not there to delete")
    return {name: _per_key(v, keys) for name, v in times.items()}


def in_core(keys: int, calls: int) -> dict:
    stride = stride_for(SIZE)
    cfg = ServerConfig(tenants=(TenantConfig("a", "token-a-secret", 2 * keys * stride),), size_classes=(SIZE,),
                       grace_s=0.0)
    core = PoolCore(cfg, {"a": RegionDescriptor(1 << 30, 2 * keys * stride, 1)})
    times: dict[str, list[float]] = {k: [] for k in ("allocate", "commit", "delete")}
    now = 0.0
    for n in range(calls):
        ks = [(n * keys + i).to_bytes(16, "big") for i in range(keys)]
        t = time.perf_counter()
        grants = core.allocate("a", ks, [SIZE] * keys, now)
        times["allocate"].append(time.perf_counter() - t)
        items = [(k, g.slot.generation) for k, g in zip(ks, grants, strict=True)]
        t = time.perf_counter()
        if core.commit("a", items, now) != [True] * keys:
            raise RuntimeError("the core refused a commit")
        times["commit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        core.delete("a", ks, now)
        times["delete"].append(time.perf_counter() - t)
        now += 1e-3
    return {name: _per_key(v, keys) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rdmapool bench control", description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1024, help="keys per call (at most the server's max_keys, 4096)")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.keys <= 4096 or args.calls <= WARMUP:
        raise SystemExit(f"bench control: --keys 1..4096 and --calls > {WARMUP}")
    wire_us = over_the_wire(args.keys, args.calls)
    core_us = in_core(args.keys, args.calls)
    out = {"bench": "control", "keys_per_call": args.keys, "calls": args.calls, "protocol_version": wire.VERSION,
           "code": code_version(), "us_per_key_tcp": wire_us,
           "us_per_key_tcp_reserve_and_commit": round(wire_us["allocate"] + wire_us["parse_grants"]
                                                      + wire_us["commit"], 3),
           "us_per_key_core": core_us}
    if args.record:
        out["recorded"] = str(record("control", out))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
