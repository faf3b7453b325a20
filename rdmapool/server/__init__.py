"""The memory server: a pure core (`core`, `slots`, `lifecycle`), the control protocol (`wire`, `protocol`),
the process driver (`driver.MemoryServer`) and its metrics endpoint (`metrics`)."""

from rdmapool.server.core import AllocStatus, PoolCore, SlotRef
from rdmapool.server.driver import MemoryServer
from rdmapool.server.protocol import ServerInfo

__all__ = ["AllocStatus", "MemoryServer", "PoolCore", "ServerInfo", "SlotRef"]
