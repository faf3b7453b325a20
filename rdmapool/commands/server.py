"""`rdmapool server`: start one memory server and serve until SIGINT/SIGTERM.

    rdmapool server --listen 127.0.0.1:7400 --transport tcp --tenant alice:TOKEN:1GiB --metrics 127.0.0.1:9400

Tenants (NAME:TOKEN:QUOTA) come from --tenant, a TOML --tenants-file ([tenants.NAME] token=..., quota=...),
or the RDMAPOOL_TENANTS environment variable (comma-separated specs), so tokens need not appear in `ps`.
When ready it prints one JSON line with the server's info (address, metrics port, epoch) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import tomllib

from rdmapool.config import (
    DEFAULT_SIZE_CLASSES,
    WILDCARD_HOSTS,
    ServerConfig,
    TenantConfig,
    advertised_host,
    format_size,
    parse_hostport,
    parse_size,
)
from rdmapool.errors import UsageError


def _tenants(args: argparse.Namespace) -> tuple[TenantConfig, ...]:
    specs = list(args.tenant or [])
    env = os.environ.get("RDMAPOOL_TENANTS", "")
    specs += [s for s in env.split(",") if s.strip()]
    tenants = [TenantConfig.parse(s.strip()) for s in specs]
    if args.tenants_file:
        try:
            with open(args.tenants_file, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read tenants file {args.tenants_file}: {exc}") from None
        table = data.get("tenants") or {}
        if not isinstance(table, dict):
            raise UsageError(f"tenants file {args.tenants_file}: 'tenants' must be a table of [tenants.NAME] entries")
        for name, t in table.items():
            if not isinstance(t, dict) or "token" not in t or "quota" not in t:
                raise UsageError(f"tenants file: [tenants.{name}] needs token and quota")
            tenants.append(TenantConfig(name, str(t["token"]), parse_size(t["quota"])))
    return tuple(tenants)


def _listen_host(host: str, port: int) -> tuple[str, int]:
    """A host name (localhost) as the IPv4 address it resolves to: the data engine binds addresses only."""
    try:
        socket.inet_aton(host)
        return host, port
    except OSError:
        pass
    if host in WILDCARD_HOSTS:
        return "0.0.0.0", port
    try:
        return socket.gethostbyname(host), port
    except OSError as exc:
        raise UsageError(f"--listen host {host!r} does not resolve to an IPv4 address: {exc}") from None


def _policy_options(specs: list[str]) -> dict:
    """KEY=VALUE pairs; values read as int, float or true/false where they parse, else kept as text."""
    options: dict = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--policy-option needs KEY=VALUE, got {spec!r}")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for parse in (int, float):
                try:
                    value = parse(text)
                    break
                except ValueError:
                    pass
        options[name.strip()] = value
    return options


def build_config(args: argparse.Namespace) -> ServerConfig:
    from rdmapool.cluster.serving import check_args

    check_args(args)
    host, port = _listen_host(*parse_hostport(args.listen))
    advertise = advertised_host(host, args.advertise)
    metrics_host, metrics_port = ("127.0.0.1", None)
    if args.metrics:
        metrics_host, metrics_port = parse_hostport(args.metrics)
    if args.size_classes is not None and not args.size_classes.strip():
        raise UsageError("--size-classes is empty: give sizes like 64KiB,1MiB,32MiB (or leave it out for defaults)")
    classes = tuple(parse_size(s) for s in args.size_classes.split(",")) if args.size_classes else None
    if args.data_port is not None and args.transport != "tcp":
        raise UsageError(f"--data-port is the tcp transport's data engine port; transport {args.transport!r} has none")
    if args.data_port is not None and not 0 <= args.data_port < 65536:
        raise UsageError(f"--data-port must be a port number 0..65535, got {args.data_port}")
    return ServerConfig(
        tenants=_tenants(args), host=host, port=port, advertise=advertise, transport=args.transport,
        # the tcp data engine listens where the control port does (else peers on other hosts cannot reach it)
        transport_options={"host": host, "advertise": advertise, **({"port": args.data_port} if args.data_port else {})}
        if args.transport == "tcp" else {},
        **({"size_classes": classes} if classes else {}),
        lease_s=args.lease_s, grace_s=args.grace_s, reservation_s=args.reservation_s, ttl_s=args.ttl_s,
        idle_ttl_s=args.idle_ttl_s, idle_timeout_s=args.idle_timeout_s, hello_timeout_s=args.hello_timeout_s, policy=args.policy, policy_options=_policy_options(args.policy_option or []),
        memory=args.memory, metrics_host=metrics_host,
        metrics_port=metrics_port,
    )


def run(args: argparse.Namespace) -> int:
    from rdmapool.server import MemoryServer

    config = build_config(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = MemoryServer(config)
    info = server.start()
    agent = None
    try:
        if args.etcd:
            from rdmapool.cluster.serving import start_from_args

            agent = start_from_args(server, args)
        print(json.dumps({"ready": True, "address": server.address, **info.to_dict(),
                          "member_id": agent.session.record.id if agent else None}), flush=True)
        # SIGUSR1: drain (the map moves this server's shards away), then leave. A server outside a cluster has
        # nothing to drain to: it stops as on SIGTERM, saying why (the signal's default action would kill it)
        drain = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: drain.set())
        while not stop.wait(1.0 if agent is None else 0.1):
            if server.failure is not None:
                break
            if agent is None and drain.is_set():
                print("rdmapool server: SIGUSR1 drains a server out of its cluster; this one has none (no --etcd): "
                      "stopping", file=sys.stderr, flush=True)
                break
            if agent is not None:
                for kind, detail in agent.session.take_events():
                    print(json.dumps({"cluster_event": kind, "detail": str(detail)}), flush=True)
                if drain.is_set():
                    from rdmapool.cluster.serving import drain_step

                    if drain_step(agent):
                        break
    finally:
        if agent is not None:
            agent.stop(leave=True)
        server.stop()
    if server.failure is not None:
        print(f"rdmapool server: the serving loop failed ({type(server.failure).__name__}: {server.failure}); "
              "stopped", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({"stopped": True, "server_id": info.server_id}), file=sys.stderr, flush=True)
    return 0


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="start a memory server (serves until SIGINT/SIGTERM)",
                       formatter_class=_DefaultsShown,
                       description="Start a memory server. Tenants (NAME:TOKEN:QUOTA) come from --tenant, "
                       "--tenants-file or the RDMAPOOL_TENANTS environment variable (comma-separated; keeps tokens "
                       "out of ps). Prints one JSON line when ready; serves until SIGINT/SIGTERM.")
    p.add_argument("--listen", default="127.0.0.1:7400", help="control address HOST:PORT (port 0: any free)")
    p.add_argument("--advertise", metavar="HOST", help="the host clients are told to connect to (default: the "
                   "--listen host; for 0.0.0.0, this host's address on its default route)")
    p.add_argument("--transport", default="tcp", help="one-sided transport: tcp, shm, verbs")
    p.add_argument("--data-port", type=int, metavar="PORT",
                   help="tcp: the port its data engine listens on, on the --listen host (0 or unset: any free port, "
                   "which clients learn in hello; set it where a firewall must name the port)")
    p.add_argument("--tenant", action="append", metavar="NAME:TOKEN:QUOTA", help="a tenant (repeatable)")
    p.add_argument("--tenants-file", help="TOML file with [tenants.NAME] token = ..., quota = ...")
    p.add_argument("--size-classes", help="comma-separated slot payload sizes (default: "
                   f"{','.join(map(format_size, DEFAULT_SIZE_CLASSES))})")
    p.add_argument("--lease-s", type=float, default=10.0, help="read lease per lookup hit (s)")
    p.add_argument("--grace-s", type=float, default=1.0, help="wait after the last lease before reuse (s)")
    p.add_argument("--reservation-s", type=float, default=10.0, help="time to commit an allocated slot (s)")
    p.add_argument("--ttl-s", type=float, default=None, help="absolute block lifetime from commit (s)")
    p.add_argument("--idle-ttl-s", type=float, default=None, help="block lifetime since last access (s)")
    p.add_argument("--idle-timeout-s", type=float, default=300.0, help="close control connections silent this long")
    p.add_argument("--hello-timeout-s", type=float, default=10.0,
                   help="close connections that have not authenticated this long after opening")
    p.add_argument("--policy", default="default", help="eviction policy (rdmapool.policy names)")
    p.add_argument("--policy-option", action="append", metavar="KEY=VALUE",
                   help="an option of the policy, e.g. ttl=600 for --policy ttl (repeatable)")
    p.add_argument("--memory", default="host", choices=["host", "cuda"], help="pool memory kind")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics and /healthz here")
    from rdmapool.cluster.serving import add_arguments

    add_arguments(p)
    p.set_defaults(func=run)
