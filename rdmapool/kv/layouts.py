"""Engines' paged KV caches, seen as one shape, and the pool block they are gathered into.

Theory of operation
-------------------
Every supported cache reduces to *planes*: for each layer, one view per plane (K and V, or the single latent of
MLA) of logical shape `[num_blocks, block_size, heads, head_dim]`, with whatever strides the engine uses. A token's
*slot* is `block_id * block_size + offset` (vLLM's slot mapping). The adapters below only build views (no copies):

| layout           | per-layer tensor(s)                            | plane p view                         |
| ---------------- | ---------------------------------------------- | ------------------------------------ |
| `vllm-nhd`       | `[2, num_blocks, block_size, heads, head_dim]` | `t[p]`                               |
| `vllm-hnd`       | `[2, num_blocks, heads, block_size, head_dim]` | `t[p].permute(0, 2, 1, 3)`           |
| `flashinfer-nhd` | `[num_blocks, 2, block_size, heads, head_dim]` | `t[:, p]`                            |
| `flashinfer-hnd` | `[num_blocks, 2, heads, block_size, head_dim]` | `t[:, p].permute(0, 2, 1, 3)`        |
| `mla`            | `[num_blocks, block_size, dim]`                | `t.unsqueeze(2)` (one plane, 1 head) |
| `hf`             | `(K, V)`, each `[batch, heads, seq, head_dim]` | `K.permute(0, 2, 1, 3)`: a row is a block |

A *pool block* holds one chunk of `C` tokens for every layer, contiguous, as `[layers, planes, C, heads, head_dim]`;
n chunks are `[n, layers, planes, C, heads, head_dim]`. Its bytes do not depend on the engine's layout, so a block
written from a vLLM cache can be read into an HF cache (the layout still goes into the key namespace, because
block sizes and head splits must agree).

`gather_reference`/`scatter_reference` are the plain-torch definition of the copy; `rdmapool.kv.kernels` has the
Triton kernels that do the same in one launch for all layers and must match them bit for bit.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rdmapool.errors import UsageError


class Layout(enum.StrEnum):
    VLLM_NHD = "vllm-nhd"
    VLLM_HND = "vllm-hnd"
    FLASHINFER_NHD = "flashinfer-nhd"
    FLASHINFER_HND = "flashinfer-hnd"
    MLA = "mla"
    HF = "hf"


@dataclass(frozen=True, eq=False)
class PagedKV:
    """Per-layer plane views `[num_blocks, block_size, heads, head_dim]`; all share shape, strides and dtype."""

    layout: Layout
    planes: tuple[tuple[torch.Tensor, ...], ...]

    @property
    def num_layers(self) -> int:
        return len(self.planes)

    @property
    def num_planes(self) -> int:
        return len(self.planes[0])

    @property
    def first(self) -> torch.Tensor:
        return self.planes[0][0]

    @property
    def num_blocks(self) -> int:
        return self.first.shape[0]

    @property
    def block_size(self) -> int:
        return self.first.shape[1]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def heads(self) -> int:
        return self.first.shape[2]

    @property
    def head_dim(self) -> int:
        return self.first.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.first.dtype

    @property
    def device(self) -> torch.device:
        return self.first.device

    def block_shape(self, n_chunks: int, chunk_tokens: int) -> tuple[int, ...]:
        return (n_chunks, self.num_layers, self.num_planes, chunk_tokens, self.heads, self.head_dim)

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return (self.num_layers * self.num_planes * chunk_tokens * self.heads * self.head_dim
                * self.dtype.itemsize)

    def empty_blocks(self, n_chunks: int, chunk_tokens: int, device: Any = None, pin: bool = False) -> torch.Tensor:
        device = self.device if device is None else torch.device(device)
        return torch.empty(self.block_shape(n_chunks, chunk_tokens), dtype=self.dtype, device=device,
                           pin_memory=pin and device.type == "cpu")


def _plane_views(layout: Layout, t: Any) -> tuple[torch.Tensor, ...]:
    if layout is Layout.HF:
        if not (isinstance(t, tuple | list) and len(t) == 2):
            raise UsageError("an hf layer is a (keys, values) pair of [batch, heads, seq, head_dim] tensors")
        for x in t:
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise UsageError("hf keys/values must be 4-d tensors [batch, heads, seq, head_dim]")
        return tuple(x.permute(0, 2, 1, 3) for x in t)
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"a {layout.value} layer is one tensor, got {type(t).__name__}")
    if layout is Layout.MLA:
        if t.dim() != 3:
            raise UsageError(f"mla layer must be [num_blocks, block_size, dim], got {tuple(t.shape)}")
        return (t.unsqueeze(2),)
    if t.dim() != 5:
        raise UsageError(f"{layout.value} layer must be 5-d, got {tuple(t.shape)}")
    if layout in (Layout.VLLM_NHD, Layout.VLLM_HND):
        if t.shape[0] != 2:
            raise UsageError(f"{layout.value} layer must be [2, num_blocks, ...], got {tuple(t.shape)}")
        views = (t[0], t[1])
    else:
        if t.shape[1] != 2:
            raise UsageError(f"{layout.value} layer must be [num_blocks, 2, ...], got {tuple(t.shape)}")
        views = (t[:, 0], t[:, 1])
    if layout in (Layout.VLLM_HND, Layout.FLASHINFER_HND):
        views = tuple(v.permute(0, 2, 1, 3) for v in views)
    return views


def paged_kv(layout: Layout | str, layers: Sequence[Any]) -> PagedKV:
    """Wrap an engine's per-layer cache tensors (no copy). All layers must share shape, strides and dtype."""
    try:
        layout = Layout(layout)
    except ValueError:
        raise UsageError(f"unknown KV layout {layout!r}; known: {', '.join(x.value for x in Layout)}") from None
    if not layers:
        raise UsageError("a KV cache needs at least one layer")
    planes = tuple(_plane_views(layout, t) for t in layers)
    ref = planes[0][0]
    for li, layer in enumerate(planes):
        for v in layer:
            if v.shape != ref.shape or v.stride() != ref.stride() or v.dtype != ref.dtype or v.device != ref.device:
                raise UsageError(f"layer {li} differs from layer 0 in shape, strides, dtype or device")
    return PagedKV(layout, planes)


def check_slots(kv: PagedKV, slots: torch.Tensor, chunk_tokens: int) -> int:
    """Validate a slot mapping; returns the number of chunks it covers."""
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype != torch.int64:
        raise UsageError("slots must be a 1-d int64 tensor")
    if slots.numel() % chunk_tokens:
        raise UsageError(f"{slots.numel()} slots is not a whole number of {chunk_tokens}-token chunks")
    if slots.device != kv.device:
        raise UsageError(f"slots are on {slots.device}, the cache on {kv.device}")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= kv.num_slots):
        raise UsageError(f"slot out of range [0, {kv.num_slots})")
    return slots.numel() // chunk_tokens


def check_blocks(kv: PagedKV, blocks: torch.Tensor, n_chunks: int, chunk_tokens: int) -> None:
    want = kv.block_shape(n_chunks, chunk_tokens)
    if tuple(blocks.shape) != want or blocks.dtype != kv.dtype or not blocks.is_contiguous():
        raise UsageError(f"blocks must be contiguous {kv.dtype} {want}, got {blocks.dtype} {tuple(blocks.shape)}")


def gather_reference(kv: PagedKV, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Plain torch: out[n, layer, plane, c] = plane_view[slot // block_size, slot % block_size]."""
    n = out.shape[0]
    c = out.shape[3]
    idx_b = (slots // kv.block_size).to(kv.device)
    idx_o = (slots % kv.block_size).to(kv.device)
    for li, layer in enumerate(kv.planes):
        for p, view in enumerate(layer):
            out[:, li, p] = view[idx_b, idx_o].reshape(n, c, kv.heads, kv.head_dim).to(out.device)
    return out


def scatter_reference(kv: PagedKV, slots: torch.Tensor, blocks: torch.Tensor) -> None:
    """Plain torch: plane_view[slot // block_size, slot % block_size] = blocks[n, layer, plane, c]."""
    idx_b = (slots // kv.block_size).to(kv.device)
    idx_o = (slots % kv.block_size).to(kv.device)
    for li, layer in enumerate(kv.planes):
        for p, view in enumerate(layer):
            view[idx_b, idx_o] = blocks[:, li, p].reshape(-1, kv.heads, kv.head_dim).to(kv.device)
