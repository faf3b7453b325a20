"""Prometheus `/metrics` and `/healthz` for one memory server.

A custom collector reads the core's snapshot at scrape time (under the server lock), so the hot path keeps
plain integer counters and pays nothing for metrics. Each server has its own registry: several servers may
live in one process (tests) without clashing.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rdmapool.server.core import AllocStatus

if TYPE_CHECKING:
    from rdmapool.server.driver import MemoryServer

STATES = ("free", "writing", "resident", "retired")
#: the counters the server core, protocol and driver increment, besides allocate_<status> and op_<op>: exported
#: at 0 before their first event, since Prometheus' increase() cannot see an event that creates its series
EVENTS = ("lookup_hits", "lookup_misses", "leases_granted", "commits", "commit_rejected", "aborts", "deletes",
          "touches", "evictions", "admission_rejected", "expired_ttl", "reservations_expired", "writes_refused",
          "deadline_heap_rebuilds", "protocol_errors", "auth_failures", "internal_errors", "hello_timeouts",
          "connections_refused")


def known_events(server: MemoryServer) -> list[str]:
    """Every event counter this server can report, whether or not it has happened yet."""
    return [*EVENTS, *(f"allocate_{s.name.lower()}" for s in AllocStatus), *(f"op_{op}" for op in server.handler.ops)]


class PoolCollector:
    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def collect(self):
        snap = self.server.snapshot()
        slots = GaugeMetricFamily("rdmapool_slots", "Slots by tenant, size class and state",
                                  labels=["tenant", "size_class", "state"])
        nbytes = GaugeMetricFamily("rdmapool_resident_bytes", "Payload bytes of resident blocks",
                                   labels=["tenant", "size_class"])
        leased = GaugeMetricFamily("rdmapool_leased_slots", "Slots with an unexpired read lease",
                                   labels=["tenant", "size_class"])
        region = GaugeMetricFamily("rdmapool_region_bytes", "Registered bytes per tenant (the quota)", labels=["tenant"])
        for tenant, t in snap["tenants"].items():
            region.add_metric([tenant], t["region_bytes"])
            for c in t["classes"]:
                sc = str(c["capacity"])
                for state in STATES:
                    slots.add_metric([tenant, sc, state], c[state])
                nbytes.add_metric([tenant, sc], c["resident_bytes"])
                leased.add_metric([tenant, sc], c["leased"])
        yield from (slots, nbytes, leased, region)
        conns = GaugeMetricFamily("rdmapool_connections", "Open control connections")
        conns.add_metric([], snap["connections"])
        yield conns
        ops = CounterMetricFamily("rdmapool_events", "Server events (operations, hits, evictions, errors...)",
                                  labels=["event"])
        for name, value in sorted((dict.fromkeys(known_events(self.server), 0) | snap["counters"]).items()):
            ops.add_metric([name], value)
        yield ops


class MetricsServer:
    """A tiny HTTP server: /metrics (Prometheus text) and /healthz (JSON)."""

    def __init__(self, server: MemoryServer, host: str, port: int) -> None:
        registry = CollectorRegistry()
        registry.register(PoolCollector(server))
        pool = server

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802 (probes and load balancers ask HEAD: same headers, no body)
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
                elif self.path.split("?")[0] in ("/healthz", "/health"):
                    info = pool.info.to_dict() if pool.info else {}
                    body = json.dumps({"status": "ok", "uptime_s": round(time.time() - pool.started_at, 3),
                                       **{k: info.get(k) for k in ("server_id", "host", "port", "transport",
                                                                     "epoch")},
                                       "config": pool.config.settings()}).encode()
                    ctype = "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 1.0
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="rdmapool-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5.0)
