"""Builds the compiled hot paths in native/ as extension modules of the rdmapool package.

Each native/<name>.c becomes rdmapool._<name>; the pure-Python package works without them where a
fallback exists, and says so loudly where it does not.
"""
from pathlib import Path

from setuptools import Extension, setup

here = Path(__file__).parent
native = here / "native"
# xxh3-128 compiled once per instruction set; every module links them and picks the best at init
# (native/xxhash/kernels.h)
xxh3_kernels = [str(k.relative_to(here)) for k in sorted((native / "xxhash").glob("xxh3_*.c"))]
extensions = [
    Extension(
        f"rdmapool._{src.stem}",
        sources=[str(src.relative_to(here)), *xxh3_kernels],
        # parts a module includes from native/<name>/ and the shared native/xxhash/ (rebuild when they change)
        depends=[str(h.relative_to(here))
                 for h in sorted((native / src.stem).glob("*.h")) + sorted((native / "xxhash").glob("*.h"))],
        extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        libraries=["pthread"],
    )
    for src in sorted(native.glob("*.c"))
]
setup(ext_modules=extensions)
