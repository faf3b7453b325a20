"""HF transformers engine that shares KV through the pool: prefill workers write chunks, decode workers read them.

Theory of operation
-------------------
`HFEngine.run_batch(prompts, max_new_tokens)` serves a batch of requests greedily:

1. Keys: `chunk_keys` of each prompt (namespace: model fingerprint, layout "hf", dtype, TP 0/1, tenant).
   One `lookup_prefix` per request finds the longest cached prefix. Every full chunk found is read (up to
   len // C); at least one prompt token is always computed (its logits give the first token), so when the pool
   holds the whole prompt the cache shows len - 1 tokens and the forward pass computes only the last one (the KV
   of the positions before it does not depend on it).
2. Prefill, request by request: the cached chunks become a cache over preallocated buffers of len positions
   (`rdmapool.kv.hfcache`: no `torch.cat` when the cache is built nor when the forward pass appends), by
   `load_mode`:
   - "layered" (default; applies to a server on this host over shm, on CUDA): the copy engine pulls the payloads
     straight from the server's mapped memory, layer-major (`rdmapool.kv.direct.start_direct`, side stream);
     each group of layers is scattered (`kernels.LayerScatter`, second stream) as soon as it landed, and the
     forward pass starts at once, each layer waiting for its own event. Trailers and leases are checked after the
     forward pass is queued; if any block failed, the forward pass is redone from the intact prefix.
   - "serial": read everything (direct, or through registered host staging), then scatter, then the forward.
   - "legacy": as serial, then transformers' concatenating `DynamicCache` (the path of the first GPU run).
   The model then runs only the rest of the prompt. One at a time, so no query row is ever pure padding, and a
   prefill engine (`max_new_tokens == 0`) stores each request's new chunks before the next request looks up: a
   system prompt shared by the batch is computed once.
   The first token of every request is known here: that is the TTFT the engine reports (for the whole batch).
   With `engine.breakdown = {}`, run_batch synchronizes around each phase and records its seconds (diagnosis).
3. A decode engine then stores the prompt chunks the pool lacked (normally none: the prefill worker wrote them).
4. Decode, batched: the requests' caches are right-aligned in one left-padded cache (padding masked out) and
   every step runs one token per request. Whenever a request's KV covers another full chunk (generated tokens
   included), that chunk is gathered and put at once, so the next turn of the conversation hits on all of it.

A pool error is a miss (see `rdmapool.kv.pool`): the engine recomputes what it could not read. A prefill worker
is `run_batch(prompts, 0)`; a decode worker, `run_batch(prompts, n)`; without a pool the engine is the baseline.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from rdmapool.errors import UsageError
from rdmapool.kv import kernels
from rdmapool.kv.hfcache import prealloc_cache, wait_all
from rdmapool.kv.keys import ChunkKey, Namespace, chunk_keys
from rdmapool.kv.layouts import Layout, paged_kv
from rdmapool.kv.pool import KVPool, PoolConnector

#: how pool chunks become a cache: "layered" (direct reads pipelined per layer with the scatter and the forward pass,
#: where the shm direct path applies; else as "serial"), "serial" (read all, scatter into preallocated buffers),
#: "legacy" (read all, scatter, then DynamicCache's concatenations: the first GPU measurement's path)
LOAD_MODES = ("layered", "serial", "legacy")


@dataclass(frozen=True)
class _Loaded:
    cache: Any
    cached: int  # tokens the cache shows
    finish: Any  # None, or finish() -> leading chunks intact (a pipelined read still in flight)
    bufs: Any


@dataclass(frozen=True)
class BatchResult:
    outputs: list[list[int]]
    first_logits: torch.Tensor  # [batch, vocab] float32 on CPU
    ttft_s: float  # until every request of the batch has its first token
    total_s: float
    prompt_tokens: list[int]
    cached_tokens: list[int]  # tokens whose KV was read from the pool
    bytes_read: int
    read_s: float
    bytes_written: int
    write_s: float


def cache_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, `[batch, heads, seq, head_dim]`, from any transformers version's cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]


def make_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(pairs))
    return DynamicCache(pairs)


class HFEngine:
    """One model, optionally one pool. Not thread-safe: one batch at a time."""

    def __init__(self, model: Any, model_id: str, revision: str, pool: KVPool | None = None, tenant: str = "",
                 chunk_tokens: int = 256, tp: tuple[int, int] = (0, 1), direct: str = "auto",
                 load_mode: str = "layered", layers_per_copy: int = 1) -> None:
        if load_mode not in LOAD_MODES:
            raise UsageError(f"load_mode must be one of {', '.join(LOAD_MODES)}, got {load_mode!r}")
        self.load_mode = load_mode
        self.layers_per_copy = layers_per_copy
        #: breakdown mode: a dict that run_batch fills with seconds per phase, synchronizing around each phase
        #: (distorts the overlap: for diagnosis only). None: no synchronisation, no timing.
        self.breakdown: dict[str, float] | None = None
        self._last_mark = 0.0
        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        probe = self._forward(torch.zeros(1, 1, dtype=torch.long, device=self.device), None,
                              torch.zeros(1, 1, dtype=torch.long, device=self.device))[1]
        k, _ = cache_pairs(probe)[0]
        self.num_layers = len(cache_pairs(probe))
        self.heads, self.head_dim, self.dtype = k.shape[1], k.shape[3], k.dtype
        if layers_per_copy < 1 or self.num_layers % layers_per_copy:
            raise UsageError(f"layers_per_copy must divide the {self.num_layers} layers, got {layers_per_copy}")
        self.ns = Namespace(model_id, revision, Layout.HF.value, str(self.dtype).removeprefix("torch."),
                            tp_rank=tp[0], tp_size=tp[1], tenant=tenant, chunk_tokens=chunk_tokens)
        self.chunk = chunk_tokens
        self.chunk_bytes = 2 * self.num_layers * chunk_tokens * self.heads * self.head_dim * self.dtype.itemsize
        pin = self.device.type == "cuda"
        self.conn = PoolConnector(pool, self.chunk_bytes, pin=pin, direct=direct) if pool is not None else None

    # -- model calls ---------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache: Any, pos: torch.Tensor, mask: torch.Tensor | None = None):
        kw: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "position_ids": pos}
        if mask is not None:
            kw["attention_mask"] = mask
        if self._keep_kw:
            kw[self._keep_kw] = 1
        with torch.inference_mode():
            out = self.model(input_ids=ids, **kw)
        new_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits[:, -1].float(), new_cache

    # -- pool <-> cache ------------------------------------------------------------------------------------------
    def _buffers(self, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (1, self.heads, capacity, self.head_dim)
        return [(torch.empty(shape, dtype=self.dtype, device=self.device),
                 torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]

    def _cache_over(self, bufs: list, length: int, ready: list | None = None) -> Any:
        """A cache showing the first `length` positions of `bufs`, written in place by the forward pass."""
        cache = prealloc_cache(bufs, length, ready) if self.load_mode != "legacy" else None
        if cache is not None:
            return cache
        if ready and self.device.type == "cuda":
            for ev in ready:
                torch.cuda.current_stream(self.device).wait_event(ev)
        return make_cache([(k[:, :, :length], v[:, :, :length]) for k, v in bufs])

    def _cache_from_pool(self, keys: list[ChunkKey], use: int, total: int) -> _Loaded:
        """The KV of up to `use` chunks from the pool, as a cache of at most `total - 1` tokens (the last prompt
        token is always computed: its logits give the first token) in buffers of `total` positions."""
        refs = self.conn.direct_refs(keys[:use], self.device) if self.load_mode == "layered" else None
        if refs is not None:
            return self._layered(refs, use, total)
        raw, got = self.conn.read_blocks(keys[:use], self.device)
        self._mark("read")
        if got == 0:
            return _Loaded(None, 0, None, None)
        length = got * self.chunk
        bufs = self._buffers(total if self.load_mode != "legacy" else length)
        blocks = raw[:got].view(self.dtype).view(got, self.num_layers, 2, self.chunk, self.heads, self.head_dim)
        kernels.scatter(paged_kv(Layout.HF, bufs), torch.arange(length, device=self.device), blocks, self.chunk)
        cached = min(length, total - 1)
        return _Loaded(self._cache_over(bufs, cached), cached, None, bufs)

    def _layered(self, refs: list, use: int, total: int) -> _Loaded:
        """Pipelined direct read: payloads are copied layer-major (`layers_per_copy` layers of every chunk, then
        the next ones) on a side stream; each group is scattered into the cache buffers as soon as it landed, on
        a second stream, and the forward pass waits per layer (`PreallocLayer.ready`). Trailers and leases are
        checked by `finish`. Copies per request: chunks * layers / layers_per_copy, each queued by Python."""
        g = self.layers_per_copy
        n_l, n_p = self.num_layers, self.num_layers // g
        raw = torch.empty((n_p, use, self.chunk_bytes // n_p), dtype=torch.uint8, device=self.device)
        bufs = self._buffers(total)
        ls = kernels.LayerScatter(paged_kv(Layout.HF, bufs), torch.arange(use * self.chunk, device=self.device),
                                  self.chunk)
        cuda = self.device.type == "cuda"
        stream = None
        if cuda:
            stream = self._scatter_stream = getattr(self, "_scatter_stream", None) or torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        ready: list = [None] * n_l

        def on_part(part: int, copied: Any) -> None:
            blocks = raw[part, :use].view(self.dtype).view(use, g, 2, self.chunk, self.heads, self.head_dim)
            if stream is None:
                ls.layers(part * g, blocks)
                return
            stream.wait_event(copied)
            with torch.cuda.stream(stream):
                ls.layers(part * g, blocks)
                done = torch.cuda.Event()
                done.record(stream)
            ready[part * g:(part + 1) * g] = [done] * g

        finish = self.conn.start_direct(refs, raw, n_p, on_part)
        if self.breakdown is not None:  # host time to queue every copy and scatter (no synchronisation)
            self.breakdown["queue_host"] = self.breakdown.get("queue_host", 0.0) + time.perf_counter() \
                - self._last_mark
        if stream is not None:  # made on the current stream, read by queued scatters: no reuse before they ran
            raw.record_stream(stream)
            ls.keep_for(stream)
        cached = min(use * self.chunk, total - 1)
        return _Loaded(self._cache_over(bufs, cached, ready if cuda else None), cached, finish, bufs)

    def _store(self, pairs: list, row: int, col0: int, keys: list[ChunkKey], first: int, last: int) -> None:
        """Gather chunks [first, last) of request `row`, whose token 0 sits at column `col0`, and put them."""
        if last <= first:
            return
        if pairs[0][0].stride() != pairs[0][1].stride():  # a fresh cache may hold views of projections
            pairs = [(k.contiguous(), v.contiguous()) for k, v in pairs]
        kv = paged_kv(Layout.HF, pairs)
        slots = row * kv.block_size + col0 + torch.arange(first * self.chunk, last * self.chunk, device=self.device)
        blocks = kernels.gather(kv, slots, kv.empty_blocks(last - first, self.chunk), self.chunk)
        staging = self.conn.staging("write", last - first)
        staging.copy_(blocks.view(torch.uint8).reshape(last - first, -1))
        self.conn.write(keys[first:last], staging, parent=keys[first - 1] if first else None, tokens=self.chunk)

    # -- serving ---------------------------------------------------------------------------------------------
    def _prefill(self, tokens: list[int], keys: list[ChunkKey], known: int) -> tuple[torch.Tensor, Any, int]:
        use = min(known, len(tokens) // self.chunk)
        loaded = self._cache_from_pool(keys, use, len(tokens)) if use else _Loaded(None, 0, None, None)
        self._mark("scatter" if loaded.finish is None else "read+scatter")
        cache, cached = loaded.cache, loaded.cached
        logits, cache = self._forward_from(tokens, cache, cached)
        if loaded.finish is not None:
            good = loaded.finish()  # copies done, trailers and leases checked: was the forward on good data?
            wait_all(cache)
            if good * self.chunk < cached:  # no: recompute from the intact prefix, in the same buffers
                cached = min(good * self.chunk, len(tokens) - 1)
                cache = self._cache_over(loaded.bufs, cached) if cached else None
                logits, cache = self._forward_from(tokens, cache, cached)
        self._mark("forward")
        return logits[0], cache, cached

    def _forward_from(self, tokens: list[int], cache: Any, cached: int) -> tuple[torch.Tensor, Any]:
        ids = torch.tensor([tokens[cached:]], device=self.device)
        pos = torch.arange(cached, len(tokens), device=self.device)[None]
        return self._forward(ids, cache, pos)

    def _mark(self, phase: str | None) -> None:
        """Breakdown mode only (`self.breakdown` a dict): synchronize, add the time since the last mark to `phase`
        (None: only start counting)."""
        if self.breakdown is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.breakdown[phase] = self.breakdown.get(phase, 0.0) + now - self._last_mark
        self._last_mark = now

    def run_batch(self, prompts: list[list[int]], max_new_tokens: int) -> BatchResult:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UsageError("every request needs at least one prompt token")
        if max_new_tokens < 0:
            raise UsageError("max_new_tokens must be >= 0")
        before = self.conn.stats.snapshot() if self.conn else None
        self._mark(None)
        t0 = self._last_mark = time.perf_counter()
        keys, known, logits, caches, cached = [], [], [], [], []
        for p in prompts:
            # one request at a time, so a prefill worker's request already hits what the previous one stored
            # (a shared system prompt is computed once per batch, not once per request)
            k = chunk_keys(self.ns, p) if self.conn else []
            self._mark("keys")
            n = self.conn.lookup(k) if self.conn else 0
            self._mark("lookup")
            lg, cache, c = self._prefill(p, k, n)
            pairs = cache_pairs(cache)
            if self.conn and max_new_tokens == 0:
                self._store(pairs, 0, 0, k, n, len(p) // self.chunk)
                n = max(n, len(p) // self.chunk)
            keys.append(k)
            known.append(n)
            logits.append(lg)
            caches.append(pairs)
            cached.append(c)
        first_logits = torch.stack(logits)
        first = first_logits.argmax(-1).tolist()
        ttft = time.perf_counter() - t0
        self._mark("first_token")
        stored = list(known)
        if self.conn:  # a decode engine stores what the pool lacked only once every first token is out
            for b, p in enumerate(prompts):
                self._store(caches[b], 0, 0, keys[b], stored[b], len(p) // self.chunk)
                stored[b] = max(stored[b], len(p) // self.chunk)
        outputs = [[t] for t in first] if max_new_tokens else [[] for _ in prompts]
        if max_new_tokens > 1:
            self._decode(prompts, caches, keys, stored, outputs, max_new_tokens)
        total = time.perf_counter() - t0
        after = self.conn.stats.snapshot() if self.conn else None
        delta = {f: after[f] - before[f] for f in ("bytes_read", "read_s", "bytes_written", "write_s")} if after \
            else dict.fromkeys(("bytes_read", "read_s", "bytes_written", "write_s"), 0)
        return BatchResult(outputs, first_logits.cpu(), ttft, total, [len(p) for p in prompts], cached, **delta)

    def _decode(self, prompts: list[list[int]], caches: list, keys: list, stored: list[int],
                outputs: list[list[int]], max_new_tokens: int) -> None:
        lens = [len(p) for p in prompts]
        width = max(lens)
        batch = len(prompts)
        pairs = []
        for layer in range(self.num_layers):
            merged = []
            for plane in (0, 1):
                shape = (batch, self.heads, width, self.head_dim)
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)
                for b in range(batch):
                    t[b, :, width - lens[b]:] = caches[b][layer][plane][0]
                merged.append(t)
            pairs.append(tuple(merged))
        cache = make_cache(pairs)
        mask = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        for b in range(batch):
            mask[b, width - lens[b]:] = 1
        ones = torch.ones(batch, 1, dtype=torch.long, device=self.device)
        for step in range(max_new_tokens - 1):
            ids = torch.tensor([[o[-1]] for o in outputs], device=self.device)
            pos = torch.tensor([[n + step] for n in lens], device=self.device)
            mask = torch.cat([mask, ones], dim=1)
            logits, cache = self._forward(ids, cache, pos, mask)
            for b, t in enumerate(logits.argmax(-1).tolist()):
                outputs[b].append(t)
            if self.conn:
                self._store_generated(prompts, outputs, cache, keys, stored, width, step)

    def _store_generated(self, prompts: list, outputs: list, cache: Any, keys: list, stored: list[int],
                         width: int, step: int) -> None:
        """After step `step` the cache holds KV for prompt + outputs[:step + 1] (the last token has none yet)."""
        pairs = None
        for b, p in enumerate(prompts):
            have = len(p) + step + 1
            ready = have // self.chunk
            if ready <= stored[b]:
                continue
            seq = list(p) + outputs[b][: step + 1]
            keys[b] = keys[b] + chunk_keys(self.ns, seq[len(keys[b]) * self.chunk: ready * self.chunk],
                                           start=keys[b][-1] if keys[b] else None)
            pairs = pairs if pairs is not None else cache_pairs(cache)
            self._store(pairs, b, width - len(p), keys[b], stored[b], ready)
            stored[b] = ready
