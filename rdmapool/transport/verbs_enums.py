"""pyverbs loading and enum lookup that works with both styles of pyverbs builds.

pyverbs declares its constants as Cython `cpdef enum`s. Builds made with Cython < 3.1 (Debian 12's rdma-core 44,
Ubuntu 22.04/24.04) copy every member into the module namespace (`enums.IBV_WR_RDMA_READ`); builds with Cython
>= 3.1 (newer distributions) only expose them through their enum class (`enums.ibv_wr_opcode.IBV_WR_RDMA_READ`).
`E.NAME` here looks in the module first and then in every `ibv_*` enum class, and returns a plain int, so the
rest of the backend never depends on which style it got.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from rdmapool.errors import NoDevice

ALTERNATIVES = ("use transport=tcp instead, or test verbs on soft-RoCE: scripts/rxe-setup.sh (a host kernel with "
                "rdma_rxe) or scripts/vm/exec.sh (a QEMU VM with rxe, needs no host RDMA support)")
NO_PYVERBS_HINT = "install python3-pyverbs (rdma-core) and expose it to this interpreter; or " + ALTERNATIVES


def import_pyverbs(module: str = "enums") -> ModuleType:
    """Import `pyverbs.<module>` or fail with NoDevice naming what is missing."""
    try:
        return importlib.import_module(f"pyverbs.{module}")
    except ImportError as exc:
        raise NoDevice(f"transport=verbs needs pyverbs, which cannot be imported ({exc}); {NO_PYVERBS_HINT}") from exc


class EnumTable:
    """Attribute access to pyverbs enum members as ints, whichever Cython style the module was built with."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self._cache: dict[str, int] = {}
        self._classes = [
            getattr(module, n) for n in dir(module) if n.startswith("ibv_") and isinstance(getattr(module, n), type)
        ]

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        cache = self.__dict__["_cache"]
        if name in cache:
            return cache[name]
        value = getattr(self._module, name, None)
        if value is None:
            for cls in self._classes:
                value = getattr(cls, name, None)
                if value is not None:
                    break
        if value is None:
            raise AttributeError(f"pyverbs has no enum member {name}")
        cache[name] = int(value)
        return cache[name]

    def has(self, name: str) -> bool:
        try:
            getattr(self, name)
        except AttributeError:
            return False
        return True


_table: EnumTable | None = None


def enums() -> EnumTable:
    """The process-wide table over `pyverbs.enums` (imports pyverbs on first use)."""
    global _table
    if _table is None:
        _table = EnumTable(import_pyverbs("enums"))
    return _table
