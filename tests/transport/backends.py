"""The backends the conformance suite runs against, by name. Adding a backend = adding a line here.

A backend whose module does not import (not written yet, a missing native build, no device) is skipped with
the import error as the reason. Capability flags describe differences the semantics allow; they default to
the strict RC behaviour.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    #: module that must import for the backend to be usable (its ImportError becomes the skip reason)
    module: str
    #: options passed to rdmapool.transport.create(transport, **options)
    options: tuple[tuple[str, object], ...] = ()
    #: the transport's name where this entry is a variant of one (default: `name`)
    transport: str = ""

    @property
    def transport_name(self) -> str:
        return self.transport or self.name


BACKENDS: list[BackendSpec] = [
    BackendSpec("tcp", "rdmapool.transport.tcp", (("sender_thread", False), ("digest_thread", False))),
    # the threads an endpoint gets by default where a process has more than two CPUs: the initiator's bytes go out
    # on a sender thread, READ digests are hashed on a digest thread
    BackendSpec("tcp-sender", "rdmapool.transport.tcp", (("sender_thread", True), ("digest_thread", True)),
                transport="tcp"),
    BackendSpec("shm", "rdmapool.transport.shm"),
    # skipped with NoDevice as the reason where no RDMA device exists; runs for real in tests/vm (rxe in QEMU)
    BackendSpec("verbs", "rdmapool.transport.verbs_probe"),
]


def unavailable(spec: BackendSpec) -> str | None:
    """None when the backend can be used here, else why not."""
    try:
        importlib.import_module(spec.module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip, printed as such
        return f"backend {spec.name!r} unavailable: {type(exc).__name__}: {exc}"
    return None
