"""`rdmapool demo`: the main job. Starts a private local pool (memory servers on loopback), a prefill worker and a
decode worker sharing KV through it, and a reference run without the pool; prints a per-turn table (TTFT
recomputed vs served from the pool, cached tokens, bytes moved, transport GB/s, outputs identical). Exits 1 if the
outputs differ. `--json` prints one JSON object on the last line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rdmapool.errors import UsageError


def _transport(name: str) -> str:
    if name != "auto":
        return name
    import os

    return "shm" if os.path.isdir("/dev/shm") else "tcp"  # everything runs on this host


def build_config(args: argparse.Namespace):
    from rdmapool.kv.demo import DemoConfig

    cfg = DemoConfig.preset(args.device)
    over = {k: v for k, v in {
        "arch": args.arch, "size": args.size, "model_path": args.model, "conversations": args.conversations,
        "turns": args.turns, "system_tokens": args.system_tokens, "new_tokens": args.new_tokens,
        "chunk_tokens": args.chunk_tokens, "servers": args.servers, "replicas": args.replicas, "seed": args.seed, "threads": args.threads,
        "dtype": args.dtype,
    }.items() if v is not None}
    over["transport"] = _transport(args.transport)
    if args.user_tokens:
        lo, _, hi = args.user_tokens.partition("-")
        try:
            over["user_tokens"] = (int(lo), int(hi or lo))
        except ValueError:
            raise UsageError(f"--user-tokens takes MIN-MAX, got {args.user_tokens!r}") from None
    cfg = dataclasses.replace(cfg, **over)
    for name in ("conversations", "turns", "system_tokens", "new_tokens", "chunk_tokens", "servers", "threads",
                 "replicas"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.no_etcd:
        cfg = dataclasses.replace(cfg, etcd=False)
    elif cfg.etcd:
        import shutil

        from rdmapool.cluster.local_etcd import ETCD_BIN

        if shutil.which(ETCD_BIN) is None:
            print(f"rdmapool demo: no {ETCD_BIN!r} binary (scripts/setup.sh installs etcd-server): using a static "
                  "server list", file=sys.stderr)
            cfg = dataclasses.replace(cfg, etcd=False)
    if cfg.transport not in ("tcp", "shm"):
        raise UsageError(f"--transport must be auto, tcp or shm, got {cfg.transport!r}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device here")
    return cfg


def run(args: argparse.Namespace) -> int:
    from rdmapool.kv.demo import render, run_demo

    cfg = build_config(args)
    report = run_demo(cfg, progress=not args.json and sys.stderr.isatty() or args.progress)
    if args.json:
        print(render(report), file=sys.stderr)
        print(json.dumps(report.summary()))
    else:
        print(render(report))
    return 0 if report.outputs_identical else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="prefill and decode workers sharing KV through a local pool (the main job)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: a larger model, longer prompts")
    p.add_argument("--arch", choices=["llama", "qwen2", "mistral", "gpt2"], help="architecture of the random model")
    p.add_argument("--size", help="random model size: micro, tiny (CPU default), small (CUDA default), llama3-8b")
    p.add_argument("--model", metavar="PATH", help="local HF model directory (nothing is downloaded)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--conversations", type=int, help="conversations (requests per batch)")
    p.add_argument("--turns", type=int, help="turns per conversation")
    p.add_argument("--system-tokens", type=int, help="length of the shared system prompt")
    p.add_argument("--user-tokens", metavar="MIN-MAX", help="length range of each user message")
    p.add_argument("--new-tokens", type=int, help="tokens generated per turn")
    p.add_argument("--chunk-tokens", type=int, help="tokens per KV chunk (default 256)")
    p.add_argument("--transport", default="auto", help="auto (shm: all on this host), tcp or shm")
    p.add_argument("--servers", type=int, help="memory servers to start (default 2)")
    p.add_argument("--no-etcd", action="store_true", help="no etcd: clients get the static server list")
    p.add_argument("--replicas", type=int, help="replicas per chunk in the shard map (default 1)")
    p.add_argument("--seed", type=int, help="seed of the model weights and the conversations")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    p.set_defaults(func=run)
