"""Replay speed of the simulator: block accesses per second for LRU (goal >= 200k/s) and the default, and
the wall time of the offline optimum, on the shipped traces (RDMAPOOL_TRACES or ../shared/traces).

    rdmapool bench sim_speed [--capacity 0.05] [--repeat 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import record  # noqa: E402

from rdmapool.policy import DEFAULT  # noqa: E402
from rdmapool.sim import MODELS, load_trace, make_policy, replay  # noqa: E402
from rdmapool.sim.trace import shipped_traces_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sim_speed")
    ap.add_argument("--capacity", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    folder = shipped_traces_dir()
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        print(f"no traces in {folder} (set RDMAPOOL_TRACES)", file=sys.stderr)
        return 2
    out = {}
    for path in files:
        trace = load_trace(path)
        cap = int(args.capacity * trace.unique_blocks())
        row = {}
        for name in ("lru", DEFAULT, "belady"):
            best = None
            for _ in range(args.repeat):
                pol, oracle = make_policy(name, trace)
                r = replay(trace, pol, cap, model=MODELS["llama-3-8b"], oracle=oracle)
                if best is None or r.seconds < best.seconds:
                    best = r
            row[name] = {"seconds": round(best.seconds, 3), "accesses_per_second": int(best.accesses_per_second),
                         "hit_ratio": round(best.hit_ratio, 4)}
            print(f"{path.name} {name}: {best.accesses_per_second:,.0f} accesses/s, {best.seconds:.2f} s",
                  file=sys.stderr)
        out[path.name] = row
    payload = {"bench": "sim_speed", "capacity": args.capacity, "results": out}
    if args.record:
        print(f"recorded {record('sim_speed', payload)}", file=sys.stderr)
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
