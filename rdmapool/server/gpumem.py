"""GPU memory for a server's pool (`--memory cuda`), for GPUDirect-capable transports.

The transport is asked first (`allocate(kind=CUDA)`: a backend that exports dma-buf does it best). If it
cannot allocate device memory itself, the memory comes from torch (or CuPy) and is registered by pointer; the
allocation object is kept as the region's owner. Where no CUDA device exists, this raises `NoDevice` naming why.
"""

from __future__ import annotations

import os

from rdmapool.errors import NoDevice, UsageError
from rdmapool.transport.base import MemoryKind, MemoryRegion, Transport


def cuda_available() -> tuple[bool, str]:
    if not os.path.exists("/dev/nvidiactl"):  # cheap: no driver node, no GPU (and no multi-second torch import)
        return False, "no CUDA device on this machine (/dev/nvidiactl absent)"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return True, "torch"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return True, "cupy"
    except Exception:  # cupy missing or no driver: both mean no usable GPU here
        pass
    return False, "no CUDA device visible to torch or CuPy on this machine"


#: backends whose peers can reach a device-memory region one-sidedly (GPUDirect RDMA)
SERVES_DEVICE_MEMORY = ("verbs",)


def allocate_cuda(transport: Transport, length: int) -> MemoryRegion:
    if transport.name not in SERVES_DEVICE_MEMORY:
        # tcp cannot register device memory at all; shm would register it local-only, a pool no client reaches
        raise UsageError(f"--memory cuda needs a transport that serves GPU memory to peers ({', '.join(SERVES_DEVICE_MEMORY)}"
                         f" with GPUDirect); {transport.name} cannot. Keep the pool in host memory: clients still "
                         "read straight into their GPUs (shm copies run at pinned speed)")
    ok, how = cuda_available()
    if not ok:
        raise NoDevice(f"--memory cuda: {how}")
    try:
        return transport.allocate(length, MemoryKind.CUDA)
    except UsageError:
        pass  # this backend cannot allocate device memory itself: allocate here and register the pointer
    if how == "torch":
        import torch

        owner = torch.zeros(length, dtype=torch.uint8, device="cuda")
        addr = owner.data_ptr()
    else:
        import cupy

        owner = cupy.zeros(length, dtype=cupy.uint8)
        addr = owner.data.ptr
    return transport.register_pointer(addr, length, MemoryKind.CUDA, owner=owner)
