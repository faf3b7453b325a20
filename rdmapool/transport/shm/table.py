"""The region table: a control segment through which an owner publishes its regions to co-located clients.

Layout (little-endian; offsets in bytes)::

    0  magic u64 | 8 version u32, max_regions u32 | 16 owner pid u64 | 24 owner start u64 | 32 state u64
    4096 + 32*slot: live u64 | addr u64 | length u64 | access u64        (one entry per slot)

`live` is the per-region valid word: 0 when the slot is free, else the region's rkey. An rkey is
`slot | generation << 12` (generation >= 1, bit 31 clear), so a slot that is reused gets a new rkey and an old
rkey never matches again. The owner writes addr/length/access first and publishes with a release store of
`live`; deregistration is one release store of 0. Clients check `live == rkey` with an acquire load before
every operation (in the native batch mover) and re-check after reading an entry (a seqlock of one word).

What a client racing with deregistration can see: an operation whose check passed before the store of 0
completes against the region's pages as they were (the client's own mapping keeps those pages alive, so it
never reaches memory that was handed out for something else); every check after the store fails with
REM_ACCESS_ERR. This is the same window an RDMA NIC gives for an operation in flight when ibv_dereg_mr runs.

`state` is OPEN while the owner serves and CLOSED after a clean close; a dead owner is detected separately
(pidfd), since it cannot write anything.
"""

from __future__ import annotations

import struct

from rdmapool import _shmatomics as native
from rdmapool.errors import UsageError
from rdmapool.transport.base import Access
from rdmapool.transport.shm.naming import Owner
from rdmapool.transport.shm.segment import Segment

MAGIC = int.from_bytes(b"RDMAPSHM", "little")
VERSION = 1
STATE_OPEN = 1
STATE_CLOSED = 2
STATE_OFF = 32
ENTRY_OFF = 4096
ENTRY_SIZE = 32
SLOT_BITS = 12
MAX_REGIONS = 1 << SLOT_BITS
GEN_MASK = (1 << (31 - SLOT_BITS)) - 1
LOCAL_ONLY = 1 << 31  # rkeys of register()ed private buffers: never reachable through shm

_HEADER = struct.Struct("<QIIQQQ")
_ENTRY = struct.Struct("<QQQQ")


def table_size(max_regions: int) -> int:
    return ENTRY_OFF + ENTRY_SIZE * max_regions


def slot_of(rkey: int) -> int:
    return rkey & (MAX_REGIONS - 1)


class RegionTable:
    """Owner side: allocates slots and rkeys, publishes and retracts entries."""

    def __init__(self, seg: Segment, owner: Owner, max_regions: int = MAX_REGIONS) -> None:
        if not 1 <= max_regions <= MAX_REGIONS:
            raise UsageError(f"max_regions must be in [1, {MAX_REGIONS}], got {max_regions}")
        self.seg = seg
        self.max_regions = max_regions
        self._free = list(range(max_regions - 1, -1, -1))
        self._gen = [0] * max_regions
        _HEADER.pack_into(seg.mm, 0, MAGIC, VERSION, max_regions, owner.pid, owner.start, STATE_OPEN)

    def reserve(self) -> int:
        """Take a free slot and a fresh rkey for it; nothing is visible to clients until `publish`."""
        if not self._free:
            raise UsageError(f"the shm region table is full ({self.max_regions} regions)")
        slot = self._free.pop()
        gen = self._gen[slot] % GEN_MASK + 1
        self._gen[slot] = gen
        return slot | gen << SLOT_BITS

    def publish(self, rkey: int, addr: int, length: int, access: Access) -> None:
        off = ENTRY_OFF + slot_of(rkey) * ENTRY_SIZE
        _ENTRY.pack_into(self.seg.mm, off, 0, addr, length, int(access))
        native.store64(self.seg.addr + off, rkey)  # release: the fields above are visible first

    def remove(self, rkey: int) -> None:
        """Retract (or give back an unpublished reservation); the slot's next rkey differs."""
        slot = slot_of(rkey)
        native.store64(self.seg.addr + ENTRY_OFF + slot * ENTRY_SIZE, 0)
        self._free.append(slot)

    def close(self) -> None:
        """Mark the owner CLOSED and retract every entry (clients fail from their next check on)."""
        native.store64(self.seg.addr + STATE_OFF, STATE_CLOSED)
        for slot in range(self.max_regions):
            native.store64(self.seg.addr + ENTRY_OFF + slot * ENTRY_SIZE, 0)


class TableView:
    """Client side: a read-only mapping of an owner's table."""

    def __init__(self, seg: Segment, owner: Owner) -> None:
        if seg.size < ENTRY_OFF:
            raise ValueError("control segment too short")
        magic, version, max_regions, pid, start, _state = _HEADER.unpack_from(seg.mm, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not an rdmapool v{VERSION} control segment")
        if (pid, start) != (owner.pid, owner.start):
            raise ValueError("control segment belongs to another process")
        if seg.size < table_size(max_regions):
            raise ValueError("control segment shorter than its table")
        self.seg = seg
        self.max_regions = max_regions
        self.state_ptr = seg.addr + STATE_OFF

    def is_open(self) -> bool:
        return native.load64(self.state_ptr) == STATE_OPEN

    def valid_ptr(self, rkey: int) -> int:
        return self.seg.addr + ENTRY_OFF + slot_of(rkey) * ENTRY_SIZE

    def lookup(self, rkey: int) -> tuple[int, int, Access] | None:
        """(addr, length, access) of a live region, None if `rkey` names no live region."""
        if rkey == 0 or rkey & LOCAL_ONLY or slot_of(rkey) >= self.max_regions:
            return None
        ptr = self.valid_ptr(rkey)
        if native.load64(ptr) != rkey:
            return None
        _live, addr, length, access = _ENTRY.unpack_from(self.seg.mm, ptr - self.seg.addr)
        if native.load64(ptr) != rkey:
            return None
        return addr, length, Access(access)
