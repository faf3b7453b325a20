"""Real memory-server processes for tests: `rdmapool server` on loopback, cleaned up by pid."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"a": "token-a-secret", "b": "token-b-secret"}


@dataclass
class ServerProc:
    proc: subprocess.Popen
    info: dict

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.info.get("transport") == "shm":
            from rdmapool.transport.shm import sweep_stale

            sweep_stale()


def start(transport: str = "tcp", quota: str = "32MiB", listen: str = "127.0.0.1:0", *extra: str,
          timeout: float = 20.0) -> ServerProc:
    env = {**os.environ, "RDMAPOOL_TENANTS": ",".join(f"{t}:{tok}:{quota}" for t, tok in TOKENS.items()),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rdmapool", "server", "--listen", listen, "--transport", transport, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line:
                return ServerProc(proc, json.loads(line))
        if proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=5)
    raise RuntimeError(f"server did not start: {err[-2000:]}")


def stop(server: ServerProc, timeout: float = 10.0) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout)
    with contextlib.suppress(Exception):
        server.proc.stdout.close()
        server.proc.stderr.close()


@contextlib.contextmanager
def running(transport: str = "tcp", quota: str = "32MiB", *extra: str) -> Iterator[ServerProc]:
    server = start(transport, quota, "127.0.0.1:0", *extra)
    try:
        yield server
    finally:
        stop(server)
