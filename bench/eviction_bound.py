"""What bounds an online policy: a fluid (LP) upper bound on the hit ratio of any policy that decides from a
class of features, known when a chain is written, plus the chain's age.

Model. Every request ends a chain "life": it returns when a later request extends it (its next turn), after a
gap, with H reusable blocks (all but the shared block 0 and the partial last block), or never. A policy that
only knows the life's feature class c (and its age) can at best pick, per class, a retention time tau_c and a
share p_c of lives to keep: hits = sum_c p_c * H(gaps <= tau_c), cost = block-seconds held, within
capacity * duration. The best choice is a fractional knapsack over the upper concave hulls of each class's
(cost, hits) curve. The class distributions are measured in-sample, so the bound is optimistic (with one
class per life it becomes the clairvoyant "oracle" row, close to Belady). Block 0's hits are added to all.

It bounds policies whose information is a class plus age (and any admission share), assuming chains return
independently of what else the pool sees; it is not a proof for every conceivable online policy. So it also
asks how good a return predictor would have to be: a synthetic score with a given AUC used as the class
(`predictor_sweep`), against the AUC the online features really reach, in-sample and fitted on the first
half and scored on the second (`feature_auc`).

    rdmapool bench eviction_bound [--trace PATH] [--capacity 0.05 --capacity 0.1] [--record]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import record  # noqa: E402

from rdmapool.sim import load_trace  # noqa: E402
from rdmapool.sim.trace import shipped_traces_dir  # noqa: E402


def lives(trace):
    """Per request: (time, blocks held, gap to its next turn or inf, reusable blocks, turn, previous gap)."""
    owner, turn, prevgap, gap, reuse = {}, [], [], [], []
    reqs = trace.requests
    for i, r in enumerate(reqs):
        k = 0
        while k < len(r.keys) and r.keys[k] in owner:
            k += 1
        turn.append(1)
        prevgap.append(None)
        gap.append(math.inf)
        reuse.append(0)
        if k > 1:
            j = owner[r.keys[k - 1]]
            turn[i] = turn[j] + 1
            prevgap[i] = r.time - reqs[j].time
            if gap[j] == math.inf:
                gap[j], reuse[j] = r.time - reqs[j].time, k - 1
        for key in r.keys:
            owner[key] = i
    return turn, prevgap, gap, reuse


def bound(trace, features, share: float) -> float:
    turn, prevgap, gap, reuse = lives(trace)
    reqs = trace.requests
    t_end = reqs[-1].time
    budget = share * trace.unique_blocks() * (t_end - reqs[0].time)
    classes = defaultdict(list)
    for j, r in enumerate(reqs):
        held = len(r.keys) - 2
        if held > 0:
            classes[features(j, r, turn, prevgap)].append((gap[j], reuse[j], held, t_end - r.time))
    segments = []
    for lst in classes.values():
        pts = [(0.0, 0.0)]
        for tau in sorted({g for g, *_ in lst if g < math.inf}):
            cost = sum(h * min(g, tau, rem) for g, _, h, rem in lst)
            pts.append((cost, float(sum(u for g, u, _, _ in lst if g <= tau))))
        hull: list[tuple[float, float]] = []
        for p in sorted(pts):
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                      <= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()
            hull.append(p)
        for a, b in zip(hull, hull[1:], strict=False):
            if b[1] > a[1]:
                slope = (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else math.inf
                segments.append((slope, b[0] - a[0], b[1] - a[1]))
    hits, left = 0.0, budget
    for _, cost, gain in sorted(segments, reverse=True):
        if cost <= left:
            left -= cost
            hits += gain
        else:
            hits += gain * left / cost
            break
    shared0 = sum(1 for r in reqs if r.keys and r.keys[0] == reqs[0].keys[0])
    return (shared0 + hits) / trace.block_accesses()


def life_table(trace) -> dict:
    """Share of requests that get a next turn, by turn number; think-time quantiles; partial tails reused."""
    turn, _, gap, _ = lives(trace)
    by: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for t, g in zip(turn, gap, strict=True):
        by[min(t, 5)][0] += 1
        by[min(t, 5)][1] += g < math.inf
    gaps = sorted(g for g in gap if g < math.inf)
    uses: dict = defaultdict(int)
    for r in trace.requests:
        for k in r.keys:
            uses[k] += 1
    tails = sum(1 for r in trace.requests if r.keys and uses[r.keys[-1]] > 1)
    return {"next_turn_share": round(len(gaps) / len(gap), 3),
            "next_turn_share_by_turn (5 = 5+)": {t: round(c / n, 3) for t, (n, c) in sorted(by.items())},
            "think_time_s_p10_p50_p90": [round(gaps[int(q * (len(gaps) - 1))], 1) for q in (0.1, 0.5, 0.9)]
            if gaps else [], "last_block_reused_share": round(tails / len(trace.requests), 4)}


def feature_scan(trace, horizon: float = 300.0) -> dict:
    """Share of requests that get a next turn, per bucket of other online features (requests within `horizon`
    seconds of the trace's end left out): log2 of new blocks this turn, of prefix hits, of requests in the
    last 10 s, and the partial last block's size in quarters of a block."""
    from bisect import bisect_left

    _, _, gap, _ = lives(trace)
    reqs = trace.requests
    seen: set = set()
    times = [r.time for r in reqs]
    rows: dict[str, dict] = {n: defaultdict(lambda: [0, 0]) for n in ("new blocks", "prefix hits", "load 10 s",
                                                                       "tail quarter")}
    bt = trace.block_tokens
    for j, r in enumerate(reqs):
        k = 0
        while k < len(r.keys) and r.keys[k] in seen:
            k += 1
        seen.update(r.keys)
        if r.time > times[-1] - horizon:
            continue
        tail = (r.tokens % bt) * 4 // bt if r.tokens else -1
        for name, b in (("new blocks", _lg(len(r.keys) - k)), ("prefix hits", _lg(k)),
                        ("load 10 s", _lg(j - bisect_left(times, r.time - 10))), ("tail quarter", tail)):
            rows[name][b][0] += 1
            rows[name][b][1] += gap[j] < math.inf
    return {n: {b: round(c / t, 2) for b, (t, c) in sorted(v.items()) if t >= 20} for n, v in rows.items()}


def _lg(x):
    return -1 if x is None else int(math.log2(x + 1))


FEATURES = {
    "age only": lambda j, r, t, pg: 0,
    "turn": lambda j, r, t, pg: min(t[j], 6),
    "turn + previous gap": lambda j, r, t, pg: (min(t[j], 6), _lg(pg[j])),
    "turn + previous gap + length": lambda j, r, t, pg: (min(t[j], 6), _lg(pg[j]), int(math.log2(len(r.keys)))),
    "oracle (each chain its own class)": lambda j, r, t, pg: j,
}


def auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (ties count half): the chance a returning chain outranks one that does not."""
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j < len(order) and scores[order[j]] == scores[order[i]]:
            j += 1
        rank_sum += sum((i + j + 1) / 2 for k in range(i, j) if labels[order[k]])
        i = j
    pos = sum(labels)
    neg = len(labels) - pos
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg) if pos and neg else 0.5


def predictor_sweep(trace, shares, mus=(0.5, 1.0, 1.5, 2.0, 3.0), seed: int = 7) -> list[dict]:
    """How good must a return predictor be? A synthetic score mu*[chain returns] + N(0, 1), cut in deciles,
    used as the class (no age or turn): its AUC and the fluid bound it allows. Nothing online has this score;
    the sweep shows the predictive power the goal needs."""
    import random
    from bisect import bisect

    _, _, gap, _ = lives(trace)
    ret = [g < math.inf for g in gap]
    rng = random.Random(seed)
    noise = [rng.gauss(0.0, 1.0) for _ in ret]
    out = []
    for mu in mus:
        sc = [mu * r + z for r, z in zip(ret, noise, strict=True)]
        qs = sorted(sc)
        edges = [qs[len(qs) * q // 10] for q in range(1, 10)]
        cls = [bisect(edges, x) for x in sc]
        out.append({"mu": mu, "auc": round(auc(sc, ret), 3),
                    "bound": {str(s): round(bound(trace, lambda j, r, t, pg, c=cls: c[j], s), 4) for s in shares}})
    return out


def feature_auc(trace, horizon: float = 300.0) -> dict:
    """AUC of online features as return predictors: in-sample (class return rates fitted on the whole trace)
    and out-of-sample (fitted on the first half, scored on the second). Requests within `horizon` seconds of
    the end of their half are left out (their return would not be seen)."""
    turn, prevgap, gap, _ = lives(trace)
    reqs = trace.requests
    ret = [g < math.inf for g in gap]
    t0, t1 = reqs[0].time, reqs[-1].time
    mid = (t0 + t1) / 2
    root = _roots(trace, turn)
    fits = {"turn": lambda j, r: min(turn[j], 6),
            "turn + previous gap + length": lambda j, r: (min(turn[j], 6), _lg(prevgap[j]),
                                                          int(math.log2(len(r.keys)))),
            "shared prompt (where the first turn left known blocks)": lambda j, r: root[j],
            "turn + shared prompt": lambda j, r: (min(turn[j], 6), root[j]),
            "output tokens (log2)": lambda j, r: _lg(r.output_tokens),
            "turn + output tokens": lambda j, r: (min(turn[j], 6), _lg(r.output_tokens))}
    train = [j for j, r in enumerate(reqs) if r.time < mid - horizon]
    test = [j for j, r in enumerate(reqs) if mid <= r.time < t1 - horizon]
    out = {}
    for name, f in fits.items():
        row = {}
        for label, fit_on, score_on in (("in-sample", train + test, train + test), ("out-of-sample", train, test)):
            stats: dict = defaultdict(lambda: [1.0, 0.35])  # one pseudo-chain at the overall return rate
            for j in fit_on:
                stats[f(j, reqs[j])][0] += 1
                stats[f(j, reqs[j])][1] += ret[j]
            sc = [stats[f(j, reqs[j])][1] / stats[f(j, reqs[j])][0] for j in score_on]
            row[label] = round(auc(sc, [ret[j] for j in score_on]), 3)
        out[name] = row
    return out


def _roots(trace, turn: list[int]) -> list:
    """Per request, its conversation's shared prompt: where its first turn left the blocks already seen (the
    last known block's key and depth; an application's system prompt would show here), inherited by later
    turns. Computed online: only earlier requests are looked at."""
    seen: dict = {}
    root: list = []
    for i, r in enumerate(trace.requests):
        k = 0
        while k < len(r.keys) and r.keys[k] in seen:
            k += 1
        if turn[i] > 1:
            root.append(root[seen[r.keys[k - 1]]])
        else:
            root.append((r.keys[k - 1], k) if k else None)
        for key in r.keys[k:]:
            seen[key] = i
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eviction_bound")
    ap.add_argument("--trace", default=str(shipped_traces_dir() / "conversation_first_half.jsonl"))
    ap.add_argument("--capacity", type=float, action="append")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    shares = args.capacity or [0.05, 0.10]
    out = {name: {str(s): round(bound(trace, f, s), 4) for s in shares} for name, f in FEATURES.items()}
    _, _, gap, _ = lives(trace)
    known = [g < math.inf for g in gap]
    out["oracle: whether (not when) each chain returns"] = {
        str(s): round(bound(trace, lambda j, r, t, pg: known[j], s), 4) for s in shares}
    life = life_table(trace)
    print(f"life table: {life}", file=sys.stderr)
    for name, row in out.items():
        print(f"{name:48s} " + "  ".join(f"{s}: {v:.3f}" for s, v in row.items()), file=sys.stderr)
    sweep = predictor_sweep(trace, shares)
    for row in sweep:
        print(f"predictor AUC {row['auc']:.3f}: bound {row['bound']}", file=sys.stderr)
    feats = feature_auc(trace)
    print(f"return-predictor AUC of online features: {feats}", file=sys.stderr)
    scan = feature_scan(trace)
    print(f"next-turn share by bucket of other features: {scan}", file=sys.stderr)
    payload = {"bench": "eviction_bound", "trace": args.trace, "bounds": out, "life_table": life,
               "predictor_sweep": sweep, "feature_auc": feats, "feature_scan": scan}
    if args.record:
        print(f"recorded {record('eviction_bound', payload)}", file=sys.stderr)
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
