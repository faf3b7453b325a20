"""Transfer plans for the native mover: a `TransferPlan` resolved once into the packed tables `run_plan` reads.

Each local SGE becomes (addr, len, writable, err) and each remote target (ptr in this process's mapping, bytes
available from ptr, valid_ptr, rkey, access bits, err), where err is the WcStatus that any request using the
entry completes with (0: usable). Checks that can change later (the region's valid word) stay in the mover.

A resolved plan holds raw pointers into mappings and local regions, so the cache is keyed by the plan object
*and* the transport's local epoch (bumped when a local region goes away), and the endpoint clears it whenever it
drops a mapping. Plans with GPU SGEs are not packed (None): the endpoint runs them request by request.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from rdmapool.transport.base import TransferPlan, WcStatus

PLAN_LOCAL = struct.Struct("<QQQQ")  # addr, len, writable, err
PLAN_REMOTE = struct.Struct("<QQQQQQ")  # ptr, avail, valid_ptr, rkey, access, err

#: rkey -> the endpoint's mapping of that region (addr, end, access, base, valid_ptr), or a WcStatus int
RemoteLookup = Callable[[int], Any]


def pack(plan: TransferPlan, local_regions: Mapping[int, Any], remote: RemoteLookup) -> tuple[bytes | None, bytes]:
    if any(getattr(local_regions.get(sge.lkey), "cuda", False) for sge in plan.local):
        return None, b""
    local = bytearray()
    for sge in plan.local:
        loc = local_regions.get(sge.lkey)
        if loc is None or sge.addr < loc.addr or sge.addr + sge.length > loc.end:
            local += PLAN_LOCAL.pack(0, sge.length, 0, WcStatus.LOC_PROT_ERR)
        else:
            local += PLAN_LOCAL.pack(sge.addr, sge.length, int(loc.writable), 0)
    remotes = bytearray()
    for addr, rkey in plan.remote:
        rem = remote(rkey)
        if isinstance(rem, int):
            remotes += PLAN_REMOTE.pack(0, 0, 0, 0, 0, rem)
        elif not rem.addr <= addr <= rem.end:
            remotes += PLAN_REMOTE.pack(0, 0, 0, 0, 0, WcStatus.REM_ACCESS_ERR)
        else:
            remotes += PLAN_REMOTE.pack(rem.base + addr - rem.addr, rem.end - addr, rem.valid_ptr, rkey, rem.access, 0)
    return bytes(local), bytes(remotes)


class PlanCache:
    """The last `size` plans an endpoint resolved (the plan object is kept, so its id cannot be reused)."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._plans: dict[int, tuple[TransferPlan, int, bytes | None, bytes]] = {}

    def get(self, plan: TransferPlan, epoch: int) -> tuple[bytes | None, bytes] | None:
        hit = self._plans.get(id(plan))
        if hit is not None and hit[0] is plan and hit[1] == epoch:
            return hit[2], hit[3]
        return None

    def put(self, plan: TransferPlan, epoch: int, packed: tuple[bytes | None, bytes]) -> None:
        if len(self._plans) >= self._size:
            del self._plans[next(iter(self._plans))]
        self._plans[id(plan)] = (plan, epoch, packed[0], packed[1])

    def clear(self) -> None:
        self._plans.clear()
