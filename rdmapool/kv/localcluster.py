"""A private local pool for the demo and benchmarks: memory servers as subprocesses on loopback, cleaned up always.

Theory of operation
-------------------
`LocalPool` starts N `rdmapool server` processes (port 0, a fresh random token for one tenant, passed through the
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
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    procs: list[subprocess.Popen] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> LocalPool:
        env = {**os.environ, "RDMAPOOL_TENANTS": f"{TENANT}:{self.token}:{self.quota}",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        extra = ["--size-classes", self.size_classes] if self.size_classes else []
        try:
            for _ in range(self.servers):
                cmd = [sys.executable, "-m", "rdmapool", "server", "--listen", "127.0.0.1:0",
                       "--transport", self.transport, *extra]
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

    def __enter__(self) -> LocalPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
