"""torch tensors as put sources and get destinations, so an engine hands the client its tensors as they are.

Theory of operation
-------------------
A block is one contiguous run of bytes, so a tensor qualifies when it is dense and contiguous; its dtype does not
matter (bfloat16 included: the client moves bytes, not numbers).

- Host tensors move in place, through a byte view of their storage; inside memory registered with the client
  (`PoolClient.register`) they are zero-copy on the transport as well.
- A get into CUDA tensors inside GPU memory registered with the client (`PoolClient.register(tensor)`, on a
  transport that can register it: shm, verbs with GPUDirect) lands in place, through `RegionSlice`s: the
  transport copies or DMAs straight to the device. The payload checksum is not verified there (hashing would
  need the bytes on the host); keys, generations at both ends, lengths and self-checks are, and the block's read
  lease must still run when its READ completed, so the server cannot have reused the slot during it.
- Other CUDA tensors, and every CUDA tensor a put writes, go through `DeviceStaging`, a pinned host buffer the
  client registers once and reuses: a put copies them into it first and hashes them there, so every block it
  writes carries its checksum (written from device memory in place, a block has none, and readers into host
  memory count it corrupt); a get reads into it, validates every block (checksum included), and copies each
  block to the device as soon as it is accepted, while later ones still move. The client synchronises those
  copies before returning, so a get's tensors hold their bytes when it returns, as host buffers do.

torch is imported only when a tensor is seen: clients that never pass one never load it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rdmapool.client.buffers import RegionSlice
from rdmapool.errors import UsageError
from rdmapool.transport.base import MemoryRegion

#: staged bytes are laid out on this alignment, so every block's payload starts on a cache line
_ALIGN = 64


def is_tensor(obj: object) -> bool:
    """Whether `obj` is a torch tensor (checked without importing torch)."""
    return type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage")


def nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def check_dense(t: Any, what: str) -> None:
    """A tensor the client can move as one run of bytes; UsageError naming what is wrong otherwise."""
    import torch

    if t.layout is not torch.strided:
        raise UsageError(f"{what} is a {t.layout} tensor: put and get move dense (strided) tensors")
    if t.device.type not in ("cpu", "cuda"):
        raise UsageError(f"{what} is on {t.device}: put and get move host or CUDA tensors")
    if not t.is_contiguous():
        raise UsageError(f"{what} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}): a block is "
                         "one contiguous run of bytes; pass tensor.contiguous(), or get into a contiguous "
                         "tensor and copy from it")


def byte_tensor(t: Any) -> Any:
    """The tensor's bytes as a flat uint8 tensor sharing its storage (any dtype)."""
    import torch

    flat = t.detach().reshape(-1)
    return flat if flat.dtype is torch.uint8 else flat.view(torch.uint8)


def host_bytes(t: Any, what: str) -> memoryview:
    """A writable byte view of a host tensor that passed `check_dense`, in place (the view keeps the tensor's
    storage alive)."""
    try:
        return memoryview(byte_tensor(t).numpy()).cast("B")
    except (RuntimeError, TypeError) as exc:  # conjugate or negative views, tensor subclasses numpy refuses
        raise UsageError(f"{what}: its bytes cannot be viewed in place ({exc}); pass tensor.resolve_conj()"
                         ".resolve_neg().contiguous()") from None


class DeviceRegions:
    """GPU memory registered with the client: which region holds a CUDA tensor's bytes, by device pointer (a
    region's own address may be an I/O virtual address, not the pointer)."""

    def __init__(self) -> None:
        self._spans: list[tuple[int, int, MemoryRegion]] = []  # (device pointer, length, region)

    def add(self, ptr: int, length: int, region: MemoryRegion) -> None:
        self._spans.append((ptr, length, region))

    def find(self, t: Any) -> RegionSlice | None:
        ptr, n = t.data_ptr(), nbytes(t)
        for start, length, region in self._spans:
            if start <= ptr and ptr + n <= start + length:
                return RegionSlice(region, ptr - start, n)
        return None

    def clear(self) -> None:
        self._spans.clear()


class DeviceStaging:
    """A pinned host buffer, registered with the client's transport, through which unregistered CUDA tensors move.
    It grows geometrically up to `cap` bytes (a call that needs more goes in rounds, `PoolClient` splits it) and
    is then reused, so a steady stream of calls registers nothing; one tensor larger than `cap` gets a buffer of
    its own size, released after that call (`trim`)."""

    def __init__(self, register: Callable[[Any], MemoryRegion], deregister: Callable[[MemoryRegion], None],
                 cap: int) -> None:
        self._register, self._deregister = register, deregister
        self.cap = cap
        self._host: Any = None  # the pinned uint8 tensor
        self._region: MemoryRegion | None = None

    @staticmethod
    def span(sizes: list[int]) -> tuple[list[int], int]:
        """Offsets of pieces of `sizes` bytes placed one after another, aligned; and the bytes they span."""
        offsets, end = [], 0
        for n in sizes:
            start = -(-end // _ALIGN) * _ALIGN
            offsets.append(start)
            end = start + n
        return offsets, end

    def pieces(self, sizes: list[int]) -> list[Any]:
        """Disjoint pinned uint8 tensors of `sizes` bytes, inside the registered buffer (so the data path moves
        them zero-copy), valid until the next call."""
        import torch

        offsets, end = self.span(sizes)
        have = 0 if self._host is None else self._host.numel()
        if have < end:
            self.close()
            size = max(end, min(self.cap, 2 * have))
            host = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self._region = self._register(host.numpy())
            self._host = host
        return [self._host[o : o + n] for o, n in zip(offsets, sizes, strict=True)]

    def trim(self) -> None:
        """Release a buffer grown past `cap` for one large tensor."""
        if self._host is not None and self._host.numel() > self.cap:
            self.close()

    def close(self) -> None:
        if self._region is not None:
            self._deregister(self._region)
            self._region = None
        self._host = None


def groups(sizes: dict[int, int], count: int, cap: int) -> list[list[int]]:
    """Positions 0..count-1 split into rounds whose staged bytes (`sizes`: position -> bytes, staged positions
    only) fit in `cap` (a position larger than `cap` alone); positions that need no staging go in the first round.
    Each round lists its positions in order."""
    rounds: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in sizes.items():
        n = -(-n // _ALIGN) * _ALIGN
        if current and used + n > cap:
            rounds.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    rounds.append(current)
    rounds[0] = sorted(rounds[0] + [i for i in range(count) if i not in sizes])
    return rounds
