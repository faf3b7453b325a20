"""The KV-cache layer: chunk keys (`keys`), paged layouts and their gather/scatter (`layouts`, `kernels`), what the
layer needs from a pool (`pool`) and direct shm reads into device memory (`direct`), engine adapters (`hf`,
`vllm`), reused embeddings (`embeddings`), and the demo's pieces (`models`, `localcluster`, `worker`, `demo`)."""
