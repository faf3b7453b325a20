"""The KV-cache layer: chunk keys (`keys`), paged layouts and their gather/scatter (`layouts`, `kernels`), the
pool protocol the layer needs (`pool`), and engine adapters (`hf`)."""
