"""GPU paths (skipped without CUDA): Triton kernels on the device, gathering straight into pinned host memory and
scattering from it (unified addressing), and the HF engine on the GPU sharing KV through a real server."""

from __future__ import annotations

import pytest
import torch

from rdmapool.kv import kernels
from rdmapool.kv.hf import HFEngine
from rdmapool.kv.layouts import Layout
from rdmapool.kv.models import ModelSpec, fingerprint, load_model
from tests.kv.fake_pool import FakePool
from tests.kv.test_layouts import bits, make_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("layout", list(Layout))
def test_kernels_move_kv_to_and_from_pinned_host_memory(layout: Layout) -> None:
    gen = torch.Generator().manual_seed(7)
    raw, kv = make_cache(layout, 4, 64, 16, 1 if layout is Layout.MLA else 8, 128, torch.bfloat16, gen)
    assert kv.device.type == "cuda"
    slots = torch.randperm(64 * 16, generator=gen)[: 4 * 256 // 4].to("cuda")
    chunk = 64
    host = torch.empty(kv.block_shape(slots.numel() // chunk, chunk), dtype=kv.dtype).pin_memory()
    kernels.gather(kv, slots, host, chunk, impl="triton")
    torch.cuda.synchronize()
    ref = kernels.gather(kv, slots, kv.empty_blocks(slots.numel() // chunk, chunk), chunk, impl="torch")
    assert torch.equal(bits(host), bits(ref))
    new = torch.randn(host.shape, generator=gen).to(kv.dtype).pin_memory()
    kernels.scatter(kv, slots, new, chunk, impl="triton")
    torch.cuda.synchronize()
    back = kernels.gather(kv, slots, kv.empty_blocks(slots.numel() // chunk, chunk), chunk, impl="torch")
    assert torch.equal(bits(back), bits(new))


def test_engine_on_gpu_shares_kv() -> None:
    spec = ModelSpec("llama", "micro", seed=2)
    model = load_model(spec, "cuda", torch.float32)
    mid, rev = fingerprint(spec, "cuda", torch.float32)
    prompt = torch.randint(1, 512, (4 * 16 + 5,), generator=torch.Generator().manual_seed(3)).tolist()
    pool = FakePool()
    HFEngine(model, mid, rev, pool, chunk_tokens=16).run_batch([prompt], 0)
    got = HFEngine(model, mid, rev, pool, chunk_tokens=16).run_batch([prompt, prompt[:40]], 12)
    want = HFEngine(model, mid, rev, None, chunk_tokens=16).run_batch([prompt, prompt[:40]], 12)
    assert got.cached_tokens == [64, 32]
    assert got.outputs == want.outputs
    assert (got.first_logits - want.first_logits).abs().max() < 1e-3  # TF32/cuBLAS shapes: see test_hf


def test_gpu_engine_through_a_real_shm_server() -> None:
    from rdmapool.client import PoolClient
    from rdmapool.config import ClientConfig
    from tests.support import procs

    spec = ModelSpec("llama", "micro", seed=2)
    model = load_model(spec, "cuda", torch.bfloat16)
    mid, rev = fingerprint(spec, "cuda", torch.bfloat16)
    prompt = torch.randint(1, 512, (4 * 16 + 5,), generator=torch.Generator().manual_seed(3)).tolist()
    with procs.running("shm", "16MiB") as srv:
        cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=4 << 20)
        with PoolClient([srv.address], cfg, transport_name="shm") as a, \
                PoolClient([srv.address], cfg, transport_name="shm") as b:
            HFEngine(model, mid, rev, a, tenant="a", chunk_tokens=16).run_batch([prompt], 0)
            got = HFEngine(model, mid, rev, b, tenant="a", chunk_tokens=16).run_batch([prompt], 4)
    assert got.cached_tokens == [64] and got.bytes_read == 4 * 2 * 2 * 16 * 2 * 16 * 2


def test_gpu_load_modes_agree_through_a_real_shm_server() -> None:
    """The pipelined layer-wise load (side streams, events, per-layer scatter) gives the very logits of the serial
    load, and both the outputs of the legacy concatenating cache; prompts with and without a partial chunk."""
    from rdmapool.client import PoolClient
    from rdmapool.config import ClientConfig
    from tests.support import procs

    spec = ModelSpec("llama", "micro", seed=2)
    model = load_model(spec, "cuda", torch.bfloat16)
    mid, rev = fingerprint(spec, "cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 512, (n,), generator=gen).tolist() for n in (8 * 16 + 3, 8 * 16)]
    with procs.running("shm", "64MiB") as srv:
        cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=4 << 20)
        with PoolClient([srv.address], cfg, transport_name="shm") as a, \
                PoolClient([srv.address], cfg, transport_name="shm") as b:
            for prompt in prompts:
                HFEngine(model, mid, rev, a, tenant="a", chunk_tokens=16).run_batch([prompt], 0)
                got = {mode: HFEngine(model, mid, rev, b, tenant="a", chunk_tokens=16, load_mode=mode)
                       .run_batch([prompt], 6) for mode in ("layered", "serial", "legacy")}
                assert got["layered"].cached_tokens == [min(len(prompt) // 16 * 16, len(prompt) - 1)]
                assert torch.equal(got["layered"].first_logits, got["serial"].first_logits)
                assert got["layered"].outputs == got["serial"].outputs == got["legacy"].outputs
                assert (got["layered"].first_logits - got["legacy"].first_logits).abs().max() < 0.05
