"""Prefix-aware wrapper: with prefix-contiguous hits a block is worthless once its parent is gone, and a
chain loses least when it is cut from its tail.

Theory of operation: the wrapper keeps, per resident key, its resident children. When a key is removed, its
resident children become orphans; orphans are evicted before anything the inner policy would name. Otherwise
the inner policy names a key and the wrapper evicts the deepest resident descendant along one path below it
(its chain's tail) instead, remembering the path so that cutting a whole chain costs O(1) per block. A
newcomer whose parent was just removed or bypassed here is bypassed too. A parent this server never saw (a
chain sharded over several servers) is assumed to live elsewhere: nothing is orphaned by it."""

from __future__ import annotations

from collections import OrderedDict

from rdmapool.policy._structs import Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class PrefixAware(EvictionPolicy):
    def __init__(self, inner: EvictionPolicy) -> None:
        self.inner = inner
        self.name = f"prefix-{inner.name}"
        self._parent: dict[Key, Key | None] = {}
        self._children: dict[Key, set[Key]] = {}
        self._orphans: OrderedDict[Key, None] = OrderedDict()
        self._orphans_of: dict[Key, set[Key]] = {}
        self._gone: OrderedDict[Key, None] = OrderedDict()
        self._path: list[Key] = []
        self._peak = Peak()

    def _forget_gone(self, key: Key) -> None:
        self._gone[key] = None
        self._gone.move_to_end(key)
        while len(self._gone) > max(64, self._peak.value):
            self._gone.popitem(last=False)

    def admit(self, info: BlockInfo, now: float) -> bool:
        if info.parent is not None and info.parent in self._gone or not self.inner.admit(info, now):
            self._forget_gone(info.key)
            return False
        return True

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key, parent = info.key, info.parent
        if key in self._parent:
            self.on_access(key, now)
            return
        self._gone.pop(key, None)
        self._parent[key] = parent
        self._children[key] = set()
        if parent is not None:
            if parent in self._children:
                self._children[parent].add(key)
            elif parent in self._gone:
                self._orphans[key] = None
                self._orphans_of.setdefault(parent, set()).add(key)
        for child in self._orphans_of.pop(key, ()):
            if self._orphans.pop(child, 0) is None:
                self._children[key].add(child)
        self.inner.on_insert(info, now)
        self._peak.see(len(self._parent))

    def on_access(self, key: Key, now: float) -> None:
        self.inner.on_access(key, now)

    def on_remove(self, key: Key) -> None:
        if key not in self._parent:
            return
        self.inner.on_remove(key)
        parent = self._parent.pop(key)
        if parent is not None:
            if parent in self._children:
                self._children[parent].discard(key)
            elif self._orphans.pop(key, 0) is None:
                siblings = self._orphans_of.get(parent)
                if siblings is not None:
                    siblings.discard(key)
                    if not siblings:
                        del self._orphans_of[parent]
        children = self._children.pop(key)
        if children:
            self._orphans_of[key] = children
            for child in children:
                self._orphans[child] = None
        self._forget_gone(key)

    def victim(self, now: float) -> Key | None:
        if self._orphans:
            return next(iter(self._orphans))
        top = self.inner.victim(now)
        if top is None:
            return None
        path = self._path
        if not path or path[0] != top:
            path.clear()
            path.append(top)
        while path[-1] not in self._parent:
            path.pop()
        children = self._children
        while children[path[-1]]:
            path.append(next(iter(children[path[-1]])))
        return path[-1]

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: Key) -> bool:
        return key in self._parent
