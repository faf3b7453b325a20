"""The `shm` backend: one-sided operations between processes on one host through POSIX shared memory.

Theory of operation
-------------------
A serving process `allocate()`s regions; each is a segment in /dev/shm (`naming`), published in a region
table in a control segment (`table`). A client connects with the owner's `peer_info()` (segment base name,
owner pid and start time), maps the table read-only, opens a pidfd on the owner, and maps a region's segment
the first time an operation names its rkey. READ/WRITE are memcpy between the client's local SGEs and that
mapping, CAS/FAA are CPU atomics on it, executed in order by a native mover (`endpoint`, native/shmatomics.c)
that checks each region's valid word per operation and the owner's liveness per batch. No thread runs on the
owner's behalf: the owner's CPU is off the data path, as with RDMA.

Trust: a client that can open a segment can read (and, with write permission, write) the whole region, not just
the ranges it is told about; bounds checks protect against mistakes, not malice. shm is for trusted co-located
clients; the isolation boundary is the segment: give tenants separate regions (separate rkeys and segments)
and use file modes (`mode=`, owner and group) to decide which local users may map them.
"""

from rdmapool.transport.shm.naming import sweep_stale
from rdmapool.transport.shm.transport import ShmTransport

__all__ = ["ShmTransport", "sweep_stale"]
