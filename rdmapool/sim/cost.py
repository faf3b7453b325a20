"""Prefill cost model, for "compute saved".

Prefilling token i (0-based) of a prompt costs 2*P FLOPs in the weights (P parameters, one multiply-add per
parameter) plus 4*L*d*i in attention (L layers, model width d: QK^T and attention-times-V each take one
multiply-add per earlier token and channel). A prompt of n tokens costs 2*P*n + 2*L*d*n*(n-1). A prefix hit
of h tokens skips the first h tokens' share, prefix_flops(h); the rest of the prompt is still computed (and
attends to the cached prefix). Later tokens cost more, so a token hit ratio undercounts deep hits slightly.
KV bytes per token (bf16) convert a capacity in bytes to blocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCost:
    name: str
    params: float
    layers: int
    d_model: int
    kv_bytes_per_token: int

    def prefix_flops(self, n: int) -> float:
        return 2.0 * self.params * n + 2.0 * self.layers * self.d_model * n * (n - 1)


MODELS: dict[str, ModelCost] = {
    m.name: m
    for m in (
        ModelCost("llama-3-8b", 8.03e9, 32, 4096, 2 * 32 * 8 * 128 * 2),
        ModelCost("qwen2.5-7b", 7.62e9, 28, 3584, 2 * 28 * 4 * 128 * 2),
        ModelCost("llama-3-70b", 70.6e9, 80, 8192, 2 * 80 * 8 * 128 * 2),
    )
}
