"""rdmapool: a disaggregated memory pool for LLM KV caches."""

__version__ = "0.1.0"
