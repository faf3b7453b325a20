"""The native modules carry xxh3-128 compiled for several instruction sets and pick the best the CPU runs
(native/xxhash/kernels.h). Each kernel this CPU can run gives exactly the xxhash package's digests on every path
that hashes natively: the hash pool, the shm Mover's copy + digest and the tcp engine's READ digests (the digest
tests run again in a child process per kernel). A bad RDMAPOOL_XXH3_KERNEL fails the import, naming itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
hashpool = pytest.importorskip("rdmapool._hashpool", reason="the native modules are not built (setup.py build_ext)")

#: the tests that hash natively, rerun under each kernel
DIGEST_TESTS = [
    "tests/transport/test_transport_conformance.py::test_digest_is_the_hash_of_the_local_sge_or_none",
    "tests/transport/test_transport_conformance.py::test_digests_of_a_batch_of_reads_of_mixed_sizes",
    "tests/transport/test_shm.py::test_digest_of_read_and_write_equals_hashing_the_local_bytes",
    "tests/transport/test_shm.py::test_native_digest_matches_the_xxhash_package",
    "tests/transport/test_tcp_engine.py::test_digest_thread_hashes_reads_and_ends_with_its_endpoint",
    "tests/client/test_hashing.py::test_batch_digests_equal_xxhash_in_any_waiting_order",
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def runnable_kernels() -> list[str]:
    flags = cpu_flags()
    return ["base"] + [k for k, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if flag in flags]


def child(env_kernel: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RDMAPOOL_XXH3_KERNEL": env_kernel, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_best_kernel_the_cpu_runs_is_picked() -> None:
    from rdmapool import _shmatomics, _tcpengine

    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("kernels other than the baseline are x86-64 only")
    if os.environ.get("RDMAPOOL_XXH3_KERNEL"):
        pytest.skip("RDMAPOOL_XXH3_KERNEL caps the kernel in this process")
    best = runnable_kernels()[-1]
    picked = {hashpool.KERNEL, _shmatomics.KERNEL, _tcpengine.KERNEL}
    assert picked == {best}


@pytest.mark.parametrize("kernel", ["base", "avx2", "avx512"])
def test_each_kernel_gives_the_xxhash_digests_on_every_native_path(kernel: str) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("kernels other than the baseline are x86-64 only")
    if kernel not in runnable_kernels():
        pytest.skip(f"this CPU cannot run the {kernel} kernel")
    probe = "from rdmapool import _hashpool, _shmatomics, _tcpengine as t; print(_hashpool.KERNEL, _shmatomics.KERNEL, t.KERNEL)"
    picked = child(kernel, "-c", probe)
    assert picked.stdout.split() == [kernel] * 3, picked.stderr
    run = child(kernel, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DIGEST_TESTS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_an_unknown_kernel_name_fails_the_import_naming_the_variable() -> None:
    out = child("sse9", "-c", "import rdmapool._hashpool")
    assert out.returncode != 0
    assert "RDMAPOOL_XXH3_KERNEL must be avx512, avx2 or base, not sse9" in out.stderr
