"""Pool get and put with CUDA tensors: `rdmapool bench tensors [--transports tcp,shm] [--sizes 1MiB,32MiB]`.

For each transport and block size, one real `rdmapool server` process and, in this process, one PoolClient. Every
round, interleaved, over the same blocks (the median of `--repeat` rounds after a warm-up round):
  host_get        get into slices of a registered pinned host tensor (the pool's own rate, the baseline)
  copy_limit      the same bytes copied from pinned host memory to the GPU (`gpu.copy_(pinned)`)
  cuda_get        get into slices of an unregistered CUDA tensor: read into the client's pinned staging,
                  validated there (checksum included), the hits copied to the GPU (`rdmapool.client.tensors`)
  cuda_reg_get    get into rows of a CUDA tensor registered with the client (shm only: the transport copies
                  straight from the server's mapping to the GPU; payload checksum not verified)
  host_put, cuda_put  put from the pinned host tensor / from the CUDA tensor (staged)
Bandwidths are payload bytes per second per call; `cuda_get_vs_host` = cuda_get / host_get, and
`cuda_get_vs_serial` = cuda_get against doing host_get and then copy_limit one after the other (1.0: the staged
path costs nothing beyond the two steps; above 1: it overlaps them). Needs a CUDA GPU.
JSON on the last line; --record also writes bench/results/tensors-<date>[-label].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import code_version  # noqa: E402

from rdmapool import block  # noqa: E402
from rdmapool.client import PoolClient, PutStatus  # noqa: E402
from rdmapool.config import ClientConfig, parse_size  # noqa: E402
from tests.support import procs  # noqa: E402


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def bench_size(torch, transport: str, size: int, batch_bytes: int, repeat: int, staging: int | None) -> dict:
    n = max(1, batch_bytes // size)
    quota = (n * (repeat + 4) + 1) * (block.block_size(size) + 64) + (1 << 20)
    with procs.running(transport, str(quota), "--size-classes", str(size), "--lease-s", "2", "--grace-s", "0") as srv:
        cfg = ClientConfig(token=procs.TOKENS["a"], data_timeout_s=60.0, request_timeout_s=10.0)
        if staging is not None:
            cfg = dataclasses.replace(cfg, device_staging_bytes=staging)
        with PoolClient([srv.address], cfg, transport_name=transport) as c:
            host = torch.randint(0, 256, (n, size), dtype=torch.uint8).pin_memory()
            c.register(host)
            gpu = torch.empty((n, size), dtype=torch.uint8, device="cuda")
            gpu_reg = torch.empty((n, size), dtype=torch.uint8, device="cuda") if transport == "shm" else None
            if gpu_reg is not None:
                c.register(gpu_reg)
            keys = [_key(i) for i in range(n)]
            if c.put(keys, list(host)) != [PutStatus.STORED] * n:
                raise RuntimeError("could not store the blocks")
            counter = iter(range(10**6, 10**7))
            put_keys: list[bytes] = []
            times: dict[str, list[float]] = {k: [] for k in
                                             ("host_get", "copy_limit", "cuda_get", "cuda_reg_get", "host_put",
                                              "cuda_put")}

            def timed(name: str, fn) -> None:
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)

            def get(into) -> None:
                if c.get(keys, into) != [size] * n:
                    raise RuntimeError(f"get missed: {c.counters.snapshot()}")

            def put(src) -> None:
                if put_keys:
                    c.delete(put_keys)
                put_keys[:] = [_key(next(counter)) for _ in range(n)]
                if c.put(put_keys, src) != [PutStatus.STORED] * n:
                    raise RuntimeError("put did not store every block")

            for i in range(repeat + 1):
                timed("host_get", lambda: get(list(host)))
                timed("copy_limit", lambda: gpu.copy_(host, non_blocking=True))
                timed("cuda_get", lambda: get(list(gpu)))
                if gpu_reg is not None:
                    timed("cuda_reg_get", lambda: get(list(gpu_reg)))
                timed("host_put", lambda: put(list(host)))
                timed("cuda_put", lambda: put(list(gpu)))
                if i == 0:
                    for v in times.values():
                        v.clear()
            gpu.zero_()
            get(list(gpu))
            if not torch.equal(gpu.cpu(), host):
                raise RuntimeError("cuda_get returned wrong bytes")
    med = {k: statistics.median(v) for k, v in times.items() if v}
    payload = n * size
    r: dict = {"blocks": n}
    for k, t in med.items():
        r[f"{k}_GBps"] = round(payload / t / 1e9, 3)
    r["cuda_get_vs_host"] = round(med["host_get"] / med["cuda_get"], 3)
    r["cuda_get_vs_serial"] = round((med["host_get"] + med["copy_limit"]) / med["cuda_get"], 3)
    r["cuda_put_vs_host"] = round(med["host_put"] / med["cuda_put"], 3)
    r["rounds_ms"] = {k: [round(t * 1e3, 2) for t in v] for k, v in times.items() if v}
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rdmapool bench tensors", description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="tcp,shm")
    ap.add_argument("--sizes", default="1MiB,32MiB")
    ap.add_argument("--batch-bytes", default="256MiB", help="payload bytes per get/put call")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--device-staging-bytes", default=None,
                    help="ClientConfig.device_staging_bytes (default: the client's); a call goes in rounds of half")
    ap.add_argument("--record", action="store_true", help="also write bench/results/tensors-<date>[-label].json")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print(json.dumps({"bench": "tensors", "skipped": "needs a CUDA GPU (torch.cuda.is_available() is False)"}))
        return 0
    results = {t: {} for t in args.transports.split(",")}
    for transport in results:
        for size in (parse_size(s) for s in args.sizes.split(",")):
            staging = None if args.device_staging_bytes is None else parse_size(args.device_staging_bytes)
            r = bench_size(torch, transport, size, parse_size(args.batch_bytes), args.repeat, staging)
            results[transport][size] = r
            print(f"{transport} {size:>9}: {json.dumps({k: v for k, v in r.items() if k != 'rounds_ms'})}",
                  flush=True)
    out = {"meta": {"machine": args.label or platform.node(), "gpu": torch.cuda.get_device_name(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device_staging_bytes": args.device_staging_bytes or "default", "python": sys.version.split()[0],
                    "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "argv": argv or sys.argv[1:],
                    "code": code_version()},
           "results": results}
    if args.record:
        name = f"tensors-{dt.date.today():%Y-%m-%d}" + (f"-{args.label}" if args.label else "")
        path = ROOT / "bench" / "results" / f"{name}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"recorded {path}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
