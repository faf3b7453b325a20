"""The slot lifecycle as data: the states and the one table of legal moves.

    FREE -> WRITING      allocate: a reservation with a new generation
    WRITING -> RESIDENT  commit by the writer, before its reservation expires
    WRITING -> RETIRED   abort, or the reservation expired (the writer died or is too slow)
    RESIDENT -> RETIRED  delete, eviction, TTL: invisible to lookups at once
    RETIRED -> FREE      once every read lease granted on the slot has expired, plus the grace time

A slot's generation changes only on FREE -> WRITING, so each use of a slot has its own generation and a read
that raced a reuse can always tell. `docs/server.md` draws its diagram from `MOVES`.
"""

from __future__ import annotations

import enum

from rdmapool.errors import UsageError


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    RESIDENT = 2
    RETIRED = 3


MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.FREE: frozenset({SlotState.WRITING}),
    SlotState.WRITING: frozenset({SlotState.RESIDENT, SlotState.RETIRED}),
    SlotState.RESIDENT: frozenset({SlotState.RETIRED}),
    SlotState.RETIRED: frozenset({SlotState.FREE}),
}


class IllegalMove(UsageError):
    """A slot was asked to make a move the lifecycle table does not allow (a bug in the caller)."""


def check_move(src: SlotState, dst: SlotState) -> None:
    if dst not in MOVES[src]:
        raise IllegalMove(f"slot cannot move {src.name} -> {dst.name}")


def mermaid() -> str:
    """The lifecycle as a mermaid state diagram (for the docs)."""
    lines = ["stateDiagram-v2", "    [*] --> FREE"]
    for src, dsts in MOVES.items():
        lines += [f"    {src.name} --> {dst.name}" for dst in sorted(dsts)]
    return "\n".join(lines)
