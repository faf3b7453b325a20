"""Network namespaces as "hosts" for tests: one bridge namespace, one namespace per host joined to it by a veth
pair, addresses 10.77.0.0/24. Nothing is created in the root namespace; `close()` deletes every namespace."""

from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.77.0"


def available() -> str | None:
    """None if usable, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"rpprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Hosts:
    def __init__(self, names: dict[str, int]) -> None:
        """names: host name -> last address byte."""
        self.tag = f"rp{os.getpid() % 100000}"
        self.hub = f"{self.tag}hub"
        self.ns = {h: f"{self.tag}{h}" for h in names}
        self.addr = {h: f"{SUBNET}.{b}" for h, b in names.items()}
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (h, ns) in enumerate(self.ns.items()):
            _ip("netns", "add", ns)
            self._made.append(ns)
            v, p = f"v{i}", f"p{i}"
            _ip("-n", self.hub, "link", "add", v, "type", "veth", "peer", "name", p)
            _ip("-n", self.hub, "link", "set", v, "netns", ns)
            _ip("-n", self.hub, "link", "set", p, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", v)
            _ip("-n", ns, "link", "set", v, "up")

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def cut(self, host: str, peer: str) -> None:
        """`host` can no longer send to `peer` (packets dropped at once by a blackhole route)."""
        _ip("-n", self.ns[host], "route", "add", "blackhole", f"{self.addr[peer]}/32")

    def heal(self, host: str, peer: str) -> None:
        _ip("-n", self.ns[host], "route", "del", "blackhole", f"{self.addr[peer]}/32")

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
