"""Models for the HF integration: local weights (`--model PATH`) or a small model built from a config with seeded
random weights (there is no model hub here, and nothing is ever downloaded), plus the model's fingerprint.

The fingerprint (model id + weights revision) goes into every KV key's namespace, so it must change whenever the
weights do: for local weights it is a hash of the weight files' bytes; for random models, of the config, the seed,
the torch version (initialisers differ between releases) and the device kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from rdmapool.errors import UsageError

ARCHS = ("llama", "qwen2", "mistral", "gpt2")

#: name -> (architecture, config overrides). "tiny" runs the CPU demo and tests; "small" the `--device cuda` demo;
#: "llama3-8b" is Llama-3-8B's shape (32 layers x 8 KV heads x 128) for the GPU benchmark.
SIZES: dict[str, dict[str, int]] = {
    "micro": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512),
    "tiny": dict(hidden=256, layers=4, heads=8, kv_heads=2, inter=688, vocab=4096),
    "small": dict(hidden=1024, layers=12, heads=16, kv_heads=4, inter=2816, vocab=32000),
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, vocab=128256),
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    arch: str = "llama"
    size: str = "tiny"
    seed: int = 0
    max_positions: int = 40960
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.arch not in ARCHS:
            raise UsageError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.path is None and self.size not in SIZES:
            raise UsageError(f"unknown model size {self.size!r}; known: {', '.join(SIZES)}")


def make_config(spec: ModelSpec) -> Any:
    import transformers as tf

    s = SIZES[spec.size]
    if spec.arch == "gpt2":
        return tf.GPT2Config(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                             n_positions=spec.max_positions, bos_token_id=0, eos_token_id=0)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[spec.arch]
    extra = {"sliding_window": None} if spec.arch in ("mistral", "qwen2") else {}
    return cls(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
               num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
               max_position_embeddings=spec.max_positions, bos_token_id=0, eos_token_id=0,
               tie_word_embeddings=False, **extra)


def _hash_weights(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if not files:
        raise UsageError(f"no weight files (*.safetensors, *.bin) in {path}")
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def fingerprint(spec: ModelSpec, device: str, dtype: torch.dtype) -> tuple[str, str]:
    """(model id, weights revision)."""
    if spec.path:
        path = Path(spec.path)
        return path.resolve().name, _hash_weights(path)
    cfg = make_config(spec).to_dict()
    blob = json.dumps([cfg, spec.seed, torch.__version__, torch.device(device).type, str(dtype)], sort_keys=True)
    return f"random-{spec.arch}-{spec.size}", xxhash.xxh3_128_hexdigest(blob.encode())


def load_model(spec: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The model in eval mode on `device`. Random weights are drawn on the target device from `spec.seed`."""
    import transformers as tf

    if spec.path:
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {path}: no config.json there (only local weights are supported)")
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        return model.to(device).eval()
    cfg = make_config(spec)
    torch.manual_seed(spec.seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(spec.seed)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def kv_geometry(spec: ModelSpec) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from the config alone (no weights), to size pool slots before loading."""
    if spec.path:
        import transformers as tf

        cfg = tf.AutoConfig.from_pretrained(spec.path, local_files_only=True)
    else:
        cfg = make_config(spec)
    if getattr(cfg, "model_type", "") == "gpt2":
        return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def chunk_bytes(spec: ModelSpec, dtype: torch.dtype, chunk_tokens: int) -> int:
    layers, kv_heads, head_dim = kv_geometry(spec)
    return 2 * layers * chunk_tokens * kv_heads * head_dim * dtype.itemsize
