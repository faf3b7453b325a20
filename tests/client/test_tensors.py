"""torch tensors as put sources and get destinations: host tensors of any dtype in place, CUDA tensors in place
when registered and through pinned staging otherwise (the staging's rounds run on CPU with the device copies
standing in; the `gpu`-marked tests run them on a real GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rdmapool.client import client as client_module
from rdmapool.client import datapath, tensors
from rdmapool.client.buffers import RegionSlice
from rdmapool.errors import UsageError
from rdmapool.transport.base import Opcode
from tests.client.test_inprocess import _close_transports, key, make_client, server  # noqa: F401  (fixtures)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Random bytes viewed as `dtype` (every bit pattern, NaNs included: equality is checked on bytes)."""
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.tensor(list(os.urandom(n)), dtype=torch.uint8)
    if dtype is torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape).to(device)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bytes(tensors.byte_tensor(a.cpu()).numpy()) == bytes(tensors.byte_tensor(b.cpu()).numpy())


def test_host_tensors_of_every_dtype_round_trip_byte_exact(server) -> None:  # noqa: F811
    with make_client(server) as c:
        srcs = [_random((3, 17, 5), dt) for dt in DTYPES]
        keys = [key(i) for i in range(len(srcs))]
        assert c.put(keys, srcs) == [client_module.PutStatus.STORED] * len(srcs)
        outs = [torch.zeros_like(s) for s in srcs]
        assert c.get(keys, outs) == [tensors.nbytes(s) for s in srcs]
        assert all(_same_bytes(o, s) for o, s in zip(outs, srcs, strict=True))
        # a block is bytes: bfloat16 written from a tensor reads back into any buffer of its size
        raw = bytearray(tensors.nbytes(srcs[2]))
        assert c.get([keys[2]], [raw]) == [len(raw)] and raw == bytes(tensors.byte_tensor(srcs[2]).numpy())


def test_bad_tensors_are_refused_by_name(server) -> None:  # noqa: F811
    with make_client(server) as c:
        grid = torch.arange(100, dtype=torch.float32).reshape(10, 10)
        with pytest.raises(UsageError, match="buffer 1 is not contiguous"):
            c.put([key(1), key(2)], [grid, grid.t()])
        with pytest.raises(UsageError, match="sparse"):
            c.put([key(1)], [grid.to_sparse()])
        with pytest.raises(UsageError, match="meta"):
            c.put([key(1)], [torch.empty(4, device="meta")])
        assert c.put([key(1)], [grid]) == [client_module.PutStatus.STORED]
        with pytest.raises(UsageError, match="buffer 0 is not contiguous"):
            c.get([key(1)], [torch.zeros(20, 20)[:, :10]])
        with pytest.raises(UsageError, match="buffer 0 holds 8 bytes"):
            c.get([key(1)], [torch.zeros(2)])
        with pytest.raises(UsageError, match="not C-contiguous"):
            c.get([key(1)], [np.zeros((20, 20), dtype=np.float32)[:, ::2]])
        with pytest.raises(UsageError, match="buffer 0 is a str"):
            c.put([key(3)], ["text"])
        with pytest.raises(UsageError, match="read-only"):
            c.get([key(1)], [bytes(400)])
        # an object array's bytes are pointers: storing them is meaningless, overwriting them crashed the process
        objects = np.array([object()] * 50)
        with pytest.raises(UsageError, match="buffer 0 holds Python objects"):
            c.get([key(1)], [objects])
        with pytest.raises(UsageError, match="buffer 1 holds Python objects"):
            c.put([key(4), key(5)], [bytes(8), np.zeros(2, dtype=[("a", "O"), ("b", "i4")])])
        with pytest.raises(UsageError, match="the buffer to register holds Python objects"):
            c.register(objects)
        out = torch.zeros(10, 10)
        assert c.get([key(1)], [out]) == [400] and torch.equal(out, grid)  # nothing refused broke the client


def test_registered_host_tensor_moves_in_place(server, monkeypatch) -> None:  # noqa: F811
    """Slices of a registered host tensor are the requests' own payload SGEs: no staging copy either way."""
    posted: list = []
    post_many = datapath._Batch.post_many
    monkeypatch.setattr(datapath._Batch, "post", lambda self, wr: posted.append(wr) or post_many(self, [wr]))
    monkeypatch.setattr(datapath._Batch, "post_many", lambda self, wrs: posted.extend(wrs) or post_many(self, wrs))
    size = 4096
    with make_client(server) as c:
        src = _random((4, size // 2), torch.bfloat16)
        dst = torch.zeros_like(src)
        src_region, dst_region = c.register(src), c.register(dst)
        assert c.put([key(i) for i in range(4)], list(src)) == [client_module.PutStatus.STORED] * 4
        assert c.get([key(i) for i in range(4)], list(dst)) == [size] * 4
        assert torch.equal(src.view(torch.int16), dst.view(torch.int16))

        def payloads(opcode: Opcode) -> set[int]:
            return {sge.addr for wr in posted if wr.opcode is opcode for sge in wr.sgl if sge.length == size}

        assert payloads(Opcode.WRITE) == {src_region.addr + i * size for i in range(4)}
        assert payloads(Opcode.READ) == {dst_region.addr + i * size for i in range(4)}


def test_staging_rounds_split_by_the_cap() -> None:
    # positions 1, 2, 4 staged (100, 200, 5000 bytes; aligned to 64); the rest ride in the first round
    assert tensors.groups({1: 100, 2: 200, 4: 5000}, 6, 1 << 20) == [[0, 1, 2, 3, 4, 5]]
    assert tensors.groups({1: 100, 2: 200, 4: 5000}, 6, 400) == [[0, 1, 2, 3, 5], [4]]
    assert tensors.groups({1: 100, 2: 200, 4: 5000}, 6, 150) == [[0, 1, 3, 5], [2], [4]]
    assert tensors.groups({0: 10}, 1, 0) == [[0]]


class _CpuAsDevice:
    """Makes the client treat host tensors of one test as CUDA tensors outside registered memory: they go through
    `DeviceStaging` in rounds, as on a GPU (whose copy and stream calls the gpu-marked tests exercise)."""

    def __init__(self, monkeypatch) -> None:
        self.on = True
        item = client_module.PoolClient._item

        def fake_item(client, buf, i, call):
            if self.on and tensors.is_tensor(buf):
                return client_module._OnDevice(buf, tensors.nbytes(buf))
            return item(client, buf, i, call)

        monkeypatch.setattr(client_module.PoolClient, "_item", fake_item)
        monkeypatch.setattr(client_module, "_synchronize", lambda devices: None)


@pytest.mark.parametrize("cap", [1 << 20, 3000], ids=["one-round", "rounds"])
def test_staged_tensors_round_trip_and_misses_leave_them_alone(server, monkeypatch, cap: int) -> None:  # noqa: F811
    _CpuAsDevice(monkeypatch)
    with make_client(server, device_staging_bytes=cap) as c:
        srcs = [_random((n,), torch.float16) for n in (700, 1, 1500, 0, 2048)]
        keys = [key(i) for i in range(len(srcs))]
        assert c.put(keys, srcs) == [client_module.PutStatus.STORED] * len(srcs)
        assert c.delete([keys[2]]) == [True]
        outs = [torch.full((n + 8,), 7.0, dtype=torch.float16) for n in (700, 1, 1500, 0, 2048)]
        host = bytearray(2 * 700)  # a plain buffer in the same call
        got = c.get(keys + [keys[0]], outs + [host])
        assert got == [1400, 2, None, 0, 4096, 1400]
        for i, (o, s) in enumerate(zip(outs, srcs, strict=True)):
            if got[i] is not None:
                assert _same_bytes(o[: s.numel()], s), i
                assert bool((o[s.numel():] == 7.0).all()), i  # only the block's bytes are written
        assert bool((outs[2] == 7.0).all())  # a miss copies nothing
        assert host == bytes(tensors.byte_tensor(srcs[0]).numpy())
        assert c._staging._host is None or c._staging._host.numel() <= cap  # never kept above its cap
        assert c.counters["get_hits"] == 5 and c.counters["get_misses"] == 1


def test_staging_is_reused_and_released_with_the_client(server, monkeypatch) -> None:  # noqa: F811
    _CpuAsDevice(monkeypatch)
    with make_client(server, device_staging_bytes=1 << 16) as c:
        regions = set()
        for round_ in range(3):
            src = _random((4096,), torch.uint8)
            assert c.put([key(round_)], [src]) == [client_module.PutStatus.STORED]
            regions.add(id(c._staging._region))
            out = torch.zeros_like(src)
            assert c.get([key(round_)], [out]) == [4096] and torch.equal(out, src)
            regions.add(id(c._staging._region))
        assert len(regions) == 1  # registered once, reused by every call
        big = _random((1 << 17,), torch.uint8)  # larger than the cap: its own buffer, released after the call
        assert c.put([key(9)], [big]) == [client_module.PutStatus.STORED]
        assert c._staging._host is None
        regions_before_close = list(c.registry.regions)
        c.get([key(0)], [torch.zeros(4096, dtype=torch.uint8)])
        assert len(c.registry.regions) == len(regions_before_close) + 1
    assert c.registry.regions == [] and c._staging is None


# ---- on a GPU -------------------------------------------------------------------------------------------

def _cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@pytest.mark.parametrize("cap", [256 << 20, 64 << 10], ids=["one-round", "rounds"])
def test_cuda_tensors_round_trip_through_staging(server, cap: int) -> None:  # noqa: F811
    _cuda_or_skip()
    if server.transport_name == "local":
        pytest.skip("the in-process test transport has no CUDA path to compare")
    with make_client(server, device_staging_bytes=cap) as c:
        srcs = [_random((n,), torch.bfloat16, "cuda") for n in (100_000, 1, 30_000, 0)]
        keys = [key(i) for i in range(len(srcs))]
        assert c.put(keys, srcs) == [client_module.PutStatus.STORED] * len(srcs)
        c.delete([keys[1]])
        outs = [torch.zeros(n + 4, dtype=torch.bfloat16, device="cuda") for n in (100_000, 1, 30_000, 0)]
        host = torch.zeros(30_000, dtype=torch.bfloat16)
        got = c.get(keys + [keys[2]], outs + [host])  # CUDA and host tensors in one call
        assert got == [200_000, None, 60_000, 0, 60_000]
        assert _same_bytes(outs[0][:100_000], srcs[0]) and _same_bytes(outs[2][:30_000], srcs[2])
        assert bool((outs[1] == 0).all())
        assert _same_bytes(host, srcs[2])


@pytest.mark.gpu
def test_registered_cuda_tensor_is_read_in_place_on_shm(server) -> None:  # noqa: F811
    """A get into registered GPU memory lands in place (no staging); a put from it is staged and hashed, so its
    blocks read back into host memory with the checksum verified."""
    _cuda_or_skip()
    if server.transport_name != "shm":
        with make_client(server) as c:
            if server.transport_name == "tcp":
                with pytest.raises(UsageError, match="cannot register cuda memory"):
                    c.register(torch.zeros(1024, device="cuda"))
        pytest.skip(f"GPU memory registers with shm and verbs; this is {server.transport_name}")
    with make_client(server) as c:
        pool = torch.zeros(8, 4096, dtype=torch.float16, device="cuda")
        c.register(pool)
        src = _random((8, 4096), torch.float16, "cuda")
        pool.copy_(src)
        rows = list(pool)
        assert isinstance(c._item(rows[3], 3, "get"), RegionSlice)  # in place
        assert isinstance(c._item(rows[3], 3, "put"), client_module._OnDevice)  # staged: hashed on the host
        keys = [key(i) for i in range(8)]
        assert c.put(keys, rows) == [client_module.PutStatus.STORED] * 8
        host = torch.zeros(8, 4096, dtype=torch.float16)
        assert c.get(keys, list(host)) == [8192] * 8 and c.counters["corrupt_blocks"] == 0
        pool.zero_()
        staged_before = c._staging._region
        assert c.get(keys, rows) == [8192] * 8
        assert c._staging._region is staged_before  # the get used no staging
        assert _same_bytes(pool, src) and _same_bytes(host, src)
