"""An engine in its own process (prefill worker, decode worker, or the pool-less reference), driven over a pipe.

The parent sends `{"op": "run", "prompts": [...], "new_tokens": n}` and gets a result dict back, or
`{"op": "exit"}`. A worker ignores SIGINT (the parent owns shutdown) and exits when the pipe closes, so a parent
that dies never leaves it behind. Every receive in the parent is bounded (`WorkerHandle.call`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from rdmapool.errors import ServerUnavailable
from rdmapool.kv.localcluster import PoolSpec, close_client, connect


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # "reference" (no pool), "prefill" or "decode"
    arch: str
    size: str
    seed: int
    model_path: str | None
    device: str
    dtype: str
    chunk_tokens: int
    pool: PoolSpec | None
    tenant: str
    threads: int


def _serve(conn: Any, cfg: WorkerConfig) -> None:
    import torch

    from rdmapool.kv.hf import HFEngine
    from rdmapool.kv.models import ModelSpec, fingerprint, load_model

    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    spec = ModelSpec(cfg.arch, cfg.size, cfg.seed, path=cfg.model_path)
    model = load_model(spec, cfg.device, dtype)
    model_id, revision = fingerprint(spec, cfg.device, dtype)
    pool = connect(cfg.pool) if cfg.pool is not None else None
    try:
        engine = HFEngine(model, model_id, revision, pool, tenant=cfg.tenant, chunk_tokens=cfg.chunk_tokens)
        warm = HFEngine(model, model_id, revision, None, chunk_tokens=cfg.chunk_tokens)
        warm.run_batch([list(range(1, cfg.chunk_tokens + 9))] * 2, 3)  # first-call costs out of the timings
        if pool is not None:
            _warm_pool(pool, engine.chunk_bytes)
        conn.send({"ready": True, "model_id": model_id, "revision": revision, "chunk_bytes": engine.chunk_bytes,
                   "layers": engine.num_layers, "kv_heads": engine.heads, "head_dim": engine.head_dim,
                   "dtype": str(engine.dtype).removeprefix("torch.")})
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg.get("op") == "exit":
                return
            try:
                r = engine.run_batch(msg["prompts"], msg["new_tokens"])
                out = asdict(r)
                out["first_logits"] = r.first_logits.tolist() if msg.get("logits") else None
                if engine.conn is not None:
                    out["pool_errors"] = engine.conn.stats.errors[-3:]
                conn.send(out)
            except Exception:
                conn.send({"error": traceback.format_exc()})
    finally:
        if pool is not None:
            close_client(pool)


def _warm_pool(pool: Any, nbytes: int) -> None:
    """Connect to every server and map their memory once (a put, get and delete of one scratch block per
    server), so that one-time set-up is not counted in the first turn's timings."""
    import os

    keys = [os.urandom(16) for _ in range(8)]  # 8 random keys reach both servers with near certainty
    data = bytearray(nbytes)
    pool.put(keys, [data] * len(keys))
    pool.get(keys, [bytearray(nbytes) for _ in keys])
    pool.delete(keys)


def worker_main(conn: Any, cfg: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(conn, cfg)
    except Exception:
        with contextlib.suppress(Exception):
            conn.send({"error": traceback.format_exc()})


class WorkerHandle:
    def __init__(self, cfg: WorkerConfig) -> None:
        ctx = mp.get_context("spawn")
        self.cfg = cfg
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, cfg), name=f"rdmapool-{cfg.role}", daemon=True)
        self.proc.start()
        child.close()
        self.info: dict = {}

    def _recv(self, timeout: float) -> dict:
        if not self.conn.poll(timeout):
            raise ServerUnavailable(f"{self.cfg.role} worker gave no answer within {timeout:.0f}s")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise ServerUnavailable(f"{self.cfg.role} worker exited (code {self.proc.exitcode})") from None
        if "error" in msg:
            raise RuntimeError(f"{self.cfg.role} worker failed:\n{msg['error']}")
        return msg

    def wait_ready(self, timeout: float) -> dict:
        self.info = self._recv(timeout)
        return self.info

    def call(self, prompts: list[list[int]], new_tokens: int, timeout: float, logits: bool = False) -> dict:
        self.conn.send({"op": "run", "prompts": prompts, "new_tokens": new_tokens, "logits": logits})
        return self._recv(timeout)

    def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(Exception):
            self.conn.send({"op": "exit"})
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
