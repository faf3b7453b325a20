"""An HF `DynamicCache` over preallocated buffers: pool chunks land in place, new tokens are written in place.

Theory of operation
-------------------
transformers' `DynamicLayer` grows by `torch.cat` on every `update`, and `DynamicCache(pairs)` itself builds
each layer by one such concatenation: a cache read from the pool would be copied twice more (at 32k tokens of a
Llama-3-8B-shaped model, 2 x 4 GiB through device memory, plus the allocations) before attention reads it.
`PreallocLayer` keeps `[batch, heads, capacity, head_dim]` buffers and exposes their first `length` positions as
`keys`/`values` (views); `update` copies the new states into the next positions and widens the views, so the
values attention sees are the same as with concatenation. Beyond the capacity it falls back to concatenation.

A layer may carry a CUDA event that its buffers' contents wait for (a pipelined load scatters layer l while layer
l+1 is still being copied): `update` makes the current stream wait on it before touching the buffers, so the
forward pass starts before the whole cache has arrived. `prealloc_cache` returns None when the installed
transformers has no `DynamicLayer` (callers then use `make_cache`).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: callers fall back to concatenation
    DynamicLayer = None


if DynamicLayer is not None:

    class PreallocLayer(DynamicLayer):
        """A `DynamicLayer` whose keys/values are leading views of preallocated buffers (see the module doc)."""

        def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int, ready: Any = None) -> None:
            super().__init__()
            self._kbuf, self._vbuf = kbuf, vbuf
            self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]
            self.dtype, self.device = kbuf.dtype, kbuf.device
            self.is_initialized = True
            self.ready = ready

        def wait_ready(self) -> None:
            if self.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready)
                self.ready = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            self.wait_ready()
            n, m = self.keys.shape[-2], key_states.shape[-2]
            buf = self._kbuf
            if buf is None or n + m > buf.shape[-2] or key_states.shape[:2] != buf.shape[:2] \
                    or key_states.dtype != buf.dtype:
                self._kbuf = self._vbuf = None  # from now on an ordinary concatenating layer
                return super().update(key_states, value_states, *args, **kwargs)
            self._kbuf[:, :, n:n + m].copy_(key_states)
            self._vbuf[:, :, n:n + m].copy_(value_states)
            self.keys, self.values = self._kbuf[:, :, :n + m], self._vbuf[:, :, :n + m]
            return self.keys, self.values


def prealloc_cache(buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int,
                   ready: list[Any] | None = None) -> Any:
    """A DynamicCache whose layer i shows `buffers[i][:, :, :length]`; None if this transformers lacks layers."""
    if DynamicLayer is None:
        return None
    cache = DynamicCache()
    if not isinstance(getattr(cache, "layers", None), list):
        return None
    cache.layers[:] = [PreallocLayer(k, v, length, ready[i] if ready else None)
                       for i, (k, v) in enumerate(buffers)]
    return cache


def wait_all(cache: Any) -> None:
    """Make the current stream wait for every layer's pending contents (layers a forward pass did not touch)."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "wait_ready"):
            layer.wait_ready()
