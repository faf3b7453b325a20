"""Pool client vs the raw transport: `rdmapool bench pool [--transports tcp,shm] [--sizes 64KiB,...] [--record]`.

For each transport and block size, one real `rdmapool server` process (a size class of exactly that size), and
in this process one PoolClient. In the same run and over the same endpoint:
  raw_write / raw_read  one-sided WRITE / READ of whole blocks between registered buffers and reserved slots
  put                   PoolClient.put: allocate + WRITE (header, payload, trailer) + commit
  get                   PoolClient.get: lookup (lease) + READ + validation (checksum on, and off as for GPUs)
Bandwidths are payload bytes per second over a batch of ~`--batch-bytes` per call: the median of `--repeat`
interleaved rounds (raw, put, raw, get, get without checksum) after one uncounted warm-up round, so both sides
see the same background load.
`overhead_*` = 1 - protocol / raw (wall clock, medians of each); `paired_overhead_*` the median over rounds of
1 - raw / protocol within each round (robust to a host whose bandwidth drifts between states); `rounds_ms` keeps
every run's time in order. `cpu_overhead_*` = protocol / raw - 1 in this process's CPU
time (median per call), which other load on a shared machine disturbs far less. Then the p50/p99 of
lookup_prefix over 512 keys (p50/p99/p99.9/max, with the p50 of client CPU per lookup), after `LOOKUP_WARMUP`
uncounted ones (the first one's time is kept as `first_ms`; `slow` lists when the sampled lookups over
3x the median started). Before sampling, the lookup bench does
`gc.collect(); gc.freeze()` in this process, as a latency-sensitive client application should after its set-up
(the server does the same after building its pool): otherwise a full collection of this process's heap
(7-18 ms here, more in an application holding a model) lands in about 1 lookup in 130 and sets
the p99 (`--no-gc-freeze` measures that; see docs/decisions.md).
`--client-cpus` / `--server-cpus` (e.g. 4-11 / 0-3) pin this process and every server process to disjoint CPU
sets, so one many-core host stands in for a client host and a server host: each side gets its own cores, as
over a network, while the raw baseline runs under the same pinning. `--python-hash-workers` hashes on Python
threads instead of the native pool (`rdmapool._hashpool`), to compare the two on the same host.
JSON on the last line; --record also writes bench/results/pool-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rdmapool import block  # noqa: E402
from rdmapool.client import PoolClient, PutStatus  # noqa: E402
from rdmapool.client.protocol import commit_fields, parse_grants  # noqa: E402
from rdmapool.config import ClientConfig, default_hash_threads, parse_size  # noqa: E402
from rdmapool.server.wire import pack_u64s  # noqa: E402
from rdmapool.transport.base import Opcode, WorkRequest  # noqa: E402
from tests.support import procs  # noqa: E402

DEFAULT_SIZES = "64KiB,256KiB,1MiB,4MiB,32MiB"


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def parse_cpus(text: str) -> set[int]:
    """`0-3,8` -> {0, 1, 2, 3, 8}."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        try:
            cpus.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SystemExit(f"bench pool: bad CPU list {text!r} (want e.g. 0-3,8)") from None
    return cpus


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus`; threads it starts later inherit the set."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def bench_size(transport: str, size: int, batch_bytes: int, repeat: int, hash_threads: int,
               server_cpus: set[int] | None = None, transport_digests: bool = True,
               native_hash_workers: bool = True) -> dict:
    n = max(1, batch_bytes // size)
    # room for the raw slots plus every round's blocks: deleted blocks stay leased by the round's gets
    quota = (n * (repeat + 3) + 1) * (block.block_size(size) + 64) + (1 << 20)
    with procs.running(transport, str(quota), "--size-classes", str(size), "--lease-s", "2", "--grace-s", "0") as srv:
        if server_cpus:
            pin_process(srv.pid, server_cpus)
        cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=1 << 20, data_timeout_s=60.0,
                           request_timeout_s=10.0, hash_threads=hash_threads, transport_digests=transport_digests)
        with PoolClient([srv.address], cfg, transport_name=transport) as c:
            c.hasher.native = c.hasher.native and native_hash_workers
            src = c.transport.allocate(n * size)
            dst = c.transport.allocate(n * size)
            src.view[:] = os.urandom(size) * n
            c.registry.regions.extend([src, dst])
            srcs = [src.view[i * size : (i + 1) * size] for i in range(n)]
            dsts = [dst.view[i * size : (i + 1) * size] for i in range(n)]
            # raw: reserve n slots once (never committed) and move whole blocks to / from them
            conn = c._conn(c.router.servers[0])
            conn.ensure()
            raw_keys = [_key(10**9 + i) for i in range(n)]
            grants = parse_grants(conn.call("allocate", keys=b"".join(raw_keys), lengths=pack_u64s([size] * n)),
                                  n)
            wire = block.block_size(size)
            stage = c.transport.allocate(n * wire)
            writes = [WorkRequest(i, Opcode.WRITE, (stage.sge(i * wire, wire),), g.addr, g.rkey)
                      for i, g in enumerate(grants)]
            reads = [WorkRequest(i, Opcode.READ, (stage.sge(i * wire, wire),), g.addr, g.rkey)
                     for i, g in enumerate(grants)]
            ep = conn.endpoint
            _warm_every_slot(conn, ep, stage, size, wire)
            counter = iter(range(10**6))
            keys: list[bytes] = []
            verify_cfg = cfg
            no_verify_cfg = ClientConfig(**{**_fields(cfg), "verify_checksum": False})

            def put() -> None:
                if keys:
                    c.delete(keys)
                keys[:] = [_key(next(counter)) for _ in range(n)]
                c.config = verify_cfg
                t, u = time.perf_counter(), time.process_time()
                ok = c.put(keys, srcs)
                times["put"].append(time.perf_counter() - t)
                cpu["put"].append(time.process_time() - u)
                if ok != [PutStatus.STORED] * n:
                    raise RuntimeError(f"put did not store every block: {ok}")

            def get(name: str, config: ClientConfig) -> None:
                c.config = config
                t, u = time.perf_counter(), time.process_time()
                got = c.get(keys, dsts)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - u)
                if got != [size] * n:
                    raise RuntimeError(f"get missed: {got} {c.counters.snapshot()}")

            def raw(name: str, wrs: list) -> None:
                t, u = time.perf_counter(), time.process_time()
                ep.execute(wrs, 60.0)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - u)

            # interleaved rounds: raw and protocol runs see the same background load
            times: dict[str, list[float]] = {k: [] for k in ("raw_write", "put", "raw_read", "get", "get_nock")}
            cpu: dict[str, list[float]] = {k: [] for k in times}  # this process's CPU time (all its threads)
            for i in range(repeat + 1):
                raw("raw_write", writes)
                put()
                raw("raw_read", reads)
                get("get", verify_cfg)
                get("get_nock", no_verify_cfg)
                if i == 0:  # a warm-up round, not counted (its raw WRITE ran 2-3x slower here: first use)
                    for v in (*times.values(), *cpu.values()):
                        v.clear()
            if bytes(dst.view[:size]) != bytes(src.view[:size]):
                raise RuntimeError("get returned wrong bytes")
            raw_write, put_t, raw_read, get_t, get_nock_t = (statistics.median(times[k]) for k in times)
            cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
            c.transport.deregister(stage)
    payload = n * size
    gbps = lambda t: round(payload / t / 1e9, 3)  # noqa: E731
    r = {"blocks": n, "raw_write_GBps": gbps(raw_write), "put_GBps": gbps(put_t), "raw_read_GBps": gbps(raw_read),
         "get_GBps": gbps(get_t), "get_nochecksum_GBps": gbps(get_nock_t)}
    r["overhead_put"] = round(1 - r["put_GBps"] / r["raw_write_GBps"], 3)
    r["overhead_get"] = round(1 - r["get_GBps"] / r["raw_read_GBps"], 3)
    r["overhead_get_nochecksum"] = round(1 - r["get_nochecksum_GBps"] / r["raw_read_GBps"], 3)
    # paired: each protocol run against the raw run just before it in the same round. A host that flips
    # between bandwidth states for seconds at a time (the H100 host's memory copies ran at ~6.2 or ~7.8 GB/s,
    # round by round) moves a median of each side by itself to whichever state most rounds saw; a pair
    # shares one state as a rule
    pairs = {"put": "raw_write", "get": "raw_read", "get_nock": "raw_read"}
    for name, base in pairs.items():
        key = "paired_overhead_" + {"get_nock": "get_nochecksum"}.get(name, name)
        r[key] = round(statistics.median(1 - b / t for b, t in zip(times[base], times[name], strict=True)), 3)
    r["rounds_ms"] = {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()}  # in order, for re-analysis
    # the same comparison in client CPU time per byte (robust to other load on a shared machine; the server's
    # CPU, which serves the control protocol only, and for tcp the serving engine's, are not in it)
    r["cpu_overhead_put"] = round(cpu_med["put"] / cpu_med["raw_write"] - 1, 3)
    r["cpu_overhead_get"] = round(cpu_med["get"] / cpu_med["raw_read"] - 1, 3)
    r["cpu_overhead_get_nochecksum"] = round(cpu_med["get_nock"] / cpu_med["raw_read"] - 1, 3)
    return r


def _warm_every_slot(conn, ep, stage, size: int, wire: int) -> None:
    """Reserve every other slot once, WRITE it, abort it: afterwards no measured run pays first-touch page
    faults in this client's mapping of the server's memory (shm maps it; see docs/decisions.md), just as the
    raw baseline, which reuses its warm slots, does not."""
    warm_keys = [_key(2 * 10**9 + i) for i in range(4096)]
    grants = [g for g in parse_grants(conn.call("allocate", keys=b"".join(warm_keys),
                                                lengths=pack_u64s([size] * 4096)), 4096)
              if g.status == 0]
    for i in range(0, len(grants), 8):
        part = grants[i : i + 8]
        ep.execute([WorkRequest(j, Opcode.WRITE, (stage.sge(0, wire),), g.addr, g.rkey) for j, g in enumerate(part)],
                   60.0)
    conn.call("abort", **commit_fields(warm_keys[: len(grants)], [g.generation for g in grants]))


def _fields(cfg: ClientConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _pct(sorted_times: list[float], q: float) -> float:
    return round(sorted_times[min(len(sorted_times) - 1, int(len(sorted_times) * q))] * 1e3, 3)


#: lookups run before the sampled ones (the first one's time is reported as `first_ms`)
LOOKUP_WARMUP = 200
#: sampled lookups slower than this many times the median are listed with when they started (the first
#: `SLOW_KEPT`), so a p99 over the goal shows whether its stalls came in one burst or spread out
SLOW_LOOKUP = 3
SLOW_KEPT = 40


def bench_lookup(transport: str, nkeys: int, samples: int, freeze: bool = True,
                 server_cpus: set[int] | None = None) -> dict:
    with procs.running(transport, "64MiB", "--size-classes", "4KiB") as srv:
        if server_cpus:
            pin_process(srv.pid, server_cpus)
        cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=4 << 20)
        with PoolClient([srv.address], cfg, transport_name=transport) as c:
            keys = [_key(i) for i in range(nkeys)]
            if c.put(keys, [b"k" * 1024] * nkeys) != [PutStatus.STORED] * nkeys:
                raise RuntimeError("could not store the lookup keys")
            times, cpu = [], []
            # uncounted: a fresh server's and client's first lookups (code and allocator warm-up, and the
            # previous bench's server still giving its memory back) took 2-3 ms on this VM
            warmup = min(LOOKUP_WARMUP, samples)
            t = time.perf_counter()
            c.lookup_prefix(keys)
            first = time.perf_counter() - t
            for _ in range(warmup - 1):
                c.lookup_prefix(keys)
            if freeze:
                gc.collect()
                gc.freeze()
            starts = []
            try:
                for _ in range(samples):
                    u = time.process_time()
                    t = time.perf_counter()
                    found = c.lookup_prefix(keys)
                    e = time.perf_counter()
                    cpu.append(time.process_time() - u)
                    times.append(e - t)
                    starts.append(t)
                    if len(found) != nkeys:
                        raise RuntimeError(f"lookup found {len(found)} of {nkeys}")
            finally:
                if freeze:
                    gc.unfreeze()
    p50 = statistics.median(times)
    # when the tail happened: clustered at the start (set-up or a neighbour's teardown) or spread out
    slow = [[round((t - starts[0]) * 1e3, 1), round(x * 1e3, 2)] for t, x in zip(starts, times, strict=True)
            if x > SLOW_LOOKUP * p50]
    times.sort()
    return {"keys": nkeys, "samples": samples, "warmup": warmup, "first_ms": round(first * 1e3, 3),
            "gc_freeze": freeze, "p50_ms": _pct(times, 0.50),
            "p99_ms": _pct(times, 0.99), "p999_ms": _pct(times, 0.999), "max_ms": round(times[-1] * 1e3, 3),
            "client_cpu_p50_ms": round(statistics.median(cpu) * 1e3, 3),
            "slow": {"over_p50_x": SLOW_LOOKUP, "count": len(slow), "at_ms_and_ms": slow[:SLOW_KEPT]}}


def _xxh3_kernel() -> str:
    """The instruction set the native checksums run on (native/xxhash/kernels.h)."""
    try:
        from rdmapool import _hashpool
    except ImportError:
        return "none (native modules not built)"
    return _hashpool.KERNEL


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _shared_cpus(client_cpus: set[int], server_cpus: set[int]) -> str:
    """Why a tcp miss on this machine may say more about the machine than about the protocol ('' if not)."""
    if len(client_cpus or os.sched_getaffinity(0)) > 2:
        return ""
    return ("the client runs on at most two CPUs: the checksum's pass over each payload competes with the copies of "
            "both engines, which tcp's raw baseline does not pay (with both sides on two CPUs the floor for tcp put is "
            "near 12.5%: docs/decisions.md, 'what bounds tcp on two cores'). For a client host and a server host, run "
            "scripts/pool-bench-split.sh on a machine with 12 or more cores.")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `low`, else an error naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rdmapool bench pool", description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="tcp,shm")
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--batch-bytes", default="64MiB", help="payload bytes per put/get call")
    ap.add_argument("--repeat", type=_at_least(1), default=7)
    ap.add_argument("--lookup-samples", type=_at_least(0), default=2000, help="0: no lookup bench")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="sample lookups without gc.freeze() in this process (the tail a full GC adds)")
    ap.add_argument("--hash-threads", type=_at_least(0), default=None,
                    help="client checksum workers (0: inline; default: the client's, 2, or 4 on 8 or more CPUs)")
    ap.add_argument("--python-hash-workers", action="store_true",
                    help="hash on Python threads (futures) instead of the native pool (to compare the two)")
    ap.add_argument("--no-transport-digests", action="store_true",
                    help="the client hashes every payload on its hash workers (ClientConfig.transport_digests)")
    ap.add_argument("--client-cpus", default="", help="pin this process to these CPUs (e.g. 4-11)")
    ap.add_argument("--server-cpus", default="", help="pin the server processes to these CPUs (e.g. 0-3)")
    ap.add_argument("--record", action="store_true", help="also write bench/results/pool-<date>[-label].json")
    ap.add_argument("--label", default="", help="names the recorded file and the run (e.g. the machine)")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    client_cpus, server_cpus = parse_cpus(args.client_cpus), parse_cpus(args.server_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)  # before any transport starts a thread: they all inherit it
    if args.hash_threads is None:
        args.hash_threads = default_hash_threads()  # after pinning: what a client on these CPUs gets
    result: dict = {"bench": "pool", "hash_threads": args.hash_threads,
                    "hash_workers": "python" if args.python_hash_workers else "native",
                    "xxh3_kernel": _xxh3_kernel(), "transport_digests": not args.no_transport_digests,
                    "client_cpus": sorted(client_cpus), "server_cpus": sorted(server_cpus), "transports": {}}
    for transport in args.transports.split(","):
        per = {}
        for size in sizes:
            per[str(size)] = bench_size(transport, size, parse_size(args.batch_bytes), args.repeat,
                                       args.hash_threads, server_cpus, not args.no_transport_digests,
                                       not args.python_hash_workers)
            print(f"{transport} {size:>9}: {json.dumps(per[str(size)])}", file=sys.stderr, flush=True)
        lookup = None
        if args.lookup_samples:
            lookup = bench_lookup(transport, 512, args.lookup_samples, not args.no_gc_freeze, server_cpus)
            print(f"{transport} lookup 512: {json.dumps(lookup)}", file=sys.stderr, flush=True)
        big = [v for k, v in per.items() if int(k) >= 1 << 20]
        result["transports"][transport] = {
            "sizes": per, "lookup_512": lookup,
            "goal_overhead_le_10pct_ge_1MiB": all(max(v["overhead_put"], v["overhead_get"]) <= 0.10 for v in big),
            "goal_paired_overhead_le_10pct_ge_1MiB": all(
                max(v["paired_overhead_put"], v["paired_overhead_get"]) <= 0.10 for v in big),
            "goal_lookup_p99_le_1ms": None if lookup is None else lookup["p99_ms"] <= 1.0,
        }
    shared = _shared_cpus(client_cpus, server_cpus)
    if shared:
        result["note"] = shared
        print(f"note: {shared}", file=sys.stderr, flush=True)
    if args.record:
        meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
                "platform": platform.platform(),
                "python": platform.python_version(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "argv": argv or sys.argv[1:], "label": args.label}
        suffix = f"-{args.label}" if args.label else ""
        path = ROOT / "bench" / "results" / f"pool-{dt.date.today().isoformat()}{suffix}.json"
        path.write_text(json.dumps({"meta": meta, "results": result}, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
