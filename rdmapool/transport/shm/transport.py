"""The shm transport object: allocation into shared memory, local registration, connecting to a co-located
owner, and cleanup (on close, at interpreter exit, and of segments left by owners that died).

What `register()` means here: a private buffer (bytearray, numpy array, ...) cannot be mapped by another
process, so it is registered *local-only*: it is a valid local SGE for this process's endpoints (the usual use:
a client's receive buffer), and its descriptor carries an rkey with bit 31 set that every peer rejects with
REM_ACCESS_ERR. Memory that peers must reach is made with `allocate()`. We do not copy a registered buffer into
shared memory: the application would keep writing the private copy and peers would read stale bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import weakref
from typing import Any

from rdmapool import _shmatomics as native
from rdmapool.errors import AuthError, NoDevice, ServerUnavailable, UsageError
from rdmapool.transport.base import (
    Access,
    Endpoint,
    Exchange,
    MemoryKind,
    MemoryRegion,
    RegionDescriptor,
    Transport,
)
from rdmapool.transport.shm import cuda, naming
from rdmapool.transport.shm.endpoint import LocalRegion, ShmEndpoint
from rdmapool.transport.shm.segment import Segment
from rdmapool.transport.shm.table import LOCAL_ONLY, MAX_REGIONS, RegionTable, TableView, table_size

log = logging.getLogger(__name__)

BACKEND = "shm"
DEFAULT_MODE = 0o600


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class ShmTransport(Transport):
    """Options: `shm_dir` (a tmpfs; /dev/shm), `mode` (file mode of the segments: the isolation boundary
    between local users), `cuda` ("auto" | "off" | "require": cudaHostRegister the mappings; default from
    RDMAPOOL_SHM_CUDA, else "auto"), `max_regions`."""

    name = BACKEND

    def __init__(self, shm_dir: str = naming.DEFAULT_DIR, mode: int = DEFAULT_MODE, cuda: str | None = None,
                 max_regions: int = MAX_REGIONS) -> None:
        if not os.path.isdir(shm_dir):
            raise UsageError(f"shm_dir {shm_dir!r} is not a directory")
        if not 0 <= mode <= 0o777:
            raise UsageError(f"mode must be a file mode like 0o600, got {mode!r}")
        if not 1 <= max_regions <= MAX_REGIONS:
            raise UsageError(f"max_regions must be in [1, {MAX_REGIONS}], got {max_regions}")
        if cuda is None:
            cuda = _cuda_from_env()
        _cuda_check(cuda)
        self.shm_dir = shm_dir
        self.mode = mode
        self.cuda_mode = cuda
        self.max_regions = max_regions
        self.local_regions: dict[int, LocalRegion] = {}
        self.local_epoch = 0
        self._owner = naming.Owner.current()
        self._base: str | None = None
        self._table: RegionTable | None = None
        self._ctl: Segment | None = None
        self._owned: dict[int, tuple[MemoryRegion, Segment | None]] = {}  # lkey -> (region, segment)
        self._endpoints: set[ShmEndpoint] = set()
        self._next_local = 0
        self._lock = threading.RLock()
        self._closed = False
        # Unlink our names even if close() is never called (not after SIGKILL: the sweep handles that).
        self._paths: set[str] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths, os.getpid())

    # --- serving side -------------------------------------------------------------------------------
    def _serve(self) -> RegionTable:
        """Create the control segment on first need (a pure client never creates any file)."""
        if self._table is None:
            naming.sweep_stale(self.shm_dir)
            self._base = naming.base_name(self._owner, secrets.token_hex(4))
            path = os.path.join(self.shm_dir, naming.ctl_name(self._base))
            self._ctl = Segment.create(path, table_size(self.max_regions), self.mode, "off")
            self._paths.add(path)
            self._table = RegionTable(self._ctl, self._owner, self.max_regions)
        return self._table

    def allocate(self, length: int, kind: MemoryKind = MemoryKind.HOST, access: Access = Access.ALL) -> MemoryRegion:
        if kind is not MemoryKind.HOST:
            raise UsageError("the shm transport allocates host memory only (GPU memory cannot live in /dev/shm)")
        if not isinstance(length, int) or length <= 0:
            raise UsageError(f"allocate needs a positive length, got {length!r}")
        with self._lock:
            self._check_open()
            table = self._serve()
            rkey = table.reserve()
            path = os.path.join(self.shm_dir, naming.region_name(self._base, rkey))
            try:
                seg = Segment.create(path, length, self.mode, self.cuda_mode)
            except BaseException:
                table.remove(rkey)
                raise
            self._paths.add(path)
            table.publish(rkey, seg.addr, length, access)
            desc = RegionDescriptor(seg.addr, length, rkey)
            region = MemoryRegion(seg.addr, length, rkey, desc, MemoryKind.HOST, access,
                                  view=memoryview(seg.mm)[:length], handle=self)
            self._owned[rkey] = (region, seg)
            self.local_regions[rkey] = LocalRegion(seg.addr, seg.addr + length, bool(access & Access.LOCAL_WRITE))
            return region

    def register(self, buffer: Any, access: Access = Access.ALL) -> MemoryRegion:
        writable = bool(access & Access.LOCAL_WRITE)
        try:
            view = memoryview(buffer)
            addr, length = native.address(buffer, writable)
        except (TypeError, BufferError) as exc:
            need = "a writable C-contiguous buffer" if writable else "a C-contiguous buffer"
            raise UsageError(f"register needs {need} (access={access!r}): {exc}") from None
        with self._lock:
            self._check_open()
            lkey = self._local_key()
            desc = RegionDescriptor(addr, length, lkey)
            region = MemoryRegion(addr, length, lkey, desc, MemoryKind.HOST, access,
                                  view=view.cast("B") if view.format != "B" else view, handle=self)
            self._owned[lkey] = (region, None)
            self.local_regions[lkey] = LocalRegion(addr, addr + length, writable)
            return region

    def register_pointer(
        self, addr: int, length: int, kind: MemoryKind, access: Access = Access.ALL, owner: Any = None
    ) -> MemoryRegion:
        """Memory by address, local-only like `register`: host memory (a pinned tensor's data_ptr()) or GPU
        memory (a CUDA tensor's data_ptr(): READ/WRITE then copy between it and the CUDA-registered mapping
        with the CUDA runtime, at pinned speed; no atomics into it). `owner` is kept alive with the region."""
        if kind is MemoryKind.CUDA and not cuda.available():
            raise NoDevice("register_pointer(kind=CUDA) needs a GPU and torch with CUDA or cupy")
        if not (isinstance(addr, int) and isinstance(length, int)) or addr <= 0 or length <= 0:
            raise UsageError(f"register_pointer needs a positive address and length, got {addr!r}, {length!r}")
        with self._lock:
            self._check_open()
            lkey = self._local_key()
            region = MemoryRegion(addr, length, lkey, RegionDescriptor(addr, length, lkey), kind, access,
                                  view=None, handle=(self, owner))
            self._owned[lkey] = (region, None)
            self.local_regions[lkey] = LocalRegion(addr, addr + length, bool(access & Access.LOCAL_WRITE),
                                                   cuda=kind is MemoryKind.CUDA)
            return region

    def _local_key(self) -> int:
        """A key for a local-only region: bit 31 set, never 0 below it, never reused while in use."""
        while True:
            self._next_local = self._next_local % (LOCAL_ONLY - 1) + 1
            lkey = LOCAL_ONLY | self._next_local
            if lkey not in self._owned:
                return lkey

    def deregister(self, region: MemoryRegion) -> None:
        with self._lock:
            entry = self._owned.pop(region.lkey, None)
            if entry is None or entry[0] is not region:
                if entry is not None:
                    self._owned[region.lkey] = entry
                raise UsageError(f"region with lkey {region.lkey:#x} is not registered with this transport")
            self.local_regions.pop(region.lkey, None)  # no later batch of ours can name it
            self.local_epoch += 1
            _region, seg = entry
            if seg is not None:
                self._table.remove(region.lkey)  # from here on, every peer check fails
                seg.unlink()
                self._paths.discard(seg.path)
            endpoints = list(self._endpoints)
        for ep in endpoints:  # a batch of ours that started before the pop may still be copying
            ep.quiesce()
        if region.view is not None:
            with contextlib.suppress(BufferError):
                region.view.release()  # views the application derived keep the pages mapped (see Segment)
        if seg is not None:
            seg.close()

    def peer_info(self) -> dict:
        with self._lock:
            self._check_open()
            self._serve()
            return {"transport": BACKEND, "base": self._base, "dir": self.shm_dir, "pid": self._owner.pid,
                    "start": self._owner.start, "boot_id": boot_id()}

    # --- client side --------------------------------------------------------------------------------
    def connect(self, peer_info: dict, exchange: Exchange | None = None, timeout: float = 5.0) -> Endpoint:
        base, shm_dir, owner = _parse_peer_info(peer_info)
        with self._lock:
            self._check_open()
        if peer_info.get("boot_id") and peer_info["boot_id"] != boot_id():
            raise ServerUnavailable("shm peer runs on another host (boot ids differ); use tcp or verbs")
        try:
            pidfd = os.pidfd_open(owner.pid)
        except ProcessLookupError:
            naming.sweep_stale(shm_dir, base)
            raise ServerUnavailable(f"shm peer pid {owner.pid} is not running") from None
        try:
            if not owner.alive():  # checked after pidfd_open: the pidfd now names the right process
                raise ServerUnavailable(f"shm peer pid {owner.pid} is not the process that published {base}")
            path = os.path.join(shm_dir, naming.ctl_name(base))
            try:
                seg = Segment.open(path, table_size(1), False, "off")
            except FileNotFoundError:
                raise ServerUnavailable(f"no shm control segment {path}: the peer closed, or is not on "
                                        "this host / in this IPC namespace") from None
            except PermissionError:
                raise AuthError(f"shm control segment {path} is not readable by this user: the owner's "
                                "file mode (ShmTransport(mode=...)) keeps this process out") from None
            try:
                table = TableView(seg, owner)
            except ValueError as exc:
                seg.close()
                raise ServerUnavailable(f"shm control segment {path}: {exc}") from None
            if not table.is_open():
                seg.close()
                raise ServerUnavailable(f"shm peer {base} has closed")
        except BaseException:
            os.close(pidfd)
            raise
        ep = ShmEndpoint(self, owner, base, shm_dir, table, pidfd)
        with self._lock:
            self._endpoints.add(ep)
        return ep

    def forget_endpoint(self, ep: ShmEndpoint) -> None:
        with self._lock:
            self._endpoints.discard(ep)

    # --- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            endpoints = list(self._endpoints)
        for ep in endpoints:
            ep.close()
        with self._lock:
            if self._table is not None:
                self._table.close()
            for region, seg in self._owned.values():
                if region.view is not None:
                    with contextlib.suppress(BufferError):
                        region.view.release()
                if seg is not None:
                    seg.unlink()
                    seg.close()
            self._owned.clear()
            self.local_regions.clear()
            self.local_epoch += 1
            if self._ctl is not None:
                self._ctl.unlink()
                self._ctl.close()
            self._paths.clear()
            self._finalizer.detach()
            naming.sweep_stale(self.shm_dir)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the shm transport is closed")

    @property
    def base(self) -> str | None:
        """The name prefix of this transport's segments (None until it serves)."""
        return self._base


def _cuda_from_env() -> str:
    mode = os.environ.get("RDMAPOOL_SHM_CUDA", "auto")
    if mode not in cuda.MODES:
        raise UsageError(f"RDMAPOOL_SHM_CUDA must be one of {', '.join(cuda.MODES)}, got {mode!r}")
    return mode


def _cuda_check(mode: str) -> None:
    cuda.check_mode(mode)


def _parse_peer_info(info: Any) -> tuple[str, str, naming.Owner]:
    if not isinstance(info, dict) or info.get("transport") != BACKEND:
        raise UsageError(f"not shm peer info: {info!r}")
    base, shm_dir, pid, start = info.get("base"), info.get("dir"), info.get("pid"), info.get("start")
    if not (isinstance(base, str) and isinstance(shm_dir, str) and isinstance(pid, int) and isinstance(start, int)):
        raise UsageError(f"shm peer info needs base, dir, pid, start: {info!r}")
    parsed = naming.parse(naming.ctl_name(base))
    if parsed is None or parsed[1] != naming.Owner(pid, start):
        raise UsageError(f"shm peer info has a malformed base name {base!r}")
    if parsed[0] != naming.pid_namespace():
        raise ServerUnavailable(f"shm peer {base} is in another pid namespace: shm peers must share pid and "
                                "IPC namespaces (same host or container)")
    return base, shm_dir, naming.Owner(pid, start)


def _unlink_all(paths: set[str], creator_pid: int) -> None:
    if os.getpid() != creator_pid:  # a forked child must not remove its parent's segments
        return
    for path in list(paths):
        with contextlib.suppress(OSError):
            os.unlink(path)
