"""Eviction policies, shared by memory servers and the trace simulator (the same objects). `create(name)`
makes one by name; `DEFAULT` names what servers use; `prefix-NAME` wraps any online policy NAME in the
prefix-aware wrapper. `belady` is offline (it needs `future=`, which `rdmapool sim` supplies)."""

from __future__ import annotations

from collections.abc import Callable

from rdmapool.errors import UsageError
from rdmapool.policy.arc import ARC
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key
from rdmapool.policy.belady import Belady
from rdmapool.policy.chainheat import ChainHeat
from rdmapool.policy.fluid import Fluid
from rdmapool.policy.hitdensity import HitDensity
from rdmapool.policy.lfu import LFU
from rdmapool.policy.lru import LRU
from rdmapool.policy.prefix import PrefixAware
from rdmapool.policy.s3fifo import S3FIFO
from rdmapool.policy.sieve import Sieve
from rdmapool.policy.ttl import TTL
from rdmapool.policy.wtinylfu import WTinyLFU

_FACTORIES: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "ttl": TTL,
    "wtinylfu": WTinyLFU,
    "s3fifo": S3FIFO,
    "sieve": Sieve,
    "arc": ARC,
    "chainheat": ChainHeat,
    "hitdensity": HitDensity,
    "fluid": Fluid,
    "belady": Belady,
}
#: policies that need knowledge of the future (simulation only)
OFFLINE = frozenset({"belady"})
#: online policies that get a `prefix-` variant
PREFIX_WRAPPABLE = ("lru", "lfu", "wtinylfu", "s3fifo", "sieve", "arc")
DEFAULT = "chainheat"


def create(name: str = "default", **options: object) -> EvictionPolicy:
    name = DEFAULT if name == "default" else name
    if name.startswith("prefix-") and name[len("prefix-"):] in PREFIX_WRAPPABLE:
        return PrefixAware(create(name[len("prefix-"):], **options))
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UsageError(f"unknown eviction policy {name!r}; choose one of {', '.join(names())}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise UsageError(f"bad options for policy {name!r}: {exc}") from None


def names() -> list[str]:
    """Every name `create` accepts (besides `default`)."""
    return sorted([*_FACTORIES, *(f"prefix-{n}" for n in PREFIX_WRAPPABLE)])


__all__ = ["BlockInfo", "EvictionPolicy", "Key", "create", "names", "DEFAULT", "OFFLINE"]
