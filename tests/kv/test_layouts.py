"""Triton gather/scatter vs the plain-torch reference, bit for bit, on random layouts and slot mappings."""

from __future__ import annotations

import pytest
import torch

from rdmapool.errors import UsageError
from rdmapool.kv import kernels
from rdmapool.kv.layouts import Layout, PagedKV, paged_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # random *bits*, so NaN patterns and signed zeros are covered too: the copy must not interpret values
    width = torch.empty((), dtype=dtype).element_size()
    ity = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[width]
    lo, hi = (0, 256) if width == 1 else (-(2 ** (8 * width - 1)), 2 ** (8 * width - 1))
    return torch.randint(lo, hi, shape, dtype=ity, generator=gen).view(dtype).to(DEVICE)


def make_cache(layout: Layout, layers: int, nb: int, bs: int, heads: int, dim: int, dtype: torch.dtype,
               gen: torch.Generator) -> tuple[list, PagedKV]:
    shapes = {
        Layout.VLLM_NHD: (2, nb, bs, heads, dim),
        Layout.VLLM_HND: (2, nb, heads, bs, dim),
        Layout.FLASHINFER_NHD: (nb, 2, bs, heads, dim),
        Layout.FLASHINFER_HND: (nb, 2, heads, bs, dim),
        Layout.MLA: (nb, bs, dim),
    }
    if layout is Layout.HF:
        raw = [(_random((nb, heads, bs, dim), dtype, gen), _random((nb, heads, bs, dim), dtype, gen))
               for _ in range(layers)]
    else:
        raw = [_random(shapes[layout], dtype, gen) for _ in range(layers)]
    return raw, paged_kv(layout, raw)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).cpu()


CASES = [(layout, dtype, seed) for seed, (layout, dtype) in enumerate(
    [(lay, dt) for lay in Layout for dt in DTYPES])]


@pytest.mark.parametrize("layout,dtype,seed", CASES, ids=[f"{c[0].value}-{str(c[1])[6:]}" for c in CASES])
def test_triton_matches_reference_bit_exact(layout: Layout, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 4, (1,), generator=gen))
    bs = int(torch.randint(2, 6, (1,), generator=gen))
    nb = int(torch.randint(4, 8, (1,), generator=gen))
    heads = 1 if layout is Layout.MLA else int(torch.randint(1, 4, (1,), generator=gen))
    dim = int(torch.randint(3, 12, (1,), generator=gen))
    chunk, n = 4, 2
    raw, kv = make_cache(layout, layers, nb, bs, heads, dim, dtype, gen)
    # a random slot mapping without repeats (repeats would make scatter order-dependent)
    slots = torch.randperm(nb * bs, generator=gen)[: n * chunk].to(DEVICE)

    ref = kv.empty_blocks(n, chunk)
    kernels.gather(kv, slots, ref, chunk, impl="torch")
    tri = kv.empty_blocks(n, chunk)
    kernels.gather(kv, slots, tri, chunk, impl="triton")
    assert torch.equal(bits(ref), bits(tri))

    # scatter new blocks into two copies of the cache, one per implementation
    new = _random(tuple(ref.shape), dtype, gen)
    raw2, kv2 = make_cache(layout, layers, nb, bs, heads, dim, dtype, torch.Generator().manual_seed(seed))
    raw3, kv3 = make_cache(layout, layers, nb, bs, heads, dim, dtype, torch.Generator().manual_seed(seed))
    kernels.scatter(kv2, slots, new, chunk, impl="torch")
    kernels.scatter(kv3, slots, new, chunk, impl="triton")
    flat2 = [bits(x) for layer in raw2 for x in (layer if isinstance(layer, tuple) else (layer,))]
    flat3 = [bits(x) for layer in raw3 for x in (layer if isinstance(layer, tuple) else (layer,))]
    assert all(torch.equal(a, b) for a, b in zip(flat2, flat3, strict=True))
    # and the scattered tokens read back as the blocks that were written, other slots untouched
    back = kv3.empty_blocks(n, chunk)
    kernels.gather(kv3, slots, back, chunk, impl="triton")
    assert torch.equal(bits(back), bits(new))
    raw4, _ = make_cache(layout, layers, nb, bs, heads, dim, dtype, torch.Generator().manual_seed(seed))
    flat4 = [bits(x) for layer in raw4 for x in (layer if isinstance(layer, tuple) else (layer,))]
    changed = sum(int((a != b).sum()) for a, b in zip(flat4, flat3, strict=True))
    assert 0 < changed <= new.numel()


def test_layers_must_agree() -> None:
    a = torch.zeros(2, 4, 2, 1, 3)
    b = torch.zeros(2, 5, 2, 1, 3)
    with pytest.raises(UsageError, match="layer 1"):
        paged_kv("vllm-nhd", [a, b])


def test_bad_layout_and_shapes() -> None:
    with pytest.raises(UsageError, match="unknown KV layout"):
        paged_kv("paged", [torch.zeros(2, 1, 1, 1, 1)])
    with pytest.raises(UsageError, match="mla"):
        paged_kv("mla", [torch.zeros(2, 1, 1, 1, 1)])
    with pytest.raises(UsageError, match=r"\[2, num_blocks"):
        paged_kv("vllm-nhd", [torch.zeros(3, 1, 1, 1, 1)])


def test_slot_checks() -> None:
    kv = paged_kv("vllm-nhd", [torch.zeros(2, 2, 4, 1, 2)])
    out = kv.empty_blocks(1, 4)
    with pytest.raises(UsageError, match="out of range"):
        kernels.gather(kv, torch.tensor([0, 1, 2, 8]), out, 4)
    with pytest.raises(UsageError, match="whole number"):
        kernels.gather(kv, torch.tensor([0, 1, 2]), out, 4)
    with pytest.raises(UsageError, match="int64"):
        kernels.gather(kv, torch.tensor([0, 1, 2, 3], dtype=torch.int32), out, 4)
    with pytest.raises(UsageError, match="blocks must be"):
        kernels.gather(kv, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), out, 4)


@pytest.mark.parametrize("layout", [Layout.HF, Layout.VLLM_HND, Layout.MLA])
def test_layer_by_layer_scatter_matches_one_launch(layout: Layout) -> None:
    """`LayerScatter` (one launch per layer, for a pipelined load) writes exactly what one `scatter` writes."""
    gen = torch.Generator().manual_seed(11)
    layers, nb, bs, chunk, n = 3, 6, 4, 4, 2
    heads = 1 if layout is Layout.MLA else 2
    _, kv = make_cache(layout, layers, nb, bs, heads, 8, torch.bfloat16, gen)
    raw2, kv2 = make_cache(layout, layers, nb, bs, heads, 8, torch.bfloat16, torch.Generator().manual_seed(12))
    raw3, kv3 = make_cache(layout, layers, nb, bs, heads, 8, torch.bfloat16, torch.Generator().manual_seed(12))
    slots = torch.randperm(nb * bs, generator=gen)[: n * chunk].to(DEVICE)
    new = _random(kv.block_shape(n, chunk), torch.bfloat16, gen)
    kernels.scatter(kv2, slots, new, chunk, impl="torch")
    per_layer = kernels.LayerScatter(kv3, slots, chunk, impl="triton")
    # any order and grouping: each launch touches its own layers only
    per_layer.layers(2, new[:, 2:3].contiguous())
    per_layer.layers(0, new[:, 0:2].contiguous())
    flat2 = [bits(x) for layer in raw2 for x in (layer if isinstance(layer, tuple) else (layer,))]
    flat3 = [bits(x) for layer in raw3 for x in (layer if isinstance(layer, tuple) else (layer,))]
    assert all(torch.equal(a, b) for a, b in zip(flat2, flat3, strict=True))
    with pytest.raises(UsageError):
        per_layer.layers(1, new)  # three layers' blocks from layer 1 on: past the last layer
