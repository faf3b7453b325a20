"""Gather/scatter between a paged KV cache and pool blocks: Triton kernels, one launch for all layers.

Theory of operation
-------------------
Layers of a cache live in separate allocations, so the kernels take a table of base addresses (one int64 per
layer and plane, `[layers * planes]`) plus the strides the planes share (`rdmapool.kv.layouts.paged_kv` checks
that they do). Program (lp, t) moves token t of every chunk in the request for layer-plane lp: heads * head_dim
elements, in tiles of BLOCK. Elements are moved as integers of the same width (int8/int16/int32/int64), so the
copy is bit-exact for any dtype, bf16 and fp8 included, and the Triton interpreter (CPU, no bf16 arithmetic)
runs the very same kernel; CI checks it against `gather_reference`/`scatter_reference` bit for bit.

The destination of a gather (source of a scatter) may be pinned host memory when the cache is on a GPU: with
unified addressing the kernel writes it over PCIe directly (FACTS.md: ~95% of a contiguous copy).

`gather`/`scatter` choose the implementation: `"triton"` on CUDA, else the torch reference; `impl="triton"`
forces the kernels, on CPU through the interpreter (TRITON_INTERPRET=1, set before this module is imported).
"""

from __future__ import annotations

import os

import torch

from rdmapool.errors import UsageError
from rdmapool.kv.layouts import PagedKV, check_blocks, check_slots, gather_reference, scatter_reference

try:  # Triton is optional on CPU-only installs: the torch reference then does the work.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BLOCK = 256

if HAVE_TRITON:

    @triton.jit
    def _gather_kernel(ptrs, slots, out, block_size, s_blk, s_tok, s_head, s_dim, n_lp, chunk,
                       HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        lp = tl.program_id(0)
        t = tl.program_id(1)
        base = tl.load(ptrs + lp).to(tl.pointer_type(out.dtype.element_ty))
        slot = tl.load(slots + t)
        src = base + (slot // block_size) * s_blk + (slot % block_size) * s_tok
        n = t // chunk
        dst = out + ((n * n_lp + lp) * chunk + t % chunk).to(tl.int64) * HD
        for start in range(0, HD, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            m = idx < HD
            x = tl.load(src + (idx // D) * s_head + (idx % D) * s_dim, mask=m)
            tl.store(dst + idx, x, mask=m)

    @triton.jit
    def _scatter_kernel(ptrs, slots, blocks, block_size, s_blk, s_tok, s_head, s_dim, n_lp, chunk,
                        HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        lp = tl.program_id(0)
        t = tl.program_id(1)
        base = tl.load(ptrs + lp).to(tl.pointer_type(blocks.dtype.element_ty))
        slot = tl.load(slots + t)
        dst = base + (slot // block_size) * s_blk + (slot % block_size) * s_tok
        n = t // chunk
        src = blocks + ((n * n_lp + lp) * chunk + t % chunk).to(tl.int64) * HD
        for start in range(0, HD, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            m = idx < HD
            x = tl.load(src + idx, mask=m)
            tl.store(dst + (idx // D) * s_head + (idx % D) * s_dim, x, mask=m)


def triton_usable(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _choose(impl: str, kv: PagedKV) -> str:
    if impl == "auto":
        return "triton" if HAVE_TRITON and kv.device.type == "cuda" else "torch"
    if impl not in ("triton", "torch"):
        raise UsageError(f"impl must be auto, triton or torch, got {impl!r}")
    if impl == "triton" and not triton_usable(kv.device):
        raise UsageError("the Triton kernels need a CUDA cache or TRITON_INTERPRET=1")
    return impl


def _launch_args(kv: PagedKV, slots: torch.Tensor, chunk_tokens: int) -> tuple:
    ptrs = torch.tensor([v.data_ptr() for layer in kv.planes for v in layer], dtype=torch.int64, device=kv.device)
    s_blk, s_tok, s_head, s_dim = kv.first.stride()
    n_lp = kv.num_layers * kv.num_planes
    return (ptrs, slots, kv.block_size, s_blk, s_tok, s_head, s_dim, n_lp, chunk_tokens,
            kv.heads * kv.head_dim, kv.head_dim)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


def gather(kv: PagedKV, slots: torch.Tensor, out: torch.Tensor, chunk_tokens: int, impl: str = "auto") -> torch.Tensor:
    """Copy the tokens at `slots` (n * chunk_tokens of them) into `out` `[n, layers, planes, chunk, heads, dim]`."""
    n = check_slots(kv, slots, chunk_tokens)
    check_blocks(kv, out, n, chunk_tokens)
    if n == 0:
        return out
    if _choose(impl, kv) == "torch":
        return gather_reference(kv, slots, out)
    args = _launch_args(kv, slots, chunk_tokens)
    grid = (args[7], slots.numel())
    try:
        _gather_kernel[grid](args[0], args[1], _as_int(out), *args[2:], BLOCK=BLOCK)
    except ValueError:  # Triton refused a host destination it cannot address: gather on the device, then copy
        if out.device == kv.device:
            raise
        out.copy_(gather(kv, slots, kv.empty_blocks(out.shape[0], chunk_tokens), chunk_tokens, impl))
    return out


class LayerScatter:
    """Scatter pool blocks into a cache one layer at a time (a pipeline feeds layer l while layer l+1 is still
    arriving), with no host synchronisation per launch: the slot mapping is checked and the table of plane base
    addresses is built once, here, on the current stream (see `keep_for` when launching on another one)."""

    def __init__(self, kv: PagedKV, slots: torch.Tensor, chunk_tokens: int, impl: str = "auto") -> None:
        self.kv = kv
        self.n = check_slots(kv, slots, chunk_tokens)
        self.slots = slots
        self.chunk = chunk_tokens
        self.impl = _choose(impl, kv)
        self.args = _launch_args(kv, slots, chunk_tokens) if self.impl == "triton" else None

    def keep_for(self, stream: torch.cuda.Stream) -> None:
        """Launches queued on another stream than the one `slots` and the address table were made on: keep their
        memory from being reused (caching allocator) until that stream's queued work ran."""
        self.slots.record_stream(stream)
        if self.args is not None:
            self.args[0].record_stream(stream)

    def layers(self, first: int, blocks: torch.Tensor) -> None:
        """`blocks` `[n, g, planes, chunk, heads, dim]`: the chunks' slice of layers `first .. first + g - 1`."""
        kv = self.kv
        g = blocks.shape[1] if blocks.dim() == 6 else 0
        if not 0 <= first < first + g <= kv.num_layers:
            raise UsageError(f"layers {first}..{first + g - 1} out of range [0, {kv.num_layers})")
        some = PagedKV(kv.layout, kv.planes[first:first + g])
        check_blocks(some, blocks, self.n, self.chunk)
        if self.n == 0:
            return
        if self.args is None:
            scatter_reference(some, self.slots, blocks)
            return
        planes = kv.num_planes
        ptrs = self.args[0][first * planes:(first + g) * planes]
        grid = (g * planes, self.slots.numel())
        _scatter_kernel[grid](ptrs, self.slots, _as_int(blocks), *self.args[2:7], g * planes, *self.args[8:],
                              BLOCK=BLOCK)


def scatter(kv: PagedKV, slots: torch.Tensor, blocks: torch.Tensor, chunk_tokens: int, impl: str = "auto") -> None:
    """Copy pool blocks `[n, layers, planes, chunk, heads, dim]` into the cache at `slots`."""
    n = check_slots(kv, slots, chunk_tokens)
    check_blocks(kv, blocks, n, chunk_tokens)
    if n == 0:
        return
    if _choose(impl, kv) == "torch":
        scatter_reference(kv, slots, blocks)
        return
    args = _launch_args(kv, slots, chunk_tokens)
    grid = (args[7], slots.numel())
    try:
        _scatter_kernel[grid](args[0], args[1], _as_int(blocks), *args[2:], BLOCK=BLOCK)
    except ValueError:  # a host source Triton cannot address: copy it to the device first
        if blocks.device == kv.device:
            raise
        scatter(kv, slots, blocks.to(kv.device), chunk_tokens, impl)
