"""Helpers of the shm tests: the transport pair, a serving process in a child, /dev/shm and fd counts."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Iterator

from rdmapool.transport import create
from rdmapool.transport.shm import ShmTransport, naming

SHM = naming.DEFAULT_DIR


class _Ctx:
    """fork when this process has one thread (fast, and the children inherit the imports); spawn otherwise,
    since forking a process with other threads can deadlock the child."""

    def __getattr__(self, name: str):
        return getattr(mp.get_context("fork" if threading.active_count() == 1 else "spawn"), name)


CTX = _Ctx()
TIMEOUT = 5.0


def ours(pid: int | None = None) -> list[str]:
    pid = os.getpid() if pid is None else pid
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"{naming.PREFIX}{naming.pid_namespace()}.{pid}."))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def transport_pair() -> Iterator[tuple[ShmTransport, ShmTransport]]:
    """Body of the `shm_pair` fixtures: (serving, initiating) transports in this process; checks no segment
    of ours outlives them."""
    srv, cli = create("shm"), create("shm")
    yield srv, cli
    cli.close()
    srv.close()
    assert ours() == []


# --- a serving process in a child -------------------------------------------------------------------------
def _owner_main(conn, size: int, fill: int) -> None:
    t = ShmTransport(cuda="off")
    r = t.allocate(size)
    r.view[:] = bytes([fill]) * size
    conn.send((t.peer_info(), r.descriptor.to_wire()))
    if conn.poll(60):  # any message (or the parent going away) ends the owner cleanly
        with contextlib.suppress(EOFError):
            conn.recv()
    t.close()


@contextlib.contextmanager
def owner_process(size: int = 1 << 20, fill: int = 7):
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_owner_main, args=(child, size, fill), daemon=True)
    proc.start()
    try:
        if not parent.poll(TIMEOUT):
            raise TimeoutError("owner process did not publish its region")
        info, wire = parent.recv()
        yield proc, info, wire
    finally:
        if proc.is_alive():
            with contextlib.suppress(OSError):
                parent.send("quit")
            proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(TIMEOUT)
        parent.close()
        child.close()
