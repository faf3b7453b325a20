"""Start throw-away etcd clusters on loopback for tests and `rdmapool demo`.

Theory of operation
-------------------
`LocalEtcd(members=N)` picks free loopback ports, starts N `etcd` processes (Debian's etcd-server 3.4) with
data dirs under one temporary directory, and waits until every member answers `/health`. Members run with
pre-vote on (a rejoining member does not depose a healthy leader) and auto-compaction on (revision mode, so
history is bounded; tests can also compact explicitly). Members can be SIGKILLed and restarted with the same
data dir and ports. Leaving the context manager kills every process it started and removes the directory.
`ip` may wrap each member (e.g. `["ip", "netns", "exec", "ns1"]`) for network-namespace tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rdmapool.errors import NoDevice, ServerUnavailable

ETCD_BIN = os.environ.get("RDMAPOOL_ETCD", "etcd")


def etcd_binary() -> str:
    path = shutil.which(ETCD_BIN)
    if path is None:
        raise NoDevice(f"no etcd binary ({ETCD_BIN!r}) on PATH; install etcd-server (scripts/setup.sh)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    prefix: Sequence[str] = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalEtcd:
    """A local etcd cluster of `members` processes; use as a context manager."""

    def __init__(
        self,
        members: int = 1,
        host: str = "127.0.0.1",
        compaction_revisions: int = 1000,
        progress_notify_s: float = 1.0,
        prefixes: Sequence[Sequence[str]] | None = None,
        hosts: Sequence[str] | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self._tmp = Path(tempfile.mkdtemp(prefix="rdmapool-etcd-"))
        self.compaction_revisions = compaction_revisions
        self.progress_notify_s = progress_notify_s
        self.members: list[Member] = []
        for i in range(members):
            h = hosts[i] if hosts else host
            self.members.append(Member(
                name=f"m{i}", host=h, client_port=free_port(host if hosts is None else "127.0.0.1"),
                peer_port=free_port(host if hosts is None else "127.0.0.1"),
                data_dir=self._tmp / f"m{i}.etcd", log_path=self._tmp / f"m{i}.log",
                prefix=tuple(prefixes[i]) if prefixes else (),
            ))
        self._token = f"rdmapool-{os.getpid()}-{int(time.time() * 1000) % 10**9}"
        self._started = False

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _command(self, m: Member) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [*m.prefix, etcd_binary(),
                "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", cluster, "--initial-cluster-token", self._token,
                "--initial-cluster-state", "new",
                "--pre-vote=true",
                "--auto-compaction-mode", "revision",
                "--auto-compaction-retention", str(self.compaction_revisions),
                "--experimental-watch-progress-notify-interval", f"{int(self.progress_notify_s * 1000)}ms",
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--snapshot-count", "10000", "--logger", "zap", "--log-outputs", "stderr"]

    def start(self, timeout: float = 20.0) -> LocalEtcd:
        for m in self.members:
            self._spawn(m)
        self._started = True
        self.wait_healthy(timeout)
        return self

    def _spawn(self, m: Member) -> None:
        log = open(m.log_path, "ab")  # noqa: SIM115 (closed with the process below)
        try:
            m.proc = subprocess.Popen(self._command(m), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        finally:
            log.close()

    def wait_healthy(self, timeout: float = 20.0, members: Sequence[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = [m for m in (members or self.members) if m.alive or m.proc is None]
        while pending:
            pending = [m for m in pending if not self._healthy(m)]
            for m in pending:
                if m.proc is not None and m.proc.poll() is not None:
                    raise ServerUnavailable(f"etcd {m.name} exited with {m.proc.returncode}: {self.log_tail(m)}")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"etcd members {[m.name for m in pending]} not healthy after {timeout}s")
            time.sleep(0.05)

    @staticmethod
    def _healthy(m: Member) -> bool:
        if m.prefix:  # inside a network namespace: probe from there
            probe = ("import sys, urllib.request\n"
                     f"sys.stdout.write(urllib.request.urlopen('{m.client_url}/health', timeout=1).read().decode())")
            cmd = [*m.prefix, sys.executable, "-c", probe]
            try:
                out = subprocess.run(cmd, capture_output=True, timeout=3).stdout
            except (OSError, subprocess.TimeoutExpired):
                return False
            return b'"health":"true"' in out
        try:
            with urllib.request.urlopen(f"{m.client_url}/health", timeout=1) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def log_tail(self, m: Member, n: int = 2000) -> str:
        try:
            return m.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self, index: int) -> None:
        """SIGKILL one member (no clean shutdown)."""
        m = self.members[index]
        if m.alive:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(timeout=10)

    def restart(self, index: int, timeout: float = 20.0) -> None:
        """Start a killed member again on the same ports and data dir (it rejoins as an existing member)."""
        m = self.members[index]
        if m.alive:
            return
        if not m.data_dir.exists():
            raise ServerUnavailable(f"etcd {m.name} has no data dir to restart from")
        self._spawn(m)
        self.wait_healthy(timeout, [m])

    def compact(self, revision: int) -> None:
        """Compact history up to `revision` (physical), as auto-compaction would."""
        import json

        body = json.dumps({"revision": str(revision), "physical": True}).encode()
        for url in self.endpoints:
            try:
                req = urllib.request.Request(f"{url}/v3/kv/compaction", data=body, method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
                return
            except OSError:
                continue
        raise ServerUnavailable("no etcd member accepted the compaction")

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None:
                if m.proc.poll() is None:
                    m.proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=10)
                m.proc = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
