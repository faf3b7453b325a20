"""Replay a trace against one policy object at one capacity, accounting hits as a prefix cache sees them.

Per request, in trace order:
1. hits = the longest run of the request's leading blocks that are resident, counted before anything of this
   request is inserted (a block after the first miss does not count, even if resident);
2. then each block, in chain order, is made resident: `on_access` if it already is; otherwise, when the pool
   is full, the policy's `admit` may bypass it, else victims named by `victim` are removed (`on_remove`) until
   there is room, and the block is inserted (`on_insert`).
The simulator owns the resident set (as a server owns its index) and checks that every victim is resident, so
a policy bug fails loudly instead of skewing results. Time passed to policies is the request's, in seconds."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

from rdmapool.errors import RdmapoolError, UsageError
from rdmapool.policy import OFFLINE, BlockInfo, EvictionPolicy, create
from rdmapool.sim.cost import ModelCost
from rdmapool.sim.oracle import FutureOracle
from rdmapool.sim.trace import Trace, block_tokens_of


class PolicyViolation(RdmapoolError):
    """A policy broke the interface contract (named a victim that is not resident, lost count of its keys)."""


@dataclass(frozen=True)
class SimResult:
    policy: str
    capacity_blocks: int
    requests: int
    block_accesses: int
    block_hits: int
    hit_ratio: float
    input_tokens: int
    token_hits: int
    token_hit_ratio: float
    model: str
    prefill_flops: float
    prefill_flops_saved: float
    compute_saved_ratio: float
    evictions: int
    bypassed: int
    seconds: float
    accesses_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def make_policy(name: str, trace: Trace, options: dict | None = None) -> tuple[EvictionPolicy, FutureOracle | None]:
    """Create policy `name` for replaying `trace`: offline policies get the trace's future."""
    options = dict(options or {})
    if name in OFFLINE:
        oracle = FutureOracle(trace)
        return create(name, future=oracle, **options), oracle
    return create(name, **options), None


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_capacity(text: str, unique_blocks: int, block_bytes: int) -> int:
    """'0.05' or '5%': a share of the trace's unique blocks; '64GiB', '1e9B': bytes (one block is
    `block_bytes`); '4000blocks': a count of blocks."""
    s = str(text).strip().lower().replace("_", "")
    try:
        if s.endswith("%"):
            blocks = float(s[:-1]) / 100.0 * unique_blocks
        elif s.endswith("blocks"):
            blocks = float(s[: -len("blocks")])
        elif m := re.fullmatch(r"([0-9.e+]+)\s*([kmgt]i?b|b)", s):
            blocks = float(m.group(1)) * _UNITS[m.group(2)] / block_bytes
        else:
            value = float(s)
            if not 0.0 < value <= 1.0:
                raise UsageError(f"capacity {text!r}: a bare number is a share of unique blocks in (0, 1]; "
                                 "use 'NNNblocks' or a byte size like '64GiB'")
            blocks = value * unique_blocks
    except ValueError:
        raise UsageError(f"capacity {text!r} is not a share ('0.05', '5%'), a size ('64GiB') "
                         "or a block count ('4000blocks')") from None
    if blocks < 1:
        raise UsageError(f"capacity {text!r} is less than one block")
    return int(blocks)


def replay(trace: Trace, policy: EvictionPolicy, capacity_blocks: int, *, model: ModelCost,
           oracle: FutureOracle | None = None, check: bool = False) -> SimResult:
    if capacity_blocks < 1:
        raise UsageError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
    resident: set = set()
    cap = capacity_blocks
    block_hits = token_hits = accesses = input_tokens = evictions = bypassed = 0
    flops = saved = 0.0
    bt = trace.block_tokens
    on_access, on_insert, admit, victim, on_remove = (policy.on_access, policy.on_insert, policy.admit,
                                                      policy.victim, policy.on_remove)
    t0 = time.perf_counter()
    for i, req in enumerate(trace.requests):
        if oracle is not None:
            oracle.advance(i)
        keys, now, n = req.keys, req.time, len(req.keys)
        k = 0
        while k < n and keys[k] in resident:
            k += 1
        toks = block_tokens_of(req, bt)
        hit_toks = sum(toks[:k])
        block_hits += k
        token_hits += hit_toks
        accesses += n
        total_toks = sum(toks)
        input_tokens += total_toks
        flops += model.prefix_flops(total_toks)
        saved += model.prefix_flops(hit_toks)
        parent = None
        for d in range(n):
            key = keys[d]
            if key in resident:
                on_access(key, now)
            else:
                info = BlockInfo(key, 1, parent, d, req.tenant, toks[d])
                if len(resident) >= cap:
                    if not admit(info, now):
                        bypassed += 1
                        parent = key
                        continue
                    while len(resident) >= cap:
                        v = victim(now)
                        if v not in resident:
                            raise PolicyViolation(f"{policy.name} named victim {v!r}, which is not resident")
                        resident.discard(v)
                        on_remove(v)
                        evictions += 1
                resident.add(key)
                on_insert(info, now)
            parent = key
        if check and len(policy) != len(resident):
            raise PolicyViolation(f"{policy.name} tracks {len(policy)} keys, {len(resident)} are resident")
    elapsed = time.perf_counter() - t0
    return SimResult(
        policy=policy.name, capacity_blocks=cap, requests=len(trace.requests), block_accesses=accesses,
        block_hits=block_hits, hit_ratio=block_hits / accesses if accesses else 0.0,
        input_tokens=input_tokens, token_hits=token_hits,
        token_hit_ratio=token_hits / input_tokens if input_tokens else 0.0,
        model=model.name, prefill_flops=flops, prefill_flops_saved=saved,
        compute_saved_ratio=saved / flops if flops else 0.0, evictions=evictions, bypassed=bypassed,
        seconds=elapsed, accesses_per_second=accesses / elapsed if elapsed > 0 else 0.0)
