"""The KV tests run the Triton kernels on CPU through Triton's interpreter unless a GPU is present.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, that is before rdmapool.kv.kernels is
imported; conftest runs first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
