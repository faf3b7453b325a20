"""`rdmapool stats HOST:PORT`: a live table of a memory server's slots, leases and event rates.

The token (any tenant's) comes from --token or RDMAPOOL_TOKEN; the stats op needs an authenticated connection
but no data path, and shows that tenant's slots only (other tenants' usage is the operator's, on /metrics) with
the server-wide event counters. --once prints one table; --json prints the raw snapshot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from rdmapool.config import ClientConfig, ServerAddress, format_size
from rdmapool.errors import UsageError


def fetch(address: ServerAddress, token: str, timeout: float = 2.0) -> dict:
    from rdmapool.client.connection import ServerConnection

    conn = ServerConnection(address, ClientConfig(token=token, connect_timeout_s=timeout,
                                                  request_timeout_s=timeout), lambda name: None)
    try:
        stats = conn.call("stats").get("stats")
    finally:
        conn.close()
    if not isinstance(stats, dict):
        raise UsageError("server sent no stats map")
    return stats


def render(stats: dict, previous: dict | None, interval: float) -> str:
    srv = stats.get("server", {})
    lines = [f"server {srv.get('server_id')} at {srv.get('host')}:{srv.get('port')}  transport {srv.get('transport')}"
             f"  epoch {srv.get('epoch')}  metrics {srv.get('metrics_port')}"]
    if cfg := stats.get("config"):  # a server older than the config map sends none
        policy = " ".join([cfg.get("policy", "?"), *(f"{k}={v}" for k, v in cfg.get("policy_options", {}).items())])
        lines.append(f"config  lease {_secs(cfg.get('lease_s'))}  grace {_secs(cfg.get('grace_s'))}"
                     f"  reservation {_secs(cfg.get('reservation_s'))}  ttl {_secs(cfg.get('ttl_s'))}"
                     f"  idle ttl {_secs(cfg.get('idle_ttl_s'))}  idle timeout {_secs(cfg.get('idle_timeout_s'))}")
        lines.append(f"        policy {policy}  classes {','.join(format_size(c) for c in cfg.get('size_classes', []))}"
                     f"  max keys {cfg.get('max_keys')}")
    lines.append("")
    lines.append(f"{'tenant':<12}{'class':>10}{'slots':>8}{'free':>8}{'writing':>8}{'resident':>9}{'retired':>8}"
                 f"{'leased':>8}{'resident MiB':>14}")
    for tenant, t in stats.get("tenants", {}).items():
        for c in t.get("classes", []):
            lines.append(f"{tenant:<12}{format_size(c['capacity']):>10}{c['slots']:>8}{c['free']:>8}{c['writing']:>8}"
                         f"{c['resident']:>9}{c['retired']:>8}{_opt(c['leased']):>8}{c['resident_bytes'] / 2**20:>14.1f}")
    lines += ["", f"{'event (all tenants)':<28}{'total':>12}{'per s':>10}"]
    prev = (previous or {}).get("counters", {})
    for name, value in sorted(stats.get("counters", {}).items()):
        rate = (value - prev.get(name, 0)) / interval if previous else 0.0
        lines.append(f"{name:<28}{value:>12}{rate:>10.1f}")
    return "\n".join(lines)


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:g}s"


def _opt(v: int | None) -> str:
    return "-" if v is None else str(v)


def run(args: argparse.Namespace) -> int:
    # rates divide by the interval and time.sleep refuses negatives, nan and inf: say so before any traceback
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise UsageError(f"--interval must be a finite number of seconds > 0, got {args.interval}")
    token = args.token or os.environ.get("RDMAPOOL_TOKEN")
    if not token:
        raise UsageError("give a tenant token with --token or RDMAPOOL_TOKEN")
    address = ServerAddress.parse(args.address)
    previous = None
    while True:
        stats = fetch(address, token)
        if args.json:
            print(json.dumps(stats), flush=True)
        else:
            if not args.once and sys.stdout.isatty():  # a terminal redraws; a pipe or file gets one table after another
                sys.stdout.write("\x1b[2J\x1b[H")
            print(render(stats, previous, args.interval), flush=True)
        if args.once:
            return 0
        previous = stats
        time.sleep(args.interval)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="live table of a memory server's state (HOST:PORT of its control port)")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--token", help="a tenant token (default: $RDMAPOOL_TOKEN)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (> 0; default 1)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    p.set_defaults(func=run)
