"""A private local pool for the demo and benchmarks: etcd and memory servers as subprocesses on loopback,
cleaned up always.

Theory of operation
-------------------
With `etcd=True`, `LocalPool` first starts a one-member etcd on loopback (`rdmapool.cluster.local_etcd`) under a
fresh cluster name; the servers join it (`rdmapool server --etcd`: membership leases, a coordinator, the shard map)
and clients route by the shard map (`client()` builds a `ReplicatedPoolClient`). Without etcd, clients get the
static server list. `LocalPool` starts N `rdmapool server` processes (port 0, a fresh random token for one tenant, passed through the
environment so it never shows in `ps`), waits for each one's ready line (bounded), and on `close()` sends SIGTERM,
waits (bounded), then SIGKILLs and sweeps the shm segments of dead owners. Servers get PR_SET_PDEATHSIG, so even a
demo killed with SIGKILL takes them along; they run in their own session so a terminal's Ctrl-C reaches only the
demo, which then stops them in order. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rdmapool.errors import ServerUnavailable

ROOT = Path(__file__).resolve().parents[2]
TENANT = "demo"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalPool:
    transport: str = "tcp"
    servers: int = 2
    quota: str = "256MiB"
    size_classes: str | None = None
    etcd: bool = False
    replicas: int = 1
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    cluster: str = field(default_factory=lambda: f"demo-{secrets.token_hex(4)}")
    etcd_endpoints: list[str] = field(default_factory=list)
    _etcd: object | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> LocalPool:
        env = {**os.environ, "RDMAPOOL_TENANTS": f"{TENANT}:{self.token}:{self.quota}",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        extra = ["--size-classes", self.size_classes] if self.size_classes else []
        try:
            if self.etcd:
                from rdmapool.cluster.local_etcd import LocalEtcd

                self._etcd = LocalEtcd(members=1).start(timeout)
                self.etcd_endpoints = list(self._etcd.endpoints)
            for i in range(self.servers):
                cluster = ["--etcd", ",".join(self.etcd_endpoints), "--cluster", self.cluster, "--member-id",
                           f"s{i}", "--replicas", str(self.replicas), "--shards", "1024"] if self.etcd else []
                cmd = [sys.executable, "-m", "rdmapool", "server", "--listen", "127.0.0.1:0",
                       "--transport", self.transport, *extra, *cluster]
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, preexec_fn=_die_with_parent, start_new_session=True)
                self.procs.append(proc)
            for proc in self.procs:
                info = self._ready(proc, time.monotonic() + timeout)
                self.infos.append(info)
                self.addresses.append(info["address"])
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _ready(proc: subprocess.Popen, deadline: float) -> dict:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                if line:
                    return json.loads(line)
            if proc.poll() is not None:
                break
        err = ""
        with contextlib.suppress(Exception):
            if proc.poll() is not None:
                err = proc.stderr.read()[-1500:]
        raise ServerUnavailable(f"memory server did not become ready: {err.strip() or 'timeout'}")

    def close(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                with contextlib.suppress(Exception):
                    stream.close()
        if self.transport == "shm":
            with contextlib.suppress(Exception):
                from rdmapool.transport.shm import sweep_stale

                sweep_stale()
        self.procs.clear()
        if self._etcd is not None:
            with contextlib.suppress(Exception):
                self._etcd.stop()
            self._etcd = None

    def spec(self) -> PoolSpec:
        return PoolSpec(tuple(self.addresses), self.transport, self.token, tuple(self.etcd_endpoints), self.cluster,
                        len(self.addresses))

    def __enter__(self) -> LocalPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PoolSpec:
    """How a worker process reaches the pool (picklable)."""

    addresses: tuple[str, ...]
    transport: str
    token: str
    etcd: tuple[str, ...] = ()
    cluster: str = ""
    servers: int = 0


def connect(spec: PoolSpec, staging_bytes: int = 64 << 20, timeout: float = 30.0):
    """A pool client for `spec`: routed by the shard map in etcd when there is one, else by the static list.
    With etcd, waits (bounded) until the map names every server."""
    from rdmapool.config import ClientConfig

    cfg = ClientConfig(token=spec.token, staging_bytes=staging_bytes)
    if not spec.etcd:
        from rdmapool.client import PoolClient

        return PoolClient(list(spec.addresses), cfg, transport_name=spec.transport)
    from rdmapool.cluster.client import ReplicatedPoolClient

    return ReplicatedPoolClient.from_etcd(spec.etcd, cfg, spec.cluster, spec.transport, spec.servers, timeout)


def close_client(client) -> None:
    """Close a client from `connect` (a routed one stops its etcd mirrors too), whatever state it is in."""
    with contextlib.suppress(Exception):
        client.close()
