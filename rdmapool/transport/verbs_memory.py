"""Memory for the verbs backend: pinned host pools (huge pages where possible) and GPU memory registration.

Theory of operation
-------------------
Host: a memory server allocates its whole pool once with `mmap` (MAP_HUGETLB when the length is a multiple of
2 MiB and the kernel has huge pages reserved, else normal pages with MADV_HUGEPAGE) and registers it once; the
memlock limit is checked first so a server fails at start with the fix in the message instead of with ENOMEM
on some later request.

GPU: preferred path is dma-buf. The CUDA driver exports a 4 KiB-aligned range of an allocation as a dma-buf fd
(`cuMemGetHandleForAddressRange`), and `ibv_reg_dmabuf_mr` registers it. pyverbs' DmaBufMR passes the dma-buf
offset as the MR's I/O virtual address, so both local SGEs and peers address such a region by *offset*
(region.addr == descriptor.addr == 0 + offset), never by the CUDA pointer. Fallback: classic registration of the
CUDA pointer, which works only where the nvidia-peermem module is loaded. Neither runs on rxe.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass
from typing import Any

from rdmapool.errors import NoDevice, UsageError

HUGE_PAGE = 2 << 20
GPU_ALIGN = 4096
CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD = 1


@dataclass(frozen=True, slots=True)
class HostBuffer:
    mm: mmap.mmap
    addr: int
    length: int
    huge_pages: bool


def buffer_address(buffer: Any) -> tuple[memoryview, int]:
    """A writable, contiguous byte view of `buffer` and its address; UsageError for anything else."""
    try:
        view = memoryview(buffer)
    except TypeError as exc:
        raise UsageError(f"cannot register {type(buffer).__name__}: it does not support the buffer protocol") from exc
    if view.readonly:
        raise UsageError("cannot register a read-only buffer: peers may write into registered memory")
    if not view.c_contiguous:
        raise UsageError("cannot register a non-contiguous buffer")
    view = view.cast("B")
    if view.nbytes == 0:
        raise UsageError("cannot register an empty buffer")
    return view, ctypes.addressof(ctypes.c_char.from_buffer(view))


def map_host(length: int) -> HostBuffer:
    """Anonymous shared memory for a pool, on huge pages when possible."""
    if length <= 0:
        raise UsageError(f"pool length must be positive, got {length}")
    flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
    if length % HUGE_PAGE == 0 and hasattr(mmap, "MAP_HUGETLB"):
        with contextlib.suppress(OSError):
            mm = mmap.mmap(-1, length, flags | mmap.MAP_HUGETLB)
            return HostBuffer(mm, _mmap_addr(mm), length, True)
    mm = mmap.mmap(-1, length, flags)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    return HostBuffer(mm, _mmap_addr(mm), length, False)


def _mmap_addr(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


@dataclass(frozen=True, slots=True)
class GpuRange:
    """Where a registered GPU range is addressed: `iova` is what SGEs and peers use for its first byte."""

    iova: int
    length: int
    method: str  # "dmabuf" or "peermem"


def check_gpu_range(addr: int, length: int) -> None:
    if addr <= 0 or length <= 0:
        raise UsageError(f"GPU range needs a positive address and length, got {addr:#x}+{length}")
    if addr % GPU_ALIGN or length % GPU_ALIGN:
        raise UsageError(f"GPU ranges must be {GPU_ALIGN}-byte aligned in address and length for dma-buf export "
                         f"(got {addr:#x}+{length:#x}): carve 4 KiB-aligned ranges out of one large allocation")


def cuda_dmabuf_fd(addr: int, length: int) -> int:
    """Export [addr, addr+length) of a CUDA allocation as a dma-buf fd through the driver API."""
    path = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(path)
        export = cuda.cuMemGetHandleForAddressRange
    except (OSError, AttributeError) as exc:
        raise NoDevice(f"dma-buf export needs libcuda with cuMemGetHandleForAddressRange (CUDA >= 11.7): {exc}") from exc
    fd = ctypes.c_int(-1)
    rc = export(ctypes.byref(fd), ctypes.c_uint64(addr), ctypes.c_size_t(length),
                ctypes.c_int(CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD), ctypes.c_ulonglong(0))
    if rc != 0 or fd.value < 0:
        raise NoDevice(f"cuMemGetHandleForAddressRange failed with CUresult {rc} (needs an open-source-kernel-module "
                       "driver and dma-buf support)")
    return fd.value


def register_gpu(pd: Any, addr: int, length: int, access: int, mr_module: Any, export=cuda_dmabuf_fd
                 ) -> tuple[Any, GpuRange, int]:
    """Register GPU memory: dma-buf first, peer memory second. Returns (MR, range, dma-buf fd or -1)."""
    check_gpu_range(addr, length)
    errors = []
    try:
        fd = export(addr, length)
        try:
            mr = mr_module.DmaBufMR(pd, length, access, dmabuf=fd, offset=0)
        except Exception:
            os.close(fd)
            raise
        return mr, GpuRange(iova=0, length=length, method="dmabuf"), fd
    except Exception as exc:  # any failure here means: try the legacy path, then report both
        errors.append(f"dma-buf: {exc}")
    try:
        mr = mr_module.MR(pd, length, access, address=addr)
        return mr, GpuRange(iova=addr, length=length, method="peermem"), -1
    except Exception as exc:
        errors.append(f"peer memory: {exc}")
    raise NoDevice("cannot register GPU memory with this device (" + "; ".join(errors) + "). rxe/siw cannot; on a "
                   "NIC load nvidia-peermem or use a dma-buf capable driver, or keep KV in host memory")
