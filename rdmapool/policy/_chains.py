"""What chain-aware policies (chainheat, fluid) know of a newcomer before it is resident.

A mixin, because both keep the same bookkeeping: `_ghost` (key -> (heat, ...) of evicted blocks), `_meta`
(resident key -> (heat, ...)), `_children` (parent key -> resident children), `shared_children` and
`_full_tokens` (the largest block seen: smaller ones are partial chain tails, almost never reused), and a
bounded ghost of evicted keys (`_ghost`, `_peak`, `ghost_factor`)."""

from __future__ import annotations

from rdmapool.policy.base import BlockInfo, Key


class ChainMemory:
    def _new_heat(self, info: BlockInfo) -> int:
        """A returning block is one hotter than when it left; a new turn's block inherits its parent's heat
        unless the parent is shared by many chains (a system prompt says nothing about this conversation)."""
        ghost = self._ghost.get(info.key)
        if ghost is not None:
            return ghost[0] + 1
        p = info.parent
        if p is not None:
            m = self._meta.get(p)
            if m is not None and self._children.get(p, 0) < self.shared_children:
                return m[0]
        return 1

    def _partial(self, info: BlockInfo) -> bool:
        if info.tokens > self._full_tokens:
            self._full_tokens = info.tokens
        return 0 < info.tokens < self._full_tokens

    def _remember(self, key: Key, heat: int, touched: float, *extra: int) -> None:
        """Keep an evicted key's heat in the ghost, bounded to `ghost_factor` x the peak population."""
        ghost = self._ghost
        ghost[key] = (heat, touched, *extra)
        ghost.move_to_end(key)
        limit = max(64, int(self.ghost_factor * self._peak.value))
        while len(ghost) > limit:
            ghost.popitem(last=False)
