"""GPU memory with shm: GPU SGEs handed off from the native mover (on CPU with a stand-in runtime) and, marked
`gpu`, real cudaHostRegister of the mappings and READ/WRITE straight into GPU memory."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from shm_harness import TIMEOUT, transport_pair

from rdmapool.transport import MemoryKind, WcStatus, WorkRequest
from rdmapool.transport.shm import ShmTransport


@pytest.fixture
def shm_pair() -> Iterator[tuple[ShmTransport, ShmTransport]]:
    yield from transport_pair()


class _FakeGpu:
    """Stands in for the CUDA runtime on CPU machines: 'GPU memory' is host memory, copies are memcpy. Tests
    the hand-off of GPU records between the native mover and Python, which the gpu-marked test runs for real."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.fail = False

    def copy(self, dst: int, src: int, length: int, to_device: bool) -> None:
        from rdmapool import _shmatomics

        if self.fail:
            raise RuntimeError("device lost")
        self.calls.append((length, to_device))
        _shmatomics.copy(dst, src, length)


@pytest.fixture
def fake_gpu(monkeypatch):
    from rdmapool.transport.shm import cuda

    gpu = _FakeGpu()
    monkeypatch.setattr(cuda, "_probe", lambda: gpu)
    return gpu


def test_gpu_sges_are_handed_off_in_order(shm_pair, fake_gpu):
    from rdmapool import _shmatomics
    from rdmapool.transport import Opcode, TransferPlan

    srv, cli = shm_pair
    region = srv.allocate(1 << 16)
    region.view[:] = os.urandom(1 << 16)
    host, gpu_mem = bytearray(1 << 12), bytearray(1 << 12)
    lh = cli.register(host)
    lg = cli.register_pointer(_shmatomics.address(gpu_mem)[0], len(gpu_mem), MemoryKind.CUDA, owner=gpu_mem)
    with cli.connect(srv.peer_info()) as ep:
        wrs = [WorkRequest.read(0, lh.sge(0, 100), region.remote(0), region.rkey),
               WorkRequest.read(1, lg.sge(0, 200), region.remote(100), region.rkey),
               WorkRequest.read(2, lh.sge(100, 50), region.remote(300), region.rkey),
               WorkRequest.write(3, lg.sge(0, 200), region.remote(1000), region.rkey)]
        assert [c.wr_id for c in ep.execute(wrs, TIMEOUT) if c.ok] == [0, 1, 2, 3]
        assert host[:100] == region.view[:100] and host[100:150] == region.view[300:350]
        assert gpu_mem[:200] == region.view[100:300] == region.view[1000:1200]
        assert fake_gpu.calls == [(200, True), (200, False)]
        c = ep.execute([WorkRequest.faa(4, lg.sge(0, 8), region.remote(0), region.rkey, 1)], TIMEOUT)[0]
        assert c.status is WcStatus.LOC_PROT_ERR and "host SGE" in c.detail
    with cli.connect(srv.peer_info()) as ep:  # plans with GPU SGEs take the per-request path
        plan = TransferPlan.build([lg.sge(0, 64)], [(region.remote(64 * i), region.rkey) for i in range(4)])
        assert ep.post_plan(plan, Opcode.READ, [(0, 3)]) == 1
        assert ep.wait(1, TIMEOUT)[0].ok and gpu_mem[:64] == region.view[192:256]
        fake_gpu.fail = True
        ep.post_plan(plan, Opcode.READ, [(0, 0), (0, 1)])
        done = ep.wait(2, TIMEOUT)
        assert [c.status for c in done] == [WcStatus.LOC_PROT_ERR, WcStatus.WR_FLUSH_ERR]
        assert "CUDA copy failed" in done[0].detail
    fake_gpu.fail = False
    with cli.connect(srv.peer_info()) as ep:
        srv.deregister(region)
        c = ep.execute([WorkRequest.read(5, lg.sge(0, 8), region.remote(0), region.rkey)], TIMEOUT)[0]
        assert c.status is WcStatus.REM_ACCESS_ERR


def test_register_pointer_cuda_without_a_gpu_is_no_device():
    from rdmapool.errors import NoDevice
    from rdmapool.transport.shm import cuda

    if cuda.available():
        pytest.skip("a CUDA runtime is usable here")
    with ShmTransport() as t, pytest.raises(NoDevice):
        t.register_pointer(4096, 4096, MemoryKind.CUDA)


# --- GPU ------------------------------------------------------------------------------------------------------
def _cuda_or_skip():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    return torch


@pytest.mark.gpu
def test_cuda_registration_gives_pinned_speed():
    torch = _cuda_or_skip()
    size = 256 << 20
    with ShmTransport(cuda="require") as srv, ShmTransport(cuda="require") as cli:
        region = srv.allocate(size)
        host = torch.frombuffer(region.view, dtype=torch.uint8)
        assert host.is_pinned(), "the owner's mapping is not registered with CUDA"
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        gbps = 5 * size / (time.perf_counter() - t0) / 1e9
        assert gbps > 20, f"host->GPU from registered shm ran at {gbps:.1f} GB/s (pinned is ~50)"
        lr = cli.register(bytearray(8))
        with cli.connect(srv.peer_info()) as ep:  # the client's mapping is registered too
            assert ep.execute([WorkRequest.read(1, lr.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok
            seg = next(iter(ep._remotes.values())).seg
            assert seg.cuda_registered


@pytest.mark.gpu
def test_read_and_write_straight_into_gpu_memory():
    torch = _cuda_or_skip()
    size = 64 << 20
    with ShmTransport(cuda="require") as srv, ShmTransport(cuda="require") as cli:
        region = srv.allocate(size)
        region.view[:] = os.urandom(size)
        dev = torch.zeros(size, dtype=torch.uint8, device="cuda")
        lg = cli.register_pointer(dev.data_ptr(), size, MemoryKind.CUDA, owner=dev)
        with cli.connect(srv.peer_info()) as ep:
            assert ep.execute([WorkRequest.read(0, lg.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok
            assert bytes(dev.cpu().numpy()) == bytes(region.view)
            t0 = time.perf_counter()
            for i in range(5):
                assert ep.execute([WorkRequest.read(i, lg.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok
            gbps = 5 * size / (time.perf_counter() - t0) / 1e9
            assert gbps > 20, f"shm READ into GPU memory ran at {gbps:.1f} GB/s (pinned is ~50)"
            dev.fill_(7)
            assert ep.execute([WorkRequest.write(9, lg.sge(), region.remote(0), region.rkey)], TIMEOUT)[0].ok
            assert bytes(region.view[:4096]) == b"\x07" * 4096
