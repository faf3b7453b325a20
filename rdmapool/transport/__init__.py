"""Transports: one backend per module, chosen by name. See `base` for the semantics every backend keeps."""

from __future__ import annotations

from typing import Any

from rdmapool.errors import UsageError
from rdmapool.transport.base import (
    Access,
    Completion,
    Endpoint,
    EndpointState,
    MemoryKind,
    MemoryRegion,
    Opcode,
    RegionDescriptor,
    Sge,
    TransferPlan,
    Transport,
    WcStatus,
    WorkRequest,
)

BACKENDS = ("tcp", "shm", "verbs")


def create(name: str, **options: Any) -> Transport:
    """Make a transport by name; imports the backend lazily so a missing optional dependency only matters
    when that backend is asked for."""
    if name == "tcp":
        from rdmapool.transport.tcp import TcpTransport

        return TcpTransport(**options)
    if name == "shm":
        from rdmapool.transport.shm import ShmTransport

        return ShmTransport(**options)
    if name == "verbs":
        from rdmapool.transport.verbs import VerbsTransport

        return VerbsTransport(**options)
    raise UsageError(f"unknown transport {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "Access", "Completion", "Endpoint", "EndpointState", "MemoryKind", "MemoryRegion", "Opcode",
    "RegionDescriptor", "Sge", "Transport", "TransferPlan", "WcStatus", "WorkRequest", "create", "BACKENDS",
]
