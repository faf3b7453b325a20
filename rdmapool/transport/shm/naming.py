"""Names of shm segments, owner identity, and the sweep of segments whose owner died.

Every segment of one serving transport shares a *base* name `rdmapool.<pidns>.<pid>.<starttime>.<nonce>`: the
owner's pid and its start time (field 22 of /proc/<pid>/stat, in clock ticks since boot) identify the owning
process even after its pid is reused, so anyone can tell from a name alone whether its owner still lives.
`<pidns>` (the inode of /proc/self/ns/pid) says in which pid namespace that pid means something: containers
may share /dev/shm without sharing pids, and a sweeper must never judge (and delete) another namespace's
segments by a pid that names some other process, or none, in its own. The control
segment is `<base>.ctl`, a region's segment is `<base>.<rkey as 8 hex digits>`.

A process killed with SIGKILL cannot unlink its segments. `sweep_stale` removes every `rdmapool.*` segment
whose owner is gone; transports call it when they start serving and when they close, and clients call it for a
peer they saw die, so /dev/shm does not fill up with orphans.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "rdmapool."
DEFAULT_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^rdmapool\.(\d+)\.(\d+)\.(\d+)\.([0-9a-f]+)\.(ctl|[0-9a-f]{8})$")


@dataclass(frozen=True, slots=True)
class Owner:
    """A process, identified robustly against pid reuse."""

    pid: int
    start: int

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        start = process_start(pid)
        if start is None:
            raise OSError("cannot read /proc/self/stat: the shm transport needs Linux /proc")
        return cls(pid, start)

    def alive(self) -> bool:
        return process_start(self.pid) == self.start


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None when there is no such process or it has exited
    (a zombie that its parent has not reaped yet is dead for us: its memory will never be served again)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: fields after the last ')' are well formed.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); starttime is field 22.
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def pid_namespace() -> int:
    """Identity of this process's pid namespace (0 where /proc does not expose it)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def base_name(owner: Owner, nonce: str, ns: int | None = None) -> str:
    return f"{PREFIX}{pid_namespace() if ns is None else ns}.{owner.pid}.{owner.start}.{nonce}"


def ctl_name(base: str) -> str:
    return f"{base}.ctl"


def region_name(base: str, rkey: int) -> str:
    return f"{base}.{rkey:08x}"


def parse(name: str) -> tuple[int, Owner, str] | None:
    """(pid namespace, owner, base) for one of our segment names, None for anything else."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    ns, pid, start, nonce = m.group(1), m.group(2), m.group(3), m.group(4)
    return int(ns), Owner(int(pid), int(start)), f"{PREFIX}{ns}.{pid}.{start}.{nonce}"


def sweep_stale(shm_dir: str = DEFAULT_DIR, base: str | None = None) -> list[str]:
    """Unlink every rdmapool segment in `shm_dir` (only those of `base` if given) whose owner is dead.
    Returns the names removed. Segments of live owners, of other pid namespaces (whose liveness we cannot
    judge) and files that are not ours are never touched."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    alive: dict[Owner, bool] = {}
    ns = pid_namespace()
    for name in names:
        parsed = parse(name)
        if parsed is None or parsed[0] != ns or (base is not None and parsed[2] != base):
            continue
        owner = parsed[1]
        if owner not in alive:
            alive[owner] = owner.alive()
        if alive[owner]:
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except (FileNotFoundError, PermissionError):
            pass
    if removed:
        log.info("shm: removed %d stale segment(s) of dead owners from %s", len(removed), shm_dir)
    return removed
