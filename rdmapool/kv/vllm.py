"""A vLLM KV connector shaped like `KVConnectorBase_V1` (vllm/distributed/kv_transfer/kv_connector/v1/base.py).

vLLM is not installed here, so this class has the base class's method names and call order (FACTS.md section 3)
but has NOT been run inside vLLM; `tests/kv/test_vllm.py` drives it the way the scheduler and a worker would,
with vLLM-layout caches. When vLLM is importable the class subclasses the real base.

Theory of operation
-------------------
One object per role. Scheduler side: `get_num_new_matched_tokens` keys the prompt (chunks of `chunk_tokens`, a
multiple of vLLM's block size) and asks the pool for the longest cached prefix, keeping at least one token to
compute; `update_state_after_alloc` records the blocks vLLM allocated for those tokens; `request_finished` queues
the request's full chunks for saving and asks vLLM to keep its blocks (delay_free) until they are saved;
`build_connector_meta` hands both lists to the workers. Worker side: `register_kv_caches` wraps the per-layer
caches (`layouts.paged_kv`, vLLM NHD/HND or FlashInfer); `start_load_kv` reads every load of the step and scatters
it, all layers in one kernel launch per request (so `wait_for_layer_load` has nothing to wait for); `wait_for_save`
gathers and puts the queued saves; `get_finished` reports the saved request ids so vLLM frees their blocks.
A failed read loads fewer chunks; the ids of blocks that did not load are reported by
`get_block_ids_with_load_errors` so vLLM recomputes them (never trusts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rdmapool.errors import UsageError
from rdmapool.kv import kernels
from rdmapool.kv.keys import Namespace, chunk_keys
from rdmapool.kv.layouts import PagedKV, paged_kv
from rdmapool.kv.pool import KVPool, PoolConnector

try:  # pragma: no cover - vLLM is not installed in CI
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as _Base
except Exception:  # noqa: BLE001 - any import failure means "no vLLM"
    _Base = object


@dataclass(frozen=True)
class Transfer:
    request_id: str
    tokens: tuple[int, ...]
    block_ids: tuple[int, ...]
    first_chunk: int  # chunks [first_chunk, last_chunk) move
    last_chunk: int


@dataclass
class RdmapoolConnectorMetadata:
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


class RdmapoolConnector(_Base):
    def __init__(self, role: str, pool: KVPool, ns: Namespace, block_size: int, layout: str = "vllm-nhd") -> None:
        if role not in ("scheduler", "worker"):
            raise UsageError(f"role must be scheduler or worker, got {role!r}")
        if ns.chunk_tokens % block_size:
            raise UsageError(f"chunk_tokens {ns.chunk_tokens} must be a multiple of the block size {block_size}")
        self.role, self.pool, self.ns, self.block_size, self.layout = role, pool, ns, block_size, layout
        self.chunk = ns.chunk_tokens
        self.kv: PagedKV | None = None
        self.conn: PoolConnector | None = None
        self._lookup: dict[str, tuple[int, int]] = {}  # request id -> (computed tokens, matched tokens)
        self._loads: list[Transfer] = []
        self._saves: list[Transfer] = []
        self._meta: RdmapoolConnectorMetadata | None = None
        self._finished_saving: set[str] = set()
        self._load_errors: set[int] = set()
        self._lookup_conn = PoolConnector(pool, 1)  # lookups move no bytes; chunk size is irrelevant there

    # ---- scheduler side --------------------------------------------------------------------------------
    @staticmethod
    def _tokens(request: Any) -> list[int]:
        return list(getattr(request, "prompt_token_ids", None) or getattr(request, "all_token_ids", []))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        tokens = self._tokens(request)
        keys = chunk_keys(self.ns, tokens)
        usable = min(len(keys), (len(tokens) - 1) // self.chunk)  # leave one token to compute
        hit = self._lookup_conn.lookup(keys[:usable]) * self.chunk
        new = max(0, hit - num_computed_tokens)
        self._lookup[request.request_id] = (num_computed_tokens, new)
        return new, False  # loaded synchronously in start_load_kv

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        computed, _ = self._lookup.get(request.request_id, (0, 0))
        ids = blocks.get_block_ids()[0] if hasattr(blocks, "get_block_ids") else list(blocks)
        if computed % self.chunk:
            raise UsageError("vLLM's computed prefix must end on a chunk boundary to load chunks after it")
        self._loads.append(Transfer(request.request_id, tuple(self._tokens(request)), tuple(ids),
                                    computed // self.chunk, (computed + num_external_tokens) // self.chunk))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        tokens = list(getattr(request, "all_token_ids", None) or self._tokens(request))
        # KV exists for every token but the last generated one
        full = min(len(tokens) - 1, len(block_ids) * self.block_size) // self.chunk
        self._lookup.pop(request.request_id, None)
        if full == 0:
            return False, None
        self._saves.append(Transfer(request.request_id, tuple(tokens[: full * self.chunk]), tuple(block_ids), 0, full))
        return True, None  # keep the blocks until get_finished reports the save

    def build_connector_meta(self, scheduler_output: Any = None) -> RdmapoolConnectorMetadata:
        meta = RdmapoolConnectorMetadata(self._loads, self._saves)
        self._loads, self._saves = [], []
        return meta

    # ---- worker side -----------------------------------------------------------------------------------
    def bind_connector_metadata(self, meta: RdmapoolConnectorMetadata) -> None:
        self._meta = meta

    def clear_connector_metadata(self) -> None:
        self._meta = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv = paged_kv(self.layout, [kv_caches[name] for name in kv_caches])
        if self.kv.block_size != self.block_size:
            raise UsageError(f"caches have blocks of {self.kv.block_size} tokens, connector {self.block_size}")
        self.conn = PoolConnector(self.pool, self.kv.chunk_bytes(self.chunk), pin=self.kv.device.type == "cuda")

    def _slots(self, t: Transfer) -> torch.Tensor:
        pos = torch.arange(t.first_chunk * self.chunk, t.last_chunk * self.chunk)
        ids = torch.tensor(t.block_ids, dtype=torch.int64)
        return (ids[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.kv.device)

    def _shape(self, n: int) -> tuple[int, ...]:
        return self.kv.block_shape(n, self.chunk)

    def start_load_kv(self, forward_context: Any = None, **kwargs: Any) -> None:
        for t in (self._meta.loads if self._meta else []):
            keys = chunk_keys(self.ns, t.tokens)[t.first_chunk:t.last_chunk]
            staging = self.conn.staging("read", len(keys))
            got = self.conn.read(keys, staging)
            if got < len(keys):  # vLLM must recompute the blocks that did not arrive
                first_bad = (t.first_chunk + got) * self.chunk // self.block_size
                last = t.last_chunk * self.chunk // self.block_size
                self._load_errors.update(t.block_ids[first_bad:last])
            if got:
                part = Transfer(t.request_id, t.tokens, t.block_ids, t.first_chunk, t.first_chunk + got)
                blocks = staging[:got].view(self.kv.dtype).view(self._shape(got)).to(self.kv.device)
                kernels.scatter(self.kv, self._slots(part), blocks, self.chunk)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # start_load_kv moved every layer already

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # saved for all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        for t in (self._meta.saves if self._meta else []):
            keys = chunk_keys(self.ns, t.tokens)[t.first_chunk:t.last_chunk]
            n = len(keys)
            blocks = kernels.gather(self.kv, self._slots(t), self.kv.empty_blocks(n, self.chunk), self.chunk)
            staging = self.conn.staging("write", n)
            staging.copy_(blocks.view(torch.uint8).reshape(n, -1))
            self.conn.write(keys, staging, tokens=self.chunk)
            self._finished_saving.add(t.request_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._finished_saving = self._finished_saving, set()
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
