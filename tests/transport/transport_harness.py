"""Helpers of the transport conformance suite: backend lookup by name, a subprocess peer, deterministic data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rdmapool.transport import RegionDescriptor, Transport, create

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PEER = HERE / "peer.py"


def _load_backends():
    spec = importlib.util.spec_from_file_location("rdmapool_test_transport_backends", HERE / "backends.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


backends = _load_backends()

#: >1 where the machine is known to be slow (the rxe QEMU VM under TCG sets RDMAPOOL_TIMEOUT_SCALE)
TIMEOUT_SCALE = max(1.0, float(os.environ.get("RDMAPOOL_TIMEOUT_SCALE", "1")))




def make(backend: str) -> Transport:
    spec = next(s for s in backends.BACKENDS if s.name == backend)
    return create(spec.transport_name, **dict(spec.options))


class Peer:
    """A serving transport in a subprocess (tests/transport/peer.py)."""

    def __init__(self, backend: str, regions: list[int], timeout: float = 20.0) -> None:
        timeout *= TIMEOUT_SCALE
        args = [sys.executable, str(PEER), "--backend", backend]
        for size in regions:
            args += ["--region", str(size)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT)
        hello = self._readline(timeout)
        self.pid: int = hello["pid"]
        self.peer_info: dict = hello["peer_info"]
        self.regions = [RegionDescriptor.from_wire(r) for r in hello["regions"]]

    def _readline(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise TimeoutError(f"peer did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer exited with {self.proc.wait(5)}")
        return json.loads(line)

    def call(self, timeout: float = 20.0, **msg: object) -> dict:
        timeout *= TIMEOUT_SCALE
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._readline(timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"peer command {msg} failed: {reply}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                pass
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


def settle(check, timeout: float = 3.0) -> bool:
    """Poll `check()` until it is true or `timeout` passes (for counts that drop asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def pattern(length: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (the peer process computes the same ones)."""
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
