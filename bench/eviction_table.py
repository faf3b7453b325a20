"""The eviction lab's tables and plots for docs/eviction.md: every policy at 1/5/10/25% of unique blocks on
each shipped trace (RDMAPOOL_TRACES or ../shared/traces), plus the train/test split (the early and late half
of each trace's duration) for LRU, the default and the optimum, and the share of the LRU-to-optimum gap closed.

    rdmapool bench eviction_table [--plots docs/] [--markdown FILE] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import record  # noqa: E402

from rdmapool import policy as policies  # noqa: E402
from rdmapool.sim import MODELS, load_trace, make_policy, replay  # noqa: E402
from rdmapool.sim.report import markdown, plot  # noqa: E402
from rdmapool.sim.trace import shipped_traces_dir  # noqa: E402

SHARES = (0.01, 0.05, 0.10, 0.25)


def grid(trace, names, shares=SHARES):
    unique = trace.unique_blocks()
    out = []
    for name in names:
        for s in shares:
            pol, oracle = make_policy(name, trace)
            out.append(replay(trace, pol, int(s * unique), model=MODELS["llama-3-8b"], oracle=oracle))
            print(f"  {trace.source} {name} {s}: {out[-1].hit_ratio:.4f}", file=sys.stderr)
    return out


def gap_closed(results, shares_of) -> dict:
    by = {(r.policy, r.capacity_blocks): r.hit_ratio for r in results}
    out = {}
    for cap, share in shares_of.items():
        lru, opt, ours = by[("lru", cap)], by[("belady", cap)], by[(policies.DEFAULT, cap)]
        out[share] = round((ours - lru) / (opt - lru), 3) if opt > lru else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eviction_table")
    ap.add_argument("--plots", default="docs", help="folder for the PNG plots")
    ap.add_argument("--markdown", help="write the tables as Markdown to this file")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    folder = shipped_traces_dir()
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        print(f"no traces in {folder} (set RDMAPOOL_TRACES)", file=sys.stderr)
        return 2
    names = [n for n in policies.names() if n != "belady"] + ["belady"]
    md, payload = [], {"bench": "eviction_table", "default": policies.DEFAULT, "traces": {}}
    for path in files:
        trace = load_trace(path)
        unique = trace.unique_blocks()
        res = grid(trace, names)
        shares_of = {int(s * unique): f"{s:.0%}" for s in SHARES}
        png = Path(args.plots) / f"eviction-{path.stem}.png"
        plot(res, png, f"{path.name} ({unique} unique blocks)", unique, policies.DEFAULT)
        md += [f"### {path.name} ({len(trace.requests)} requests, {unique} unique blocks)", "",
               markdown(res, shares_of), "", f"Gap closed by `{policies.DEFAULT}`: {gap_closed(res, shares_of)}",
               "", f"![hit ratio against capacity]({png.name})", ""]
        entry = {"all": [r.to_dict() for r in res], "gap_closed": gap_closed(res, shares_of)}
        for label, (a, b) in {"early half (tune)": (0.0, 0.5), "late half (check)": (0.5, 1.0)}.items():
            part = trace.span(a, b)
            pres = grid(part, ["lru", policies.DEFAULT, "belady"])
            pshares = {int(s * part.unique_blocks()): f"{s:.0%}" for s in SHARES}
            md += [f"{path.name}, {label}:", "", markdown(pres, pshares), "",
                   f"Gap closed: {gap_closed(pres, pshares)}", ""]
            entry[label] = {"results": [r.to_dict() for r in pres], "gap_closed": gap_closed(pres, pshares)}
        payload["traces"][path.name] = entry
    text = "\n".join(md)
    print(text, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.record:
        print(f"recorded {record('eviction_table', payload)}", file=sys.stderr)
    print(json.dumps({k: v for k, v in payload.items() if k != "traces"} |
                     {"gap_closed": {t: e["gap_closed"] for t, e in payload["traces"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
