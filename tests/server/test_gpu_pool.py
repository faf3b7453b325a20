"""GPU pools: a server whose slots live in CUDA memory, served one-sidedly only by GPUDirect transports (verbs).
Hardware-bound parts are skipped with the reason; the configuration errors are checked everywhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rdmapool.config import ServerConfig, TenantConfig
from rdmapool.errors import NoDevice, UsageError
from rdmapool.server import MemoryServer
from rdmapool.server.gpumem import allocate_cuda, cuda_available
from rdmapool.transport.base import MemoryKind

HAVE_GPU, WHY = cuda_available()


def config(transport: str) -> ServerConfig:
    return ServerConfig(tenants=(TenantConfig("a", "token-a-secret", 4 << 20),), size_classes=(64 << 10,),
                        memory="cuda", transport=transport)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_cuda_pool_on_a_transport_that_cannot_serve_it_is_refused(transport: str) -> None:
    with pytest.raises(UsageError, match="needs a transport that serves GPU memory"):
        MemoryServer(config(transport)).start()


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a GPU: the no-GPU error path does not apply")
def test_cuda_pool_without_gpu_fails_with_a_clear_error() -> None:
    with pytest.raises(NoDevice, match="no CUDA device"):
        allocate_cuda(SimpleNamespace(name="verbs"), 1 << 20)


@pytest.mark.gpu
@pytest.mark.rdma
def test_cuda_pool_is_allocated_and_registered_over_verbs() -> None:
    if not HAVE_GPU:
        pytest.skip(WHY)
    try:
        server = MemoryServer(config("verbs"))
        server.start()
    except NoDevice as exc:
        pytest.skip(f"needs an RDMA device for GPUDirect: {exc}")
    try:
        assert server.regions["a"].kind is MemoryKind.CUDA
    finally:
        server.stop()
