"""Eviction policies, shared by memory servers and the trace simulator. `create(name)` makes one by name;
`DEFAULT` names what servers use."""

from __future__ import annotations

from collections.abc import Callable

from rdmapool.errors import UsageError
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key
from rdmapool.policy.lru import LRU

_FACTORIES: dict[str, Callable[..., EvictionPolicy]] = {"lru": LRU}
DEFAULT = "lru"


def create(name: str = "default", **options: object) -> EvictionPolicy:
    name = DEFAULT if name == "default" else name
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UsageError(f"unknown eviction policy {name!r}; choose one of {', '.join(sorted(_FACTORIES))}") from None
    return factory(**options)


def names() -> list[str]:
    return sorted(_FACTORIES)


__all__ = ["BlockInfo", "EvictionPolicy", "Key", "create", "names", "DEFAULT"]
