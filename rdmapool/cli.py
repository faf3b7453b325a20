"""The `rdmapool` command. Each subcommand lives in its own module under `rdmapool.commands` and exposes
`register(subparsers)`; the module's parser sets `func`. Modules are discovered, so adding a command never
touches this file."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import rdmapool.commands
from rdmapool.errors import RdmapoolError, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdmapool", description="A disaggregated memory pool for LLM KV caches.")
    parser.add_argument("--version", action="version", version=f"rdmapool {rdmapool.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(rdmapool.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"rdmapool.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"rdmapool {args.command}: {exc}", file=sys.stderr)
        return 2
    except RdmapoolError as exc:
        print(f"rdmapool {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
