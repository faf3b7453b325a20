"""How good a return predictor would a pool need? A check of the fluid bound's answer in the real simulator.

Each request gets a score: mu * [its chain gets a next turn] + Gaussian noise (seeded), read from the trace's
future, so this is NOT an online policy: it stands for a hypothetical predictor of a given AUC. The `scored`
policy (simulation only, defined here) is chainheat's skeleton driven by that score instead of heat: a block
takes the flag of the last request that touched it (flag = score in the top `top` share); priority = last
touch + `bonus` seconds if flagged, partial tails first, chains cut from the tail; when the pool is full an
unflagged newcomer is bypassed if `bypass`. A small grid over (top, bonus, bypass) is searched per predictor
(in-sample: an optimistic use of each predictor). A "turn" row uses an online feature as the score (the
in-sample return rate of the request's turn) for comparison.

    rdmapool bench eviction_predictor [--trace PATH] [--capacity 0.05 --capacity 0.1] [--record]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import record  # noqa: E402
from eviction_bound import auc, lives  # noqa: E402

from rdmapool.policy._structs import LazyHeap  # noqa: E402
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key  # noqa: E402
from rdmapool.sim import MODELS, load_trace, replay  # noqa: E402
from rdmapool.sim.trace import shipped_traces_dir  # noqa: E402

_SHIFT = 1e12


class _Clock:
    """Passed to `replay` as its oracle: it only learns which request is being replayed."""

    def __init__(self) -> None:
        self.current = -1

    def advance(self, i: int) -> None:
        self.current = i


class Scored(EvictionPolicy):
    name = "scored"

    def __init__(self, flags: list[bool], clock: _Clock, bonus: float, bypass: bool) -> None:
        self.flags, self.clock, self.bonus, self.bypass = flags, clock, bonus, bypass
        self._heap = LazyHeap()
        self._meta: dict[Key, list] = {}  # key -> [flag, depth, partial, touch]
        self._full = 0

    def _partial(self, info: BlockInfo) -> bool:
        self._full = max(self._full, info.tokens)
        return 0 < info.tokens < self._full

    def _prio(self, m: list) -> tuple[float, int]:
        return (m[3] - _SHIFT if m[2] else m[3] + self.bonus * m[0], -m[1])

    def admit(self, info: BlockInfo, now: float) -> bool:
        flag = self.flags[self.clock.current]
        if self.bypass and not flag:
            return False
        top = self._heap.peek()
        return top is None or self._prio([flag, info.depth, self._partial(info), now]) > top[1]

    def on_insert(self, info: BlockInfo, now: float) -> None:
        m = [self.flags[self.clock.current], info.depth, self._partial(info), now]
        self._meta[info.key] = m
        self._heap.push(info.key, self._prio(m))

    def on_access(self, key: Key, now: float) -> None:
        m = self._meta.get(key)
        if m is not None:
            m[0], m[3] = self.flags[self.clock.current], now
            self._heap.push(key, self._prio(m))

    def on_remove(self, key: Key) -> None:
        if self._meta.pop(key, None) is not None:
            self._heap.discard(key)

    def victim(self, now: float) -> Key | None:
        top = self._heap.peek()
        return None if top is None else top[0]

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, key: Key) -> bool:
        return key in self._meta


GRID = {"top": (0.2, 0.35, 0.5), "bonus": (200.0, 600.0, 2000.0), "bypass": (False, True)}


def best_policy(trace, scores: list[float], share: float) -> dict:
    cap = int(share * trace.unique_blocks())
    order = sorted(scores, reverse=True)
    best: dict = {}
    for top, bonus, bypass in itertools.product(*GRID.values()):
        thr = order[max(0, int(top * len(order)) - 1)]
        flags = [s >= thr for s in scores]
        clock = _Clock()
        r = replay(trace, Scored(flags, clock, bonus, bypass), cap, model=MODELS["llama-3-8b"], oracle=clock)
        if not best or r.hit_ratio > best["hit_ratio"]:
            best = {"hit_ratio": round(r.hit_ratio, 4), "top": top, "bonus": bonus, "bypass": bypass}
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eviction_predictor")
    ap.add_argument("--trace", default=str(shipped_traces_dir() / "conversation_first_half.jsonl"))
    ap.add_argument("--capacity", type=float, action="append")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    shares = args.capacity or [0.05, 0.10]
    turn, _, gap, _ = lives(trace)
    ret = [g < math.inf for g in gap]
    rate: dict = defaultdict(lambda: [0, 0])
    for t, r in zip(turn, ret, strict=True):
        rate[min(t, 6)][0] += 1
        rate[min(t, 6)][1] += r
    rng = random.Random(7)
    noise = [rng.gauss(0.0, 1.0) for _ in ret]
    rows = {"turn (online feature, in-sample rates)": [rate[min(t, 6)][1] / rate[min(t, 6)][0] for t in turn]}
    for mu in (1.0, 1.5, 2.0, 3.0):
        rows[f"synthetic predictor mu={mu}"] = [mu * r + z for r, z in zip(ret, noise, strict=True)]
    out = []
    for name, sc in rows.items():
        row = {"predictor": name, "auc": round(auc(sc, ret), 3),
               "best": {str(s): best_policy(trace, sc, s) for s in shares}}
        print(f"{name:40s} AUC {row['auc']:.3f}  " + "  ".join(
            f"{s}: {b['hit_ratio']:.3f}" for s, b in row["best"].items()), file=sys.stderr)
        out.append(row)
    payload = {"bench": "eviction_predictor", "trace": args.trace, "grid": GRID, "rows": out}
    if args.record:
        print(f"recorded {record('eviction_predictor', payload)}", file=sys.stderr)
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
