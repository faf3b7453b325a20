"""The Prometheus endpoint: every known event counter is exported from the start (at 0), so `increase()` sees
the first event; HEAD is answered like GET, without a body."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rdmapool.config import ServerConfig, TenantConfig
from rdmapool.server import MemoryServer
from rdmapool.server.metrics import EVENTS

SERVER = Path(__file__).resolve().parents[2] / "rdmapool" / "server"


@pytest.fixture(scope="module")
def server():
    cfg = ServerConfig(tenants=(TenantConfig("a", "token-a-secret", 1 << 20),), size_classes=(4096,),
                       transport="tcp", metrics_port=0, prefault=False)
    with MemoryServer(cfg) as srv:
        yield srv


def url(srv: MemoryServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.info.metrics_port}{path}"


def test_event_counters_start_at_zero(server: MemoryServer) -> None:
    text = urllib.request.urlopen(url(server, "/metrics"), timeout=5).read().decode()
    for event in ("internal_errors", "deadline_heap_rebuilds", "evictions", "commits", "protocol_errors",
                  "allocate_full", "op_lookup", "op_stats"):
        assert f'rdmapool_events_total{{event="{event}"}} 0.0' in text, event


def test_every_counter_the_server_increments_is_known() -> None:
    """A guard against drift: each literal counter name in the server's sources is in EVENTS (the f-string
    families allocate_<status> and op_<op> come from AllocStatus and the op table)."""
    names = set()
    for module in ("core.py", "protocol.py", "driver.py"):
        for line in (SERVER / module).read_text().splitlines():
            if "counters[" in line and 'counters[f"' not in line:
                names.update(re.findall(r'"([a-z_]+)"', line.split("counters[", 1)[1]))
            elif "self._retire(" in line and "def " not in line:
                names.update(re.findall(r'"([a-z_]+)"\)', line))
    assert {"commits", "evictions", "internal_errors", "deadline_heap_rebuilds"} <= names
    assert names <= set(EVENTS)


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_head_is_get_without_a_body(server: MemoryServer, path: str) -> None:
    get = urllib.request.urlopen(url(server, path), timeout=5)
    head = urllib.request.urlopen(urllib.request.Request(url(server, path), method="HEAD"), timeout=5)
    assert head.status == 200 and head.read() == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"] and int(head.headers["Content-Length"]) > 0


def test_head_of_an_unknown_path_is_404(server: MemoryServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url(server, "/nope"), method="HEAD"), timeout=5)
    assert err.value.code == 404


def test_healthz_shows_the_settings_and_no_token(server: MemoryServer) -> None:
    raw = urllib.request.urlopen(url(server, "/healthz"), timeout=5).read()
    config = json.loads(raw)["config"]
    assert config["size_classes"] == [4096] and config["policy"] == "default" and config["lease_s"] == 10.0
    assert b"token-a-secret" not in raw
