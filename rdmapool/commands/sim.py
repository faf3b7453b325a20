"""`rdmapool sim`: replay a request trace against eviction policies (the servers' own policy classes).

Contract (scripts depend on it): with one --policy and one --capacity and --json, the last line printed is one
JSON object with at least policy, capacity_blocks, hit_ratio, token_hit_ratio and requests. With several
policies or capacities a table is printed (and with --json, a last line {"results": [...]})."""

from __future__ import annotations

import argparse
import json
import sys

from rdmapool.errors import UsageError


def _options(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--option wants NAME=VALUE, got {pair!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _split(values: list[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def run(args: argparse.Namespace) -> int:
    from rdmapool import policy as policies
    from rdmapool.sim import MODELS, load_trace, make_policy, parse_capacity, replay
    from rdmapool.sim.report import plot, table

    if args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    model = MODELS[args.model]
    trace = load_trace(args.trace)
    if args.span:
        a, _, b = args.span.partition(":")
        try:
            trace = trace.span(float(a), float(b))
        except ValueError:
            raise UsageError(f"--span wants START:END fractions, got {args.span!r}") from None
    if not trace.requests:
        raise UsageError(f"{args.trace}: no requests")
    names = _split(args.policy or ["default"])
    if names == ["all"]:
        names = [n for n in policies.names() if n != "belady"] + ["belady"]
    names = [policies.DEFAULT if n == "default" else n for n in names]
    unique = trace.unique_blocks()
    block_bytes = trace.block_tokens * model.kv_bytes_per_token
    caps = {}
    for text in _split(args.capacity or ["0.05"]):
        caps.setdefault(parse_capacity(text, unique, block_bytes), text)
    options = _options(args.option)
    results = []
    for name in names:
        for cap in caps:
            pol, oracle = make_policy(name, trace, options if name != "belady" else {})
            results.append(replay(trace, pol, cap, model=model, oracle=oracle, check=args.check))
            if not args.json or len(results) > 1:
                print(f"  {name} @ {cap} blocks: hit {results[-1].hit_ratio:.4f}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot, f"{args.trace.rsplit('/', 1)[-1]} ({unique} unique blocks)", unique,
             policies.DEFAULT)
    if len(results) == 1 and args.json:
        out = results[0].to_dict()
        out.update(trace=args.trace, unique_blocks=unique, capacity=caps[results[0].capacity_blocks])
        print(json.dumps(out))
        return 0
    print(f"trace {args.trace}: {trace.block_accesses()} block accesses, {unique} unique blocks, "
          f"{len(trace.requests)} requests; model {model.name}")
    print(table(results, {c: t for c, t in caps.items()}))
    if args.json:
        print(json.dumps({"trace": args.trace, "unique_blocks": unique,
                          "results": [r.to_dict() for r in results]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="replay a request trace against eviction policies",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="trace file (Mooncake JSONL or rdmapool JSONL)")
    p.add_argument("--policy", action="append",
                   help="policy name (repeat or comma-separate; 'all' for every policy; default: the servers'"
                        " default)")
    p.add_argument("--capacity", action="append",
                   help="share of unique blocks (0.05 or 5%%), bytes (64GiB) or NNNblocks; repeat or"
                        " comma-separate (default 0.05)")
    p.add_argument("--model", default="llama-3-8b", help="model for compute saved and byte capacities")
    p.add_argument("--span", help="replay only START:END of the trace's duration, as fractions (e.g. 0:0.5)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="option passed to the policy constructor (JSON value)")
    p.add_argument("--json", action="store_true", help="print the result(s) as JSON on the last line")
    p.add_argument("--plot", metavar="FILE.png", help="draw hit ratio against capacity per policy")
    p.add_argument("--check", action="store_true", help="check the policy's key count after every request")
    p.set_defaults(func=run)
