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
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are picked (one at a time, the kernel may
    hand a just-closed port out again). Another process can still take one before etcd binds it: `start`
    retries on new ports then."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


#: how often `start` picks new ports when a member finds one of its ports taken
START_ATTEMPTS = 3


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
        self._port_host = host if hosts is None else "127.0.0.1"  # members in namespaces: picked here
        ports = free_ports(2 * members, self._port_host)
        for i in range(members):
            h = hosts[i] if hosts else host
            self.members.append(Member(
                name=f"m{i}", host=h, client_port=ports[2 * i], peer_port=ports[2 * i + 1],
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
        """Start every member; where a port was taken between picking and binding it, start the whole (new)
        cluster over on other ports."""
        for attempt in range(START_ATTEMPTS):
            for m in self.members:
                self._spawn(m)
            self._started = True
            try:
                self.wait_healthy(timeout, self.members)  # one that already exited (its port taken) counts
                return self
            except ServerUnavailable as e:
                if "address already in use" not in str(e) or attempt + 1 == START_ATTEMPTS:
                    raise
            self._kill_all()
            ports = free_ports(2 * len(self.members), self._port_host)
            for i, m in enumerate(self.members):
                shutil.rmtree(m.data_dir, ignore_errors=True)
                m.client_port, m.peer_port = ports[2 * i], ports[2 * i + 1]
        raise AssertionError("unreachable")

    def _spawn(self, m: Member) -> None:
        log = open(m.log_path, "ab")  # noqa: SIM115 (closed with the process below)
        try:
            m.proc = subprocess.Popen(self._command(m), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        finally:
            log.close()

    def wait_healthy(self, timeout: float = 20.0, members: Sequence[Member] | None = None) -> None:
        """Until `members` (all of them, a dead one is an error) or else every member still running answer healthy."""
        deadline = time.monotonic() + timeout
        pending = list(members) if members is not None else [m for m in self.members if m.alive or m.proc is None]
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
        self._kill_all()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _kill_all(self) -> None:
        for m in self.members:
            if m.proc is not None:
                if m.proc.poll() is None:
                    m.proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=10)
                m.proc = None

    def __enter__(self) -> LocalEtcd:
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
