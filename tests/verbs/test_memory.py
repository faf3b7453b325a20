import mmap

import pytest

from rdmapool.errors import NoDevice, UsageError
from rdmapool.transport.verbs_memory import buffer_address, check_gpu_range, map_host, register_gpu


class FakeMrModule:
    """Stands in for pyverbs.mr: records how regions were registered."""

    def __init__(self, dmabuf_ok=True, peermem_ok=True):
        self.dmabuf_ok, self.peermem_ok, self.calls = dmabuf_ok, peermem_ok, []

    def DmaBufMR(self, pd, length, access, dmabuf, offset):  # noqa: N802 - pyverbs' name
        self.calls.append(("dmabuf", length, dmabuf, offset))
        if not self.dmabuf_ok:
            raise RuntimeError("dma-buf registration refused")
        return object()

    def MR(self, pd, length, access, address):  # noqa: N802
        self.calls.append(("mr", length, address))
        if not self.peermem_ok:
            raise RuntimeError("Bad address")
        return object()


def test_gpu_dmabuf_regions_are_addressed_by_offset():
    mod = FakeMrModule()
    exported = []
    mr, rng, fd = register_gpu(None, 0x7F0000200000, 1 << 20, 15, mod,
                               export=lambda a, n: exported.append((a, n)) or 99)
    assert exported == [(0x7F0000200000, 1 << 20)]
    assert mod.calls == [("dmabuf", 1 << 20, 99, 0)]
    assert (rng.iova, rng.method, fd) == (0, "dmabuf", 99)  # peers use the offset, not the CUDA pointer


def test_gpu_falls_back_to_peer_memory(monkeypatch):
    import os

    closed = []
    monkeypatch.setattr(os, "close", closed.append)
    mod = FakeMrModule(dmabuf_ok=False)
    mr, rng, fd = register_gpu(None, 0x7F0000200000, 8192, 15, mod, export=lambda a, n: 42)
    assert closed == [42]  # the exported fd is not leaked
    assert (rng.iova, rng.method, fd) == (0x7F0000200000, "peermem", -1)


def test_gpu_registration_failure_names_both_paths():
    def no_export(a, n):
        raise NoDevice("no libcuda")

    with pytest.raises(NoDevice, match="dma-buf: no libcuda.*peer memory: Bad address"):
        register_gpu(None, 0x7F0000200000, 4096, 15, FakeMrModule(peermem_ok=False), export=no_export)


@pytest.mark.parametrize("addr,length", [(0x1001, 4096), (0x1000, 100), (0, 4096), (0x1000, 0)])
def test_gpu_ranges_must_be_4k_aligned(addr, length):
    with pytest.raises(UsageError):
        check_gpu_range(addr, length)


def test_buffer_address():
    buf = bytearray(b"x" * 64)
    view, addr = buffer_address(buf)
    assert view.nbytes == 64 and addr > 0
    import ctypes

    assert ctypes.string_at(addr, 1) == b"x"
    with pytest.raises(UsageError, match="read-only"):
        buffer_address(b"abc")
    with pytest.raises(UsageError, match="empty"):
        buffer_address(bytearray())
    with pytest.raises(UsageError, match="buffer protocol"):
        buffer_address(12)
    with pytest.raises(UsageError, match="contiguous"):
        buffer_address(memoryview(bytearray(64))[::2])


def test_map_host_pool():
    host = map_host(4 << 20)
    try:
        assert host.length == 4 << 20 and isinstance(host.mm, mmap.mmap)
        host.mm[:4] = b"abcd"
        import ctypes

        assert ctypes.string_at(host.addr, 4) == b"abcd"
    finally:
        pass
    with pytest.raises(UsageError):
        map_host(0)
