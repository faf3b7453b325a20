"""Registering shared-memory mappings with CUDA (`cudaHostRegister`), so host<->GPU copies from them run at
pinned speed (measured on H200: 54 GB/s registered vs 6 GB/s unregistered, see FACTS.md).

Which runtime: torch's `torch.cuda.cudart()` if torch with CUDA is importable, else cupy's runtime. On a
machine without an NVIDIA device nothing is imported (importing torch costs seconds) and registration is
skipped with one log line. `mode` is "auto" (register when possible), "off", or "require" (fail loudly).

`copy` moves bytes between a (registered) host mapping and GPU memory for endpoints whose local SGE is GPU
memory: torch wraps the device pointer through the CUDA array interface, cupy calls cudaMemcpy.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from rdmapool.errors import NoDevice, UsageError

log = logging.getLogger(__name__)

CUDA_MEMCPY_DEFAULT = 4
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08
MODES = ("auto", "off", "require")

_runtime: Any = None
_probed = 0  # pid of the process that probed (a forked child probes again)


class _CudaArray:
    """A raw device pointer as a CUDA array interface, so torch can wrap it without copying."""

    def __init__(self, ptr: int, length: int) -> None:
        self.__cuda_array_interface__ = {"shape": (length,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 3}


class _TorchRuntime:
    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        import torch

        self.torch = torch

    def copy(self, dst: int, src: int, length: int, to_device: bool) -> None:
        torch = self.torch
        host_ptr, dev_ptr = (src, dst) if to_device else (dst, src)
        host = torch.frombuffer((ctypes.c_uint8 * length).from_address(host_ptr), dtype=torch.uint8)
        dev = torch.as_tensor(_CudaArray(dev_ptr, length), device="cuda")
        if to_device:
            dev.copy_(host)
        else:
            host.copy_(dev)
        torch.cuda.current_stream(dev.device).synchronize()

    def register(self, addr: int, length: int, flags: int) -> None:
        err = self.cudart.cudaHostRegister(addr, length, flags)
        if int(err) != 0:
            raise OSError(f"cudaHostRegister({addr:#x}, {length}) failed with CUDA error {int(err)}")

    def unregister(self, addr: int) -> None:
        self.cudart.cudaHostUnregister(addr)


class _CupyRuntime:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def copy(self, dst: int, src: int, length: int, to_device: bool) -> None:
        self.runtime.memcpy(dst, src, length, CUDA_MEMCPY_DEFAULT)

    def register(self, addr: int, length: int, flags: int) -> None:
        self.runtime.hostRegister(addr, length, flags)

    def unregister(self, addr: int) -> None:
        self.runtime.hostUnregister(addr)


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _probe() -> Any:
    global _runtime, _probed
    if _probed == os.getpid():
        return _runtime
    if _probed and _runtime is not None:
        # A forked child cannot use the CUDA context its parent initialised: no CUDA here.
        log.info("shm: CUDA was initialised before fork(); this child does not register with CUDA")
        _runtime = None
        _probed = os.getpid()
        return None
    _probed = os.getpid()
    if not _has_nvidia_device():
        log.info("shm: no NVIDIA GPU on this machine; shared memory is not registered with CUDA")
        return None
    try:
        import torch

        if torch.cuda.is_available():
            _runtime = _TorchRuntime(torch.cuda.cudart())
            return _runtime
    except Exception as exc:  # an unusable torch must not stop the transport; cupy may still work
        log.debug("shm: torch CUDA runtime unusable: %s", exc)
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        _runtime = _CupyRuntime(cupy.cuda.runtime)
    except Exception as exc:
        log.info("shm: a GPU exists but neither torch with CUDA nor cupy is usable (%s); not registering", exc)
    return _runtime


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"cuda mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "require" and _probe() is None:
        raise NoDevice("cuda='require' but no CUDA runtime (torch with CUDA, or cupy) and GPU are usable")


def host_register(addr: int, length: int, read_only: bool, mode: str) -> bool:
    """Register [addr, addr+length) as pinned for CUDA; True when done. Failures are fatal only in 'require'."""
    if mode == "off" or length == 0:
        return False
    rt = _probe()
    if rt is None:
        return False
    flags = HOST_REGISTER_PORTABLE | (HOST_REGISTER_READ_ONLY if read_only else 0)
    try:
        rt.register(addr, length, flags)
        return True
    except Exception as exc:
        if mode == "require":
            raise
        log.warning("shm: cudaHostRegister of %d bytes failed (%s); GPU copies will run at pageable speed",
                    length, exc)
        return False


def available() -> bool:
    return _probe() is not None


def copy(dst: int, src: int, length: int, to_device: bool) -> None:
    """Synchronous copy between host memory and GPU memory (either direction, by unified addressing)."""
    rt = _probe()
    if rt is None:
        raise NoDevice("no CUDA runtime for a copy to or from GPU memory")
    rt.copy(dst, src, length, to_device)


def host_unregister(addr: int) -> None:
    rt = _probe()
    if rt is not None:
        try:
            rt.unregister(addr)
        except Exception as exc:  # unregistering at teardown must not mask the caller's own error
            log.warning("shm: cudaHostUnregister(%#x) failed: %s", addr, exc)
