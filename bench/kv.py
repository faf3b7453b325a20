"""KV benchmark: time to first token recomputed vs served from a memory server on the same host (shm, tcp), and
the transfer rate into GPU memory against a plain pinned-to-GPU copy of the same bytes, in one run.

    rdmapool bench kv                                  # GPU: Llama-3-8B-shaped bf16 model, prefixes 4k/16k/32k
    rdmapool bench kv --device cpu      # CPU smoke run: micro model, prefixes 64/128, chunks of 16

For each prefix length P, the prompt is P random tokens plus a 16-token tail:
- recompute: a pool-less engine prefills all P + 16 tokens (median of --repeats after a warm-up);
- hit: a prefill engine stores the P tokens' KV chunks in a fresh local server, then a decode engine looks them up,
  reads them (one-sided), scatters them into its cache and computes only the tail (median of --repeats);
- transfer: lookup + read + landing in GPU memory, as a rate, through registered (pinned) staging and, for shm,
  straight from the server's cudaHostRegister'ed mapping by the copy engine (`rdmapool.kv.direct`), against
  `gpu.copy_(pinned)` of the same number of bytes. The hit TTFT uses the direct path on CUDA over shm.
`--load-modes layered,layered-4,serial,legacy` times the shm hit with each way of building the cache (the first
is the headline; see `rdmapool.kv.hf`), `--breakdown` adds per-phase times (keys, lookup, read, scatter, forward)
from extra runs synchronised around each phase.
Goals (issue 6) at 32k: hit >= 10x faster than recompute; shm path >= 90% of the pinned copy rate.
Prints one JSON object on its last line; `--record` writes bench/results/kv-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAIL = 16


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _pinned_rate(nbytes: int, device: str, repeats: int) -> float | None:
    import torch

    if device != "cuda":
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _one_transport(args, model, mid: str, rev: str, transport: str, prompts: dict[int, list[int]],
                   recompute_logits: dict) -> dict:
    import torch

    from rdmapool.kv.hf import HFEngine
    from rdmapool.kv.keys import chunk_keys
    from rdmapool.kv.localcluster import LocalPool, PoolSpec, close_client, connect

    out: dict = {}
    chunk_b = HFEngine(model, mid, rev, None, chunk_tokens=args.chunk_tokens).chunk_bytes
    total = sum(len(p) for p in prompts.values()) // args.chunk_tokens + 4
    quota = max(total * chunk_b * 5 // 4, 64 << 20)
    lp = LocalPool(transport, 1, quota=str(quota), size_classes=str(chunk_b))
    try:
        lp.start(timeout=180)  # the server prefaults its whole pool (GiBs) before it answers
        spec = PoolSpec(tuple(lp.addresses), transport, lp.token, servers=1)
        writer, reader = connect(spec, 64 << 20), connect(spec, 64 << 20)
        try:
            pre = HFEngine(model, mid, rev, writer, tenant="demo", chunk_tokens=args.chunk_tokens)
            dec = HFEngine(model, mid, rev, reader, tenant="demo", chunk_tokens=args.chunk_tokens)
            for n, prompt in prompts.items():
                t0 = time.perf_counter()
                pre.run_batch([prompt], 0)
                store_s = time.perf_counter() - t0
                modes = args.load_modes if transport == "shm" else args.load_modes[:1]
                by_mode: dict[str, float] = {}
                phases: dict[str, dict[str, float]] = {}
                check: dict = {}
                for mode in modes:
                    dec.load_mode, _, group = mode.partition("-")  # "layered-4": 4 layers per copy
                    dec.layers_per_copy = int(group or 1)
                    dec.run_batch([prompt], 1)  # warm-up of this mode (kernels compiled, allocator primed)
                    ttft, reads, cached = [], [], 0
                    for _ in range(args.repeats):
                        r = dec.run_batch([prompt], 1)
                        ttft.append(r.ttft_s)
                        cached = r.cached_tokens[0]
                        reads.append((r.bytes_read, r.read_s))
                    by_mode[mode] = round(statistics.median(ttft) * 1e3, 2)
                    ref = recompute_logits.get(n)
                    if ref is not None:
                        check[mode] = {"same_first_token": bool(r.first_logits.argmax(-1).item() ==
                                                                ref.argmax(-1).item()),
                                       "max_abs_logit_diff": round(float((r.first_logits[0] - ref).abs().max()), 4)}
                    if args.breakdown:  # synchronised phases: a diagnosis, not the headline
                        runs = []
                        for _ in range(args.repeats):
                            dec.breakdown = {}
                            dec.run_batch([prompt], 1)
                            runs.append(dec.breakdown)
                        dec.breakdown = None
                        phases[mode] = {k: round(statistics.median(b.get(k, 0.0) for b in runs) * 1e3, 2)
                                        for k in runs[0]}
                    if mode == modes[0]:
                        head = (ttft, reads, cached)
                dec.load_mode, _, group = modes[0].partition("-")
                dec.layers_per_copy = int(group or 1)
                ttft, reads, cached = head
                # the transfer alone: lookup + read + landing in device memory, through host staging and (shm)
                # straight from the server's mapping (rdmapool.kv.direct), whole chunks, and (shm) layer-major as
                # the layered load copies them
                keys = chunk_keys(dec.ns, prompt)
                rates: dict[str, list[float]] = {}
                for mode in ("off", "on", "layered") if transport == "shm" else ("off",):
                    dec.conn.direct = "off" if mode == "off" else "on"
                    for _ in range(args.repeats):
                        _sync(args.device)
                        t0 = time.perf_counter()
                        got_n = dec.conn.lookup(keys)
                        if mode == "layered":
                            raw = torch.empty((dec.num_layers, got_n, chunk_b // dec.num_layers), dtype=torch.uint8,
                                              device=args.device)
                            refs = dec.conn.direct_refs(keys[:got_n], torch.device(args.device))
                            got = dec.conn.start_direct(refs, raw, dec.num_layers)()
                        else:
                            raw, got = dec.conn.read_blocks(keys[:got_n], torch.device(args.device))
                        _sync(args.device)
                        rates.setdefault(mode, []).append(got * chunk_b / (time.perf_counter() - t0) / 1e9)
                        del raw
                dec.conn.direct = "auto"
                nbytes = reads[-1][0]
                out[n] = {"ttft_ms": round(statistics.median(ttft) * 1e3, 2), "cached_tokens": cached,
                          "bytes_read": nbytes, "store_s": round(store_s, 3),
                          "read_gbps": round(nbytes / statistics.median(r[1] for r in reads) / 1e9, 3)
                          if nbytes else None,
                          "to_device_gbps": round(statistics.median(rates["off"]), 3),
                          "direct_to_device_gbps": round(statistics.median(rates["on"]), 3) if "on" in rates
                          else None,
                          "direct_layered_gbps": round(statistics.median(rates["layered"]), 3)
                          if "layered" in rates else None,
                          "load_mode": modes[0], "ttft_ms_by_mode": by_mode, "first_token_check": check}
                if phases:
                    out[n]["breakdown_ms"] = phases
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        finally:
            close_client(writer)
            close_client(reader)
    finally:
        lp.close()
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from rdmapool.kv.hf import HFEngine
    from rdmapool.kv.models import SIZES, ModelSpec, fingerprint, load_model

    dtype = getattr(torch, args.dtype)
    spec = ModelSpec("llama", args.size, seed=0, max_positions=max(args.prefixes) + 1024)
    t0 = time.perf_counter()
    model = load_model(spec, args.device, dtype)
    load_s = time.perf_counter() - t0
    mid, rev = fingerprint(spec, args.device, dtype)
    vocab = SIZES[args.size]["vocab"]
    gen = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(1, vocab, (n + TAIL,), generator=gen).tolist() for n in args.prefixes}
    base = HFEngine(model, mid, rev, None, chunk_tokens=args.chunk_tokens)
    base.run_batch([prompts[min(prompts)]], 1)  # warm-up
    result: dict = {"recompute": {}, "pinned_copy_gbps": {}}
    recompute_logits: dict[int, torch.Tensor] = {}
    for n, prompt in prompts.items():
        runs = [base.run_batch([prompt], 1) for _ in range(args.repeats)]
        times = [r.ttft_s for r in runs]
        recompute_logits[n] = runs[-1].first_logits[0]
        result["recompute"][n] = {"ttft_ms": round(statistics.median(times) * 1e3, 2)}
        nbytes = n // args.chunk_tokens * base.chunk_bytes
        rate = _pinned_rate(nbytes, args.device, args.repeats)
        result["pinned_copy_gbps"][n] = round(rate, 3) if rate else None
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for transport in args.transports:
        try:
            result[transport] = _one_transport(args, model, mid, rev, transport, prompts, recompute_logits)
        except Exception as exc:  # a transport that cannot run here is reported, the others still run
            result[transport] = {"error": f"{type(exc).__name__}: {exc}"}
    summary = {}
    for n in args.prefixes:
        row = {"recompute_ms": result["recompute"][n]["ttft_ms"], "pinned_gbps": result["pinned_copy_gbps"][n]}
        for t in args.transports:
            hit = result[t].get(n) if isinstance(result[t], dict) else None
            if hit:
                row[f"{t}_hit_ms"] = hit["ttft_ms"]
                row[f"{t}_speedup"] = round(row["recompute_ms"] / hit["ttft_ms"], 2)
                best = max(hit["to_device_gbps"], hit.get("direct_to_device_gbps") or 0.0)
                row[f"{t}_staged_gbps"] = hit["to_device_gbps"]
                if hit.get("direct_to_device_gbps") is not None:
                    row[f"{t}_direct_gbps"] = hit["direct_to_device_gbps"]
                row[f"{t}_to_device_gbps"] = best
                if hit.get("direct_layered_gbps") is not None:
                    row[f"{t}_direct_layered_gbps"] = hit["direct_layered_gbps"]
                if len(hit.get("ttft_ms_by_mode", {})) > 1:
                    row[f"{t}_ttft_ms_by_mode"] = hit["ttft_ms_by_mode"]
                if hit.get("breakdown_ms"):
                    row[f"{t}_breakdown_ms"] = hit["breakdown_ms"]
                if row["pinned_gbps"]:
                    row[f"{t}_vs_pinned"] = round(best / row["pinned_gbps"], 3)
        summary[str(n)] = row
    return {"bench": "kv", "model": f"random-llama-{args.size}", "dtype": args.dtype, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
            "chunk_tokens": args.chunk_tokens, "load_s": round(load_s, 1), "summary": summary, "detail": result}


def _table(res: dict) -> str:
    lines = [f"kv bench on {res['device_name']} ({res['model']}, {res['dtype']}, chunks of {res['chunk_tokens']})"]
    for n, row in res["summary"].items():
        parts = [f"prefix {n:>6}: recompute {row['recompute_ms']:.1f} ms"]
        for key, val in row.items():
            if key.endswith("_hit_ms"):
                t = key.removesuffix("_hit_ms")
                parts.append(f"{t} hit {val:.1f} ms ({row[f'{t}_speedup']}x), {row[f'{t}_to_device_gbps']} GB/s"
                             + (f" = {row[f'{t}_vs_pinned']:.0%} of pinned" if f"{t}_vs_pinned" in row else ""))
        if row["pinned_gbps"]:
            parts.append(f"pinned copy {row['pinned_gbps']} GB/s")
        lines.append("; ".join(parts))
        for key, val in row.items():
            if key.endswith("_ttft_ms_by_mode"):
                lines.append(f"    {key.split('_')[0]} hit TTFT by load mode (ms): {val}")
            if key.endswith("_breakdown_ms"):
                for mode, ph in val.items():
                    lines.append(f"    {key.split('_')[0]} {mode} breakdown (ms, synchronised): {ph}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdmapool bench kv", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default=None, help="model size (default: llama3-8b on cuda, micro on cpu)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prefixes", default=None, help="comma-separated prefix lengths (default 4096,16384,32768)")
    p.add_argument("--transports", default="shm,tcp")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: 256 on cuda, 16 on cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load-modes", default="layered",
                   help="comma-separated HFEngine load modes for the shm hit (layered, layered-G with G layers per "
                        "copy, serial, legacy); the first gives the headline TTFT, the others are reported beside it")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the hit's phases (keys, lookup, read, scatter, forward) with a synchronisation "
                        "around each (extra runs: the headline TTFT is measured without them)")
    p.add_argument("--record", action="store_true", help="write bench/results/kv-<date>.json")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size or ("micro" if cpu else "llama3-8b")
    args.chunk_tokens = args.chunk_tokens or (16 if cpu else 256)
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.prefixes = [int(x) for x in (args.prefixes or ("64,128" if cpu else "4096,16384,32768")).split(",")]
    args.transports = [t for t in args.transports.split(",") if t]
    args.load_modes = [m for m in args.load_modes.split(",") if m]
    if cpu is False:
        import torch

        if not torch.cuda.is_available():
            print("rdmapool bench kv: no CUDA device; use --device cpu for a smoke run", file=sys.stderr)
            return 2
    res = run(args)
    import torch

    res["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    res["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    res["machine"] = platform.node()
    print(_table(res), file=sys.stderr)
    if args.record:
        out = ROOT / "bench" / "results" / f"kv-{res['date'][:10]}.json"
        out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
