"""Time to live with admission: a block is protected for `ttl` seconds after its last access (or after its
insert, with refresh=False). While nothing has expired, a newcomer is bypassed instead of displacing a
protected block; once something has expired, the earliest expiry goes first.

Unlike LRU this keeps a chain for a fixed time even under pressure, so a small pool holds a subset of chains
long enough for their next turn (think times are minutes) instead of all chains too briefly.
Keys are kept in expiry order; with one ttl for all, that is an OrderedDict: O(1) per call."""

from __future__ import annotations

from collections import OrderedDict

from rdmapool.errors import UsageError
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class TTL(EvictionPolicy):
    name = "ttl"

    def __init__(self, ttl: float = 180.0, refresh: bool = True) -> None:
        if not ttl > 0:
            raise UsageError(f"ttl must be > 0 seconds, got {ttl!r}")
        self.ttl = float(ttl)
        self.refresh = refresh
        self._expiry: OrderedDict[Key, float] = OrderedDict()

    def admit(self, info: BlockInfo, now: float) -> bool:
        first = next(iter(self._expiry.values()), None)
        return first is None or first <= now

    def on_insert(self, info: BlockInfo, now: float) -> None:
        self._expiry[info.key] = now + self.ttl
        self._expiry.move_to_end(info.key)

    def on_access(self, key: Key, now: float) -> None:
        if self.refresh and key in self._expiry:
            self._expiry[key] = now + self.ttl
            self._expiry.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._expiry.pop(key, None)

    def victim(self, now: float) -> Key | None:
        return next(iter(self._expiry), None)

    def expired(self, now: float) -> list[Key]:
        """Keys whose time is up (a server may drop them before it is full)."""
        out = []
        for key, t in self._expiry.items():
            if t > now:
                break
            out.append(key)
        return out

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: Key) -> bool:
        return key in self._expiry
