"""Hosts in network namespaces (veth pairs on a bridge): etcd, three memory servers and a client each on their
own "host". A client cut off from one server fails over to a replica; a server cut off from etcd loses its
membership, drops out of the map and refuses writes, then rejoins when the network heals."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdmapool.cluster.local_etcd import LocalEtcd
from tests.cluster import netns
from tests.support import procs

pytestmark = [pytest.mark.etcd, pytest.mark.netns, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TTL = 2
_reason = None if shutil.which("etcd") else "etcd binary not installed (apt install etcd-server)"
_reason = _reason or netns.available()


def _read_json(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        if proc.poll() is not None:
            break
    raise RuntimeError(f"no JSON line from {proc.args[:6]} within {timeout}s (rc={proc.poll()})")


class Client:
    def __init__(self, prefix: list[str], endpoint: str, cluster: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.cluster.netns_client", endpoint, cluster,
                                      procs.TOKENS["a"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
        assert _read_json(self.proc, 30).get("ready")

    def __call__(self, timeout: float = 30, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return _read_json(self.proc, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()


def start_server(prefix: list[str], listen: str, endpoint: str, cluster: str, i: int) -> subprocess.Popen:
    env = {**os.environ, "RDMAPOOL_TENANTS": ",".join(f"{t}:{tok}:8MiB" for t, tok in procs.TOKENS.items()),
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    cmd = [*prefix, sys.executable, "-m", "rdmapool", "server", "--listen", listen, "--transport", "tcp",
           "--size-classes", "8KiB,1MiB", "--etcd", endpoint, "--cluster", cluster, "--member-ttl", str(TTL),
           "--shards", "1024", "--replicas", "2", "--rack", f"r{i}", "--member-id", f"s{i}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
    assert _read_json(proc, 30).get("ready")
    return proc


@pytest.mark.skipif(_reason is not None, reason=_reason or "")
def test_partitions_in_network_namespaces() -> None:
    hosts = netns.Hosts({"e": 2, "s0": 10, "s1": 11, "s2": 12, "c": 20})
    servers: list[subprocess.Popen] = []
    client = None
    etcd = None
    try:
        etcd = LocalEtcd(1, hosts=[hosts.addr["e"]], prefixes=[hosts.prefix("e")]).start(timeout=30)
        endpoint = etcd.endpoints[0]
        for i in range(3):
            servers.append(start_server(hosts.prefix(f"s{i}"), f"{hosts.addr[f's{i}']}:7400", endpoint, "nn", i))
        client = Client(hosts.prefix("c"), endpoint, "nn")
        assert client(op="wait_map", n=3)["map_servers"] == ["s0", "s1", "s2"]
        keys = [os.urandom(16).hex() for _ in range(40)]
        put = client(op="put", keys=keys)
        assert put["status"] == ["stored"] * len(keys)
        on_s0_first = [k for k, r in zip(keys, put["replicas"], strict=True) if r[0] == "s0"]
        assert on_s0_first

        # 1. the client loses its route to s0 (s0 is fine and stays in the map): reads fail over
        hosts.cut("c", "s0")
        got = client(op="get", keys=keys)
        print(f"client cut from s0: {got['hits']}/{len(keys)} hits, {got['failovers']} failovers, "
              f"{got['elapsed_s']}s")
        assert got["hits"] == got["correct"] == len(keys)
        assert got["failovers"] >= len(on_s0_first)
        assert got["map_servers"] == ["s0", "s1", "s2"]
        hosts.heal("c", "s0")

        # 2. s1 loses etcd (clients still reach it): membership lapses, map drops it, it refuses writes
        hosts.cut("s1", "e")
        t0 = time.monotonic()
        gone = None
        refused = None
        while time.monotonic() - t0 < TTL + 4:
            st = client(op="map")
            if gone is None and "s1" not in st["members"]:
                gone = time.monotonic() - t0
            if refused is None:
                d = client(op="put_direct", address=f"{hosts.addr['s1']}:7400", keys=[os.urandom(16).hex()])
                if d["status"] == ["unavailable"]:
                    refused = time.monotonic() - t0
            if gone is not None and refused is not None and "s1" not in st["map_servers"]:
                break
            time.sleep(0.05)
        converged = time.monotonic() - t0
        print(f"s1 cut from etcd: refuses writes after {refused}s, membership gone after {gone}s, "
              f"map without s1 after {converged:.2f}s (TTL {TTL}s)")
        assert refused is not None and refused <= TTL + 0.5
        assert gone is not None and gone <= TTL + 1.0
        assert converged <= TTL + 1.5
        more = [os.urandom(16).hex() for _ in range(10)]
        assert client(op="put", keys=more)["status"] == ["stored"] * 10
        assert client(op="get", keys=more)["hits"] == 10

        # 3. the network heals: s1 re-registers and is placed again
        hosts.heal("s1", "e")
        assert client(op="wait_map", n=3)["map_servers"] == ["s0", "s1", "s2"]
        d = client(op="put_direct", address=f"{hosts.addr['s1']}:7400", keys=[os.urandom(16).hex()])
        assert d["status"] == ["stored"]
    finally:
        if client is not None:
            client.close()
        for p in servers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in servers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            p.stdout.close()
        if etcd is not None:
            etcd.stop()
        hosts.close()
