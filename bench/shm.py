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
import subprocess
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


def _gbps(step, bytes_per_step: int, min_time: float) -> float:
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_time:
        step()
        count += 1
    return _rate(count * bytes_per_step, elapsed)


def _plan_step(ep, plan: TransferPlan, op: Opcode, rounds: list[list[tuple[int, int]]]):
    def step() -> None:
        for pairs in rounds:
            done = ep.wait(ep.post_plan(plan, op, pairs, signal_every=64), 30.0)
            if not all(c.ok for c in done):
                raise RuntimeError(f"shm {op.name} failed: {done[0]}")
    return step


def measure(size: int, min_time: float, repeats: int, latency_samples: int) -> dict[str, float]:
    """Best of `repeats` interleaved rounds of memcpy, shm READ and shm WRITE (interleaving keeps a shared
    machine's changing load from favouring whichever ran first), then single-READ latency."""
    n = _slots(size)
    total = n * size
    src, dst = bytearray(os.urandom(1024)) * (total // 1024), bytearray(total)
    s, d = native.address(src)[0], native.address(dst)[0]
    with ShmTransport(cuda="off") as srv, ShmTransport(cuda="off") as cli:
        region = srv.allocate(total)
        region.view[:] = bytes(total)
        local = cli.register(dst)
        plan = TransferPlan.build([local.sge(i * size, size) for i in range(n)],
                                  [(region.remote(i * size), region.rkey) for i in range(n)])
        batch = min(n, 256)
        rounds = [[(i, i) for i in range(start, min(n, start + batch))] for start in range(0, n, batch)]
        with cli.connect(srv.peer_info()) as ep:
            steps = {
                # memcpy of each block in a C loop, no Python per block: the limit
                "memcpy_gbps": lambda: native.copy_blocks(d, s, size, n),
                "shm_read_gbps": _plan_step(ep, plan, Opcode.READ, rounds),
                "shm_write_gbps": _plan_step(ep, plan, Opcode.WRITE, rounds),
            }
            best = dict.fromkeys(steps, 0.0)
            for step in steps.values():
                step()  # warm up: page tables, caches
            for _ in range(repeats):
                for key, step in steps.items():
                    best[key] = max(best[key], _gbps(step, total, min_time))
            lat = []
            for i in range(latency_samples):
                wr = WorkRequest.read(i, local.sge((i % n) * size, size), region.remote((i % n) * size), region.rkey)
                t0 = time.perf_counter()
                ep.execute([wr], 30.0)
                lat.append((time.perf_counter() - t0) * 1e6)
        best["shm_read_p50_us"] = statistics.median(lat)
        best["shm_read_p99_us"] = statistics.quantiles(lat, n=100)[98]
        del local, region
        return best


def _cpu_per_block(step, reps: int, blocks: int) -> float:
    step()
    t0 = time.thread_time()
    for _ in range(reps):
        step()
    return (time.thread_time() - t0) / reps / blocks * 1e6


def _overhead_at(size: int, working_set: int, reps: int) -> tuple[float, float]:
    blocks = working_set // size
    with ShmTransport(cuda="off") as srv, ShmTransport(cuda="off") as cli:
        region = srv.allocate(working_set)
        local = cli.register(bytearray(working_set))
        plan = TransferPlan.build([local.sge(i * size, size) for i in range(blocks)],
                                  [(region.remote(i * size), region.rkey) for i in range(blocks)])
        rounds = [[(i, i) for i in range(st, min(blocks, st + 256))] for st in range(0, blocks, 256)]
        with cli.connect(srv.peer_info()) as ep:
            def plan_step() -> None:
                for pairs in rounds:
                    ep.wait(ep.post_plan(plan, Opcode.READ, pairs, signal_every=64), 30.0)

            memcpy_us = _cpu_per_block(lambda: native.copy_blocks(local.addr, region.addr, size, blocks), reps, blocks)
            plan_us = _cpu_per_block(plan_step, reps, blocks)
    return memcpy_us, plan_us


def overhead(sizes: list[int], reps_bytes: int = 1 << 30) -> dict[str, dict[str, float]]:
    """CPU time (thread time: independent of other jobs' load) per block: the bare C memcpy loop from the
    shared region vs `post_plan` + `wait` over the same blocks, from DRAM (64 MiB working set) for every size,
    and for 4 KiB also in cache (1 MiB), where the per-block cost shows most."""
    cases = [("cache", 4096, 1 << 20)] + [("dram", size, max(WORKING_SET, 2 * size)) for size in sizes]
    out: dict[str, dict[str, float]] = {}
    for where, size, working_set in cases:
        memcpy_us, plan_us = _overhead_at(size, working_set, max(1, reps_bytes // working_set))
        out[f"{where}-{size}"] = {"memcpy_cpu_us": round(memcpy_us, 4), "post_plan_cpu_us": round(plan_us, 4),
                                  "ratio": round(memcpy_us / plan_us, 3)}
    return out


def run(sizes: list[int], min_time: float, repeats: int) -> dict[str, dict[str, float]]:
    result = {}
    for size in sizes:
        row = measure(size, min_time, repeats, latency_samples=300 if size <= 1 << 20 else 40)
        row["shm_read_vs_memcpy"] = row["shm_read_gbps"] / row["memcpy_gbps"]
        row["shm_write_vs_memcpy"] = row["shm_write_gbps"] / row["memcpy_gbps"]
        result[str(size)] = {k: round(v, 3) for k, v in row.items()}
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def _version() -> str:
    import rdmapool

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{getattr(rdmapool, '__version__', '?')} {rev}".strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rdmapool bench shm", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    ap.add_argument("--record", action="store_true", help="also write bench/results/shm-<date>.json")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--overhead", action="store_true", help="also CPU time per block vs memcpy (load-independent)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result: dict = run(sizes, args.min_time, args.repeats)
    if args.overhead:
        result["overhead"] = overhead(sizes)
    if not args.json:
        for size, row in result.items():
            if size == "overhead":
                for case, r in row.items():
                    print(f"CPU per block {case:>14}: memcpy {r['memcpy_cpu_us']:10.3f} us, "
                          f"post_plan {r['post_plan_cpu_us']:10.3f} us, ratio {r['ratio']:.3f}", file=sys.stderr)
                continue
            print(f"{int(size):>10} B  memcpy {row['memcpy_gbps']:6.2f}  read {row['shm_read_gbps']:6.2f} "
                  f"({row['shm_read_vs_memcpy']:.0%})  write {row['shm_write_gbps']:6.2f} "
                  f"({row['shm_write_vs_memcpy']:.0%})  p50 {row['shm_read_p50_us']:.1f} us", file=sys.stderr)
    if args.record:
        meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "cpu": _cpu_model(),
                "platform": platform.platform(), "python": platform.python_version(), "rdmapool": _version(),
                "load_average": os.getloadavg(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        path = Path(__file__).parent / "results" / f"shm-{dt.date.today().isoformat()}.json"
        path.write_text(json.dumps({"meta": meta, "results": result}, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
