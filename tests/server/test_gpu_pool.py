"""GPU pools: a server whose slots live in CUDA memory. Skipped with the reason where no GPU exists."""

from __future__ import annotations

import pytest

from rdmapool.config import ServerConfig, TenantConfig
from rdmapool.errors import NoDevice, UsageError
from rdmapool.server import MemoryServer
from rdmapool.server.gpumem import cuda_available
from rdmapool.transport.base import MemoryKind

HAVE_GPU, WHY = cuda_available()


def config() -> ServerConfig:
    return ServerConfig(tenants=(TenantConfig("a", "token-a-secret", 4 << 20),), size_classes=(64 << 10,),
                        memory="cuda", transport="tcp")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=WHY)
def test_cuda_pool_is_allocated_and_registered() -> None:
    try:
        server = MemoryServer(config())
        server.start()
    except UsageError as exc:  # the transport cannot register device memory at all
        pytest.skip(f"transport tcp cannot register CUDA memory: {exc}")
    try:
        assert server.regions["a"].kind is MemoryKind.CUDA
    finally:
        server.stop()


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a GPU: the no-GPU error path does not apply")
def test_cuda_pool_without_gpu_fails_with_a_clear_error() -> None:
    with pytest.raises(NoDevice, match="no CUDA device"):
        MemoryServer(config()).start()
