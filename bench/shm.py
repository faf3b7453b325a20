"""shm transport vs plain memcpy: `rdmapool bench shm [--json] [--record] [--sizes 4096,65536,...]`.

For each block size: memcpy between two private buffers (the limit, same native memcpy with the GIL
released), then shm READ and WRITE of the same bytes between a registered private buffer and an allocated
shared region, posted in batches with selective signalling (bandwidth), and single-op READ round trips
(p50/p99 latency, including Python posting and polling). Buffers are pre-faulted; sources and destinations
rotate over working sets of 64 MiB (two blocks at least), so large blocks come from DRAM, not cache. Prints one JSON object on its last
line keyed by block size (as a string).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rdmapool import _shmatomics as native
from rdmapool.transport import Opcode, TransferPlan, WorkRequest
from rdmapool.transport.shm import ShmTransport

DEFAULT_SIZES = (4096, 65536, 1 << 20, 32 << 20)
WORKING_SET = 64 << 20


def _rate(total_bytes: int, seconds: float) -> float:
    return total_bytes / seconds / 1e9


def _slots(size: int) -> int:
    return max(2, WORKING_SET // size)


def bench_memcpy(size: int, min_time: float) -> float:
    """memcpy of each block in a C loop (no Python per block), source and destination rotating over working
    sets: the limit."""
    n = _slots(size)
    src, dst = bytearray(os.urandom(1024)) * (n * size // 1024), bytearray(n * size)
    s, d = native.address(src)[0], native.address(dst)[0]
    native.copy_blocks(d, s, size, n)
    best = 0.0
    for _ in range(3):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < min_time:
            native.copy_blocks(d, s, size, n)
            count += n
        best = max(best, _rate(count * size, elapsed))
    return best


def bench_shm(size: int, min_time: float, latency_samples: int) -> dict[str, float]:
    n = _slots(size)
    with ShmTransport(cuda="off") as srv, ShmTransport(cuda="off") as cli:
        region = srv.allocate(n * size)
        region.view[:] = bytes(len(region.view))
        local = cli.register(bytearray(n * size))
        plan = TransferPlan.build([local.sge(i * size, size) for i in range(n)],
                                  [(region.remote(i * size), region.rkey) for i in range(n)])
        batch = min(n, 256)
        rounds = [[(i, i) for i in range(start, min(n, start + batch))] for start in range(0, n, batch)]
        out: dict[str, float] = {}
        with cli.connect(srv.peer_info()) as ep:
            for name, op in (("read", Opcode.READ), ("write", Opcode.WRITE)):
                best = 0.0
                for _ in range(3):
                    count, t0 = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - t0) < min_time:
                        for pairs in rounds:
                            signalled = ep.post_plan(plan, op, pairs, signal_every=64)
                            done = ep.wait(signalled, 30.0)
                            if not all(c.ok for c in done):
                                raise RuntimeError(f"shm {name} failed: {done[0]}")
                            count += len(pairs)
                    best = max(best, _rate(count * size, elapsed))
                out[f"shm_{name}_gbps"] = best
            lat = []
            for i in range(latency_samples):
                wr = WorkRequest.read(i, local.sge((i % n) * size, size), region.remote((i % n) * size), region.rkey)
                t0 = time.perf_counter()
                ep.execute([wr], 30.0)
                lat.append((time.perf_counter() - t0) * 1e6)
            q = statistics.quantiles(lat, n=100)
            out["shm_read_p50_us"], out["shm_read_p99_us"] = statistics.median(lat), q[98]
        return out


def run(sizes: list[int], min_time: float) -> dict[str, dict[str, float]]:
    result = {}
    for size in sizes:
        row = {"memcpy_gbps": bench_memcpy(size, min_time)}
        row.update(bench_shm(size, min_time, latency_samples=200 if size <= 1 << 20 else 30))
        row["shm_read_vs_memcpy"] = row["shm_read_gbps"] / row["memcpy_gbps"]
        row["shm_write_vs_memcpy"] = row["shm_write_gbps"] / row["memcpy_gbps"]
        result[str(size)] = {k: round(v, 3) for k, v in row.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rdmapool bench shm", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    ap.add_argument("--record", action="store_true", help="also write bench/results/shm-<date>.json")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement (best of 3)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result = run(sizes, args.min_time)
    if not args.json:
        for size, row in result.items():
            print(f"{int(size):>10} B  memcpy {row['memcpy_gbps']:6.2f}  read {row['shm_read_gbps']:6.2f} "
                  f"({row['shm_read_vs_memcpy']:.0%})  write {row['shm_write_gbps']:6.2f} "
                  f"({row['shm_write_vs_memcpy']:.0%})  p50 {row['shm_read_p50_us']:.1f} us", file=sys.stderr)
    if args.record:
        meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                "python": platform.python_version(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        path = Path(__file__).parent / "results" / f"shm-{dt.date.today().isoformat()}.json"
        path.write_text(json.dumps({"meta": meta, "results": result}, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
