"""The main job: a prefill worker and a decode worker share KV through a private local pool.

Theory of operation
-------------------
`run_demo` starts two memory servers (`LocalPool`), then three engine processes from the same seeded model: a
prefill worker and a decode worker, both clients of the pool, and a reference engine without any pool (the
"single-process run without the pool" the outputs are checked against). Seeded conversations share one system
prompt; at every turn each conversation's prompt is its whole history plus a new user message. Per turn:

1. reference: recomputes every prompt from scratch and generates (TTFT "recomputed");
2. prefill worker: looks up each prompt's longest cached prefix, computes the rest, writes the new full chunks;
3. decode worker: looks up, reads the cached chunks with one-sided operations, computes only the tail (less than
   one chunk), generates, and stores its generated tokens' KV chunk by chunk (TTFT "from the pool").

The decode worker's answers must equal the reference's token for token (greedy), or the demo exits non-zero.
TTFTs are per batch: until every request of the turn has its first token. Everything started is stopped in
`finally`, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass, field

from rdmapool.kv.localcluster import TENANT, LocalPool
from rdmapool.kv.worker import WorkerConfig, WorkerHandle


@dataclass(frozen=True)
class DemoConfig:
    device: str = "cpu"
    arch: str = "llama"
    size: str = "tiny"
    model_path: str | None = None
    dtype: str = "float32"
    conversations: int = 4
    turns: int = 3
    system_tokens: int = 1024
    user_tokens: tuple[int, int] = (32, 160)
    new_tokens: int = 16
    chunk_tokens: int = 256
    transport: str = "shm"
    servers: int = 2
    etcd: bool = True
    replicas: int = 1
    seed: int = 0
    #: torch threads per worker; 1 on CPU: the same for every engine (fair), and robust when the cores are shared
    threads: int = 1
    timeout_s: float = 600.0

    @classmethod
    def preset(cls, device: str) -> DemoConfig:
        if device == "cuda":
            # float32, not bf16: the check is token-for-token greedy identity, and a cached prefix computed in
            # other shapes rounds differently; in bf16 that flips near-tied argmaxes of a random-weight model
            # (--dtype bfloat16 is there to try). TF32 stays off (torch's default for matmuls).
            return cls(device="cuda", size="small", dtype="float32", conversations=8, turns=4,
                       system_tokens=8192, user_tokens=(256, 1024), new_tokens=64, threads=4)
        return cls()


@dataclass
class TurnRow:
    turn: int
    requests: int
    prompt_tokens: int
    cached_tokens: int
    ttft_ms_no_cache: float
    ttft_ms_cached: float
    prefill_ms: float
    prefill_cached_tokens: int
    bytes_read: int
    read_s: float
    bytes_written: int
    identical: bool

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else 0.0


@dataclass
class DemoReport:
    config: DemoConfig
    rows: list[TurnRow] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    addresses: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def outputs_identical(self) -> bool:
        return bool(self.rows) and all(r.identical for r in self.rows)

    def summary(self) -> dict:
        rows = self.rows
        prompt = sum(r.prompt_tokens for r in rows)
        cached = sum(r.cached_tokens for r in rows)
        read_b, read_s = sum(r.bytes_read for r in rows), sum(r.read_s for r in rows)
        no_cache = sum(r.ttft_ms_no_cache for r in rows) / max(1, len(rows))
        with_cache = sum(r.ttft_ms_cached for r in rows) / max(1, len(rows))
        c = self.config
        return {
            "outputs_identical": self.outputs_identical,
            "ttft_ms_no_cache": round(no_cache, 2),
            "ttft_ms_cached": round(with_cache, 2),
            "ttft_speedup": round(no_cache / with_cache, 2) if with_cache else None,
            "token_hit_ratio": round(cached / prompt, 4) if prompt else 0.0,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "bytes_read": read_b,
            "read_gbps": round(read_b / read_s / 1e9, 3) if read_s else None,
            "bytes_written": sum(r.bytes_written for r in rows),
            "turns": len(rows),
            "conversations": c.conversations,
            "transport": c.transport,
            "servers": c.servers,
            "etcd": c.etcd,
            "device": c.device,
            "model": self.model,
            "chunk_tokens": c.chunk_tokens,
            "wall_s": round(self.wall_s, 2),
        }


def make_conversations(cfg: DemoConfig, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    """(shared system prompt, messages[turn][conversation]); token ids drawn from a seeded RNG."""
    rng = random.Random(cfg.seed)
    hi = max(2, vocab - 1)
    system = [rng.randrange(1, hi) for _ in range(cfg.system_tokens)]
    lo, up = cfg.user_tokens
    msgs = [[[rng.randrange(1, hi) for _ in range(rng.randint(lo, up))] for _ in range(cfg.conversations)]
            for _ in range(cfg.turns)]
    return system, msgs


def _vocab(cfg: DemoConfig) -> int:
    if cfg.model_path:
        import json
        from pathlib import Path

        return int(json.loads((Path(cfg.model_path) / "config.json").read_text())["vocab_size"])
    from rdmapool.kv.models import SIZES

    return SIZES[cfg.size]["vocab"]


def _worker(cfg: DemoConfig, role: str, pool: LocalPool | None) -> WorkerHandle:
    return WorkerHandle(WorkerConfig(
        role=role, arch=cfg.arch, size=cfg.size, seed=cfg.seed, model_path=cfg.model_path, device=cfg.device,
        dtype=cfg.dtype, chunk_tokens=cfg.chunk_tokens, pool=pool.spec() if pool else None, tenant=TENANT,
        threads=cfg.threads))


def run_demo(cfg: DemoConfig, progress: bool = True) -> DemoReport:
    import torch
    from tqdm import tqdm

    from rdmapool.kv.models import ModelSpec, chunk_bytes

    report = DemoReport(cfg)
    t_start = time.perf_counter()
    workers: list[WorkerHandle] = []
    spec = ModelSpec(cfg.arch, cfg.size, cfg.seed, path=cfg.model_path)
    # one slot class of exactly one chunk: no padding waste, and the quota counts chunks
    slot = chunk_bytes(spec, getattr(torch, cfg.dtype), cfg.chunk_tokens)
    pool = LocalPool(cfg.transport, cfg.servers, quota="4GiB" if cfg.device == "cuda" else "256MiB",
                     size_classes=str(slot), etcd=cfg.etcd, replicas=cfg.replicas)
    bar = tqdm(total=2 + 3 * cfg.turns, desc="demo", unit="step", disable=not progress, file=sys.stderr,
               leave=False)
    try:
        bar.set_postfix_str(f"starting {'etcd and ' if cfg.etcd else ''}{cfg.servers} memory servers "
                            f"({cfg.transport})")
        pool.start()
        report.addresses = list(pool.addresses)
        bar.update(1)
        bar.set_postfix_str("starting prefill, decode and reference workers")
        workers = [_worker(cfg, "reference", None), _worker(cfg, "prefill", pool), _worker(cfg, "decode", pool)]
        infos = [w.wait_ready(cfg.timeout_s) for w in workers]
        if len({(i["model_id"], i["revision"]) for i in infos}) != 1:
            raise RuntimeError("the workers built different models (fingerprints differ)")
        report.model = {k: infos[0][k] for k in ("model_id", "revision", "layers", "kv_heads", "head_dim",
                                                 "dtype", "chunk_bytes")}
        bar.update(1)
        _turns(cfg, workers, report, bar)
    finally:
        bar.close()
        for w in workers:
            with contextlib.suppress(Exception):
                w.close()
        pool.close()
    report.wall_s = time.perf_counter() - t_start
    return report


def _turns(cfg: DemoConfig, workers: list[WorkerHandle], report: DemoReport, bar) -> None:
    reference, prefill, decode = workers
    system, msgs = make_conversations(cfg, _vocab(cfg))
    plain = [list(system) for _ in range(cfg.conversations)]
    pooled = [list(system) for _ in range(cfg.conversations)]
    for turn, turn_msgs in enumerate(msgs, start=1):
        for a, b, m in zip(plain, pooled, turn_msgs, strict=True):
            a += m
            b += m
        bar.set_postfix_str(f"turn {turn}: reference recomputes")
        ref = reference.call(plain, cfg.new_tokens, cfg.timeout_s)
        bar.update(1)
        bar.set_postfix_str(f"turn {turn}: prefill worker writes KV")
        pre = prefill.call(pooled, 0, cfg.timeout_s)
        bar.update(1)
        bar.set_postfix_str(f"turn {turn}: decode worker reads KV and generates")
        dec = decode.call(pooled, cfg.new_tokens, cfg.timeout_s)
        bar.update(1)
        report.rows.append(TurnRow(
            turn=turn, requests=len(pooled), prompt_tokens=sum(dec["prompt_tokens"]),
            cached_tokens=sum(dec["cached_tokens"]), ttft_ms_no_cache=ref["ttft_s"] * 1e3,
            ttft_ms_cached=dec["ttft_s"] * 1e3, prefill_ms=pre["total_s"] * 1e3,
            prefill_cached_tokens=sum(pre["cached_tokens"]), bytes_read=dec["bytes_read"], read_s=dec["read_s"],
            bytes_written=pre["bytes_written"] + dec["bytes_written"], identical=dec["outputs"] == ref["outputs"]))
        for a, b, ro, do in zip(plain, pooled, ref["outputs"], dec["outputs"], strict=True):
            a += ro
            b += do


def render(report: DemoReport) -> str:
    s = report.summary()
    c = report.config
    m = report.model
    head = (f"rdmapool demo: {c.conversations} conversations x {c.turns} turns, shared system prompt of "
            f"{c.system_tokens} tokens, {c.new_tokens} new tokens per turn, greedy\n"
            f"model {m.get('model_id')} ({m.get('layers')} layers, {m.get('kv_heads')} KV heads x "
            f"{m.get('head_dim')}, {m.get('dtype')}) on {c.device}; {c.servers} memory servers over {c.transport} "
            f"({', '.join(report.addresses)}), "
            + (f"joined in a local etcd, routed by its shard map ({c.replicas} replica)" if c.etcd
               else "static server list (no etcd)") + f"; chunks of {c.chunk_tokens} tokens = {m.get('chunk_bytes', 0) / 2**20:.2f} MiB")
    cols = ["turn", "prompt tok", "cached tok", "TTFT recompute", "TTFT from pool", "speedup", "prefill worker",
            "MiB read/written", "transport GB/s", "outputs identical"]
    lines = []
    for r in report.rows:
        lines.append([str(r.turn), str(r.prompt_tokens), f"{r.cached_tokens} ({r.cached_tokens / r.prompt_tokens:.0%})",
                      f"{r.ttft_ms_no_cache:.0f} ms", f"{r.ttft_ms_cached:.0f} ms",
                      f"{r.ttft_ms_no_cache / r.ttft_ms_cached:.1f}x" if r.ttft_ms_cached else "-",
                      f"{r.prefill_ms:.0f} ms ({r.prefill_cached_tokens} hit)",
                      f"{r.bytes_read / 2**20:.1f} / {r.bytes_written / 2**20:.1f}",
                      f"{r.gbps:.2f}", "yes" if r.identical else "NO"])
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    table = [fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in lines)]
    foot = (f"TTFT, mean per turn: {s['ttft_ms_no_cache']:.0f} ms recomputed vs {s['ttft_ms_cached']:.0f} ms served "
            f"from the pool ({s['ttft_speedup']}x); token hit ratio {s['token_hit_ratio']:.0%}; "
            f"outputs identical to the run without the pool: {'yes' if s['outputs_identical'] else 'NO'}\n"
            "TTFT is per batch (all requests of a turn have their first token). 'TTFT from pool' is the decode "
            "worker's: lookup + one-sided reads + the uncached tail (< 1 chunk); the prefill worker ran before it and "
            "is timed in its own column. Transport GB/s: the decode worker's one-sided reads (bytes / time in the "
            "read calls). Timings on a shared machine are noisy.")
    return "\n".join([head, "", *table, "", foot])
