"""Typed configuration for memory servers and clients: frozen dataclasses, validated once at construction.

Sizes accept integers or strings with binary suffixes ("64KiB", "1G"); times are seconds (floats).
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field

from rdmapool.errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str) -> int:
    """`4096`, `"64KiB"`, `"1g"`, `"32 MiB"` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"size must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not m:
        raise UsageError(f"cannot read size {value!r}; use bytes or a suffix like 64KiB, 1GiB")
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_size(n: int) -> str:
    """Bytes as the largest binary unit that divides them exactly: 4194304 -> "4MiB", 1000 -> "1000B"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep:
        host, port = default_host, value
    try:
        port_n = int(port)
    except ValueError:
        raise UsageError(f"bad address {value!r}: expected HOST:PORT") from None
    if not 0 <= port_n < 65536:
        raise UsageError(f"bad port in {value!r}")
    return host or default_host, port_n


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def advertised_host(listen_host: str, advertise: str | None = None) -> str:
    """The host clients are told to use: `advertise` if given, else the listen host, except that a wildcard
    (0.0.0.0) is no address to connect to: then this host's address on its default route, else its
    hostname's address, else loopback."""
    if advertise:
        return advertise
    if listen_host not in WILDCARD_HOSTS:
        return listen_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
            addr = s.getsockname()[0]
            if addr and not addr.startswith("0."):
                return addr
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _positive(name: str, value: float, zero_ok: bool = False) -> None:
    """A finite positive (or with `zero_ok`, non-negative) number of seconds: nan or inf would park slots
    forever (a grace of nan never ends)."""
    if not (isinstance(value, int | float) and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        raise UsageError(f"{name} must be a finite number {'>=' if zero_ok else '>'} 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant: the token that authenticates it and its quota, which is the size of its own registered region."""

    name: str
    token: str
    quota: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise UsageError(f"tenant name {self.name!r}: 1-64 of letters, digits, _ . -")
        if len(self.token) < 8:
            raise UsageError(f"tenant {self.name}: token must have at least 8 characters")
        if self.quota <= 0:
            raise UsageError(f"tenant {self.name}: quota must be > 0")

    @classmethod
    def parse(cls, spec: str) -> TenantConfig:
        """`NAME:TOKEN:QUOTA`, e.g. `alice:s3cret-token:256MiB`."""
        parts = spec.split(":")
        if len(parts) != 3:
            raise UsageError(f"tenant {spec.split(':')[0]!r}: expected NAME:TOKEN:QUOTA")
        return cls(parts[0], parts[1], parse_size(parts[2]))


DEFAULT_SIZE_CLASSES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 32 << 20)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    tenants: tuple[TenantConfig, ...]
    host: str = "127.0.0.1"
    port: int = 0
    #: the host clients are told to use (ready line, hello, cluster record); None: `host` (see `advertised_host`)
    advertise: str | None = None
    transport: str = "tcp"
    transport_options: dict = field(default_factory=dict)
    #: payload capacities of the slot classes; each tenant's region is split among them by bytes
    size_classes: tuple[int, ...] = DEFAULT_SIZE_CLASSES
    #: how the region is split among classes (weights, same length as size_classes); None = equal bytes
    class_weights: tuple[float, ...] | None = None
    lease_s: float = 10.0  # read lease granted with each lookup hit
    grace_s: float = 1.0  # extra wait after the last lease before a slot is reused
    reservation_s: float = 10.0  # how long an allocate'd slot waits for its commit
    ttl_s: float | None = None  # absolute lifetime of a block from its commit
    idle_ttl_s: float | None = None  # lifetime since the last lookup or touch
    policy: str = "default"
    #: keyword options of the policy, e.g. {"ttl": 600.0} for "ttl" (checked at construction)
    policy_options: dict = field(default_factory=dict)
    max_frame: int = 1 << 20
    max_keys: int = 4096  # per request
    memory: str = "host"  # "host" or "cuda"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no HTTP endpoint; 0: any free port
    idle_timeout_s: float = 300.0  # a control connection silent this long is closed
    hello_timeout_s: float = 10.0  # a connection that has not authenticated (hello) this long after opening is closed
    tick_s: float = 0.05  # how often expiries are swept
    prefault: bool = True  # touch every page of the pool at start (no page faults on first writes)

    def __post_init__(self) -> None:
        if not self.tenants:
            raise UsageError("a server needs at least one tenant (NAME:TOKEN:QUOTA)")
        names = [t.name for t in self.tenants]
        tokens = [t.token for t in self.tenants]
        if len(set(names)) != len(names) or len(set(tokens)) != len(tokens):
            raise UsageError("tenant names and tokens must be unique")
        if not self.size_classes or any(s <= 0 for s in self.size_classes):
            raise UsageError("size classes must be a non-empty list of positive sizes")
        if list(self.size_classes) != sorted(set(self.size_classes)):
            raise UsageError("size classes must be strictly increasing")
        if self.class_weights is not None and (
            len(self.class_weights) != len(self.size_classes) or any(w < 0 for w in self.class_weights)
            or sum(self.class_weights) <= 0
        ):
            raise UsageError("class_weights needs one non-negative weight per size class")
        for name in ("lease_s", "reservation_s", "tick_s", "idle_timeout_s", "hello_timeout_s"):
            _positive(name, getattr(self, name))
        _positive("grace_s", self.grace_s, zero_ok=True)
        for name in ("ttl_s", "idle_ttl_s"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.max_frame < 1024 or self.max_keys < 1:
            raise UsageError("max_frame must be >= 1024 and max_keys >= 1")
        if self.memory not in ("host", "cuda"):
            raise UsageError(f"memory must be host or cuda, got {self.memory!r}")
        from rdmapool.policy import create as create_policy

        create_policy(self.policy, **self.policy_options)  # a bad name or option fails here, naming it

    def settings(self) -> dict:
        """The effective settings a user needs to reason about hits, leases and expiries (the `stats` op and
        /healthz); never the tenants, whose tokens are secrets."""
        options = {k: v if v is None or isinstance(v, bool | int | float | str) else repr(v)
                   for k, v in self.policy_options.items()}  # plain values only: the reply is msgpack and JSON
        return {"lease_s": self.lease_s, "grace_s": self.grace_s, "reservation_s": self.reservation_s,
                "ttl_s": self.ttl_s, "idle_ttl_s": self.idle_ttl_s, "policy": self.policy,
                "policy_options": options, "size_classes": list(self.size_classes), "max_keys": self.max_keys,
                "idle_timeout_s": self.idle_timeout_s, "hello_timeout_s": self.hello_timeout_s}


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where a server's control port listens."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> ServerAddress:
        return cls(*parse_hostport(value))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def default_hash_threads() -> int:
    """4 checksum workers where the process may run on 8 or more CPUs, else 2. On the 16-CPU H200 host, client
    and server unpinned, 4 against 2 took tcp get of 1 MiB blocks from 9-14% to 2-12% over the raw READ and shm
    put of 1 MiB from 14-15% to 2-3% (64 MiB calls; docs/decisions.md); on two CPUs more workers only compete."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 4 if cpus >= 8 else 2


@dataclass(frozen=True, slots=True)
class ClientConfig:
    token: str
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 2.0  # one control round trip
    data_timeout_s: float = 5.0  # one batch of one-sided operations
    retry_after_s: float = 1.0  # a server that failed is not retried before this (misses meanwhile)
    verify_checksum: bool = True  # on reads into host memory (writes from host memory always carry one)
    staging_bytes: int = 64 << 20  # registered staging memory for unregistered user buffers
    #: pinned host memory through which CUDA tensors outside GPU memory registered with the client move (made on
    #: first use); a call moving more goes in rounds of this size
    device_staging_bytes: int = 256 << 20
    max_frame: int = 16 << 20
    #: workers hashing large payloads while transfers run (0: hash inline); by default 2, or 4 where the process
    #: may run on 8 or more CPUs (`default_hash_threads`)
    hash_threads: int = field(default_factory=default_hash_threads)
    #: use the checksums a transport computes as it moves bytes (`Endpoint.digests`); False: the client hashes
    #: payloads itself (`hash_threads`), in parallel with the transfer
    transport_digests: bool = True
    #: data endpoints per server where the transport offers several (`connect_many`: verbs queue pairs);
    #: None takes the transport's default (verbs `qps_per_peer`, 2). Transports without it use one.
    endpoints_per_server: int | None = None

    def __post_init__(self) -> None:
        if self.hash_threads < 0:
            raise UsageError("hash_threads must be >= 0")
        if self.endpoints_per_server is not None and not 1 <= self.endpoints_per_server <= 16:
            raise UsageError(f"endpoints_per_server must be 1..16, got {self.endpoints_per_server}")
        for name in ("connect_timeout_s", "request_timeout_s", "data_timeout_s"):
            _positive(name, getattr(self, name))
        if self.retry_after_s < 0:
            raise UsageError("retry_after_s must be >= 0")
        if self.staging_bytes < 0:
            raise UsageError("staging_bytes must be >= 0")
        if self.device_staging_bytes < 0:
            raise UsageError("device_staging_bytes must be >= 0")
