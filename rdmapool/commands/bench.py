"""`rdmapool bench NAME [ARGS]`: runs the benchmark `bench/NAME.py` of this checkout (each defines
`main(argv) -> int`, prints JSON on its last line, and with `--record` writes bench/results/)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from rdmapool.errors import UsageError

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def run(args: argparse.Namespace) -> int:
    path = BENCH_DIR / f"{args.name}.py"
    if not path.is_file():
        raise UsageError(f"no benchmark {args.name!r} in {BENCH_DIR}; available: {', '.join(available()) or 'none'}")
    spec = importlib.util.spec_from_file_location(f"rdmapool_bench_{args.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.args) or 0)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark from bench/ (prints JSON)")
    parser.add_argument("name", help="benchmark name: a file bench/NAME.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    parser.set_defaults(func=run)
