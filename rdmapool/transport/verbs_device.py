"""Choosing an RDMA device, port and GID, and checking that memory can be pinned.

Theory of operation
-------------------
A device is usable when it has an ACTIVE port. On Ethernet link layers (RoCE NICs, rxe) peers are addressed by
GID and we want a RoCE v2 GID (routable UDP/IP encapsulation) bound to an IPv4 address (`::ffff:a.b.c.d`), else
a RoCE v2 IPv6 one, else any non-zero GID; on InfiniBand by LID with GID index 0 for the GRH-less path.
`choose_gid` is the pure rule over a list of `GidEntry`; `open_device` reads the facts (pyverbs queries plus
sysfs for the GID types, which rdma-core 44's pyverbs does not expose uniformly) and applies it.

Everything missing fails here, at start, with `NoDevice` naming the piece (no pyverbs, no device, no active
port, no usable GID) and pointing at transport=tcp or the VM harness.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdmapool.errors import NoDevice, UsageError
from rdmapool.transport.verbs_conn import PortInfo
from rdmapool.transport.verbs_enums import ALTERNATIVES, enums, import_pyverbs

SYSFS = Path("/sys/class/infiniband")
ZERO_GID = "0" * 32
CAP_IPC_LOCK = 14


@dataclass(frozen=True, slots=True)
class GidEntry:
    index: int
    gid: str  # 32 hex digits
    kind: str  # "RoCE v2", "IB/RoCE v1", ...


def gid_hex(text: str) -> str:
    """'0000:0000:...:020f' or '::ffff:10.0.2.15'-style 32-digit forms -> 32 lowercase hex digits."""
    digits = text.replace(":", "").lower()
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits):
        raise UsageError(f"not a GID: {text!r}")
    return digits


def gid_colon(digits: str) -> str:
    """32 hex digits -> pyverbs' 'xxxx:xxxx:...' form."""
    return ":".join(digits[i:i + 4] for i in range(0, 32, 4))


def is_ipv4_mapped(digits: str) -> bool:
    return digits.startswith("0" * 20 + "ffff")


def choose_gid(entries: Sequence[GidEntry], link_layer: str) -> int:
    """The GID index to use, by the rule in the module docstring; NoDevice when none fits."""
    if link_layer == "infiniband":
        return 0
    usable = [g for g in entries if g.gid != ZERO_GID]
    v2 = [g for g in usable if g.kind.lower().replace(" ", "") == "rocev2"]
    for group in ([g for g in v2 if is_ipv4_mapped(g.gid)], [g for g in v2 if not g.gid.startswith("fe80")], v2,
                  usable):
        if group:
            return min(group, key=lambda g: g.index).index
    raise NoDevice("the RoCE port has no usable GID: give its network interface an IP address "
                   "(the GID table fills from the interface's addresses)")


def read_gid_table(device: str, port: int, size: int, root: Path = SYSFS) -> list[GidEntry]:
    """GID entries from sysfs (`gids/N` and `gid_attrs/types/N`); unreadable slots are skipped."""
    base = root / device / "ports" / str(port)
    entries = []
    for i in range(size):
        try:
            gid = gid_hex((base / "gids" / str(i)).read_text().strip())
            kind = (base / "gid_attrs" / "types" / str(i)).read_text().strip()
        except (OSError, UsageError):
            continue
        entries.append(GidEntry(i, gid, kind))
    return entries


def _gid_table(ctx: Any, device: str, port: int, pattr: Any) -> list[GidEntry]:
    """Valid GID entries of a port: ibv_query_gid_table (one call) where pyverbs has it, else sysfs."""
    kinds = {0: "IB", 1: "IB/RoCE v1", 2: "RoCE v2"}  # enum ibv_gid_type
    try:
        table = ctx.query_gid_table(pattr.gid_tbl_len)
        entries = []
        for g in table:
            text = g.gid_str() if callable(g.gid_str) else g.gid_str  # a method in rdma-core 44
            if int(g.port_num) == port:
                entries.append(GidEntry(int(g.gid_index), gid_hex(str(text)), kinds.get(int(g.gid_type), "unknown")))
        return entries
    except Exception:  # older pyverbs or provider without the call: the slower sysfs walk
        return read_gid_table(device, port, pattr.gid_tbl_len)


def memlock_problem(length: int) -> str | None:
    """Why `length` bytes may not be pinnable by this process, or None. Registration pins pages: it needs
    CAP_IPC_LOCK or a memlock limit that covers everything registered."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= length:
        return None
    try:
        status = Path("/proc/self/status").read_text()
        cap_eff = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    if cap_eff & (1 << CAP_IPC_LOCK):
        return None
    return (f"registering {length} bytes needs them pinned, but the memlock limit is {soft} bytes and the "
            "process lacks CAP_IPC_LOCK: run with `ulimit -l unlimited` (systemd LimitMEMLOCK=infinity, docker "
            "--ulimit memlock=-1 --cap-add IPC_LOCK)")


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    name: str
    port: int
    port_info: PortInfo


def _device_names() -> list[str]:
    device = import_pyverbs("device")
    try:
        devices = device.get_device_list()
    except Exception as exc:  # pyverbs raises PyverbsError("Failed to get devices list") without a kernel driver
        raise NoDevice(f"transport=verbs found no RDMA devices ({exc}): this kernel has no RDMA driver "
                       f"loaded (nothing in /sys/class/infiniband); {ALTERNATIVES}") from exc
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]
    if not names:
        raise NoDevice(f"transport=verbs found no RDMA devices; {ALTERNATIVES}")
    return names


def open_device(name: str | None = None, port: int | None = None, gid_index: int | None = None
                ) -> tuple[Any, DeviceChoice]:
    """Open a device context and describe the chosen port. Defaults: $RDMAPOOL_VERBS_DEVICE or the first device
    with an active port; its first active port; `choose_gid`."""
    e = enums()
    device = import_pyverbs("device")
    name = name or os.environ.get("RDMAPOOL_VERBS_DEVICE") or None
    names = _device_names()
    if name is not None and name not in names:
        raise NoDevice(f"RDMA device {name!r} not found; devices here: {', '.join(names)}")
    problems = []
    for candidate in [name] if name else names:
        ctx = device.Context(name=candidate)
        attr = ctx.query_device()
        ports = [port] if port else list(range(1, attr.phys_port_cnt + 1))
        for p in ports:
            pattr = ctx.query_port(p)
            if int(pattr.state) != e.IBV_PORT_ACTIVE:
                problems.append(f"{candidate} port {p} is not ACTIVE (state {int(pattr.state)})")
                continue
            link = "ethernet" if int(pattr.link_layer) == e.IBV_LINK_LAYER_ETHERNET else "infiniband"
            index = gid_index if gid_index is not None else choose_gid(_gid_table(ctx, candidate, p, pattr), link)
            gid = gid_hex(str(ctx.query_gid(p, index))) if link == "ethernet" or index else ZERO_GID
            info = PortInfo(gid=gid, gid_index=index, lid=int(pattr.lid), link_layer=link,
                            active_mtu=int(pattr.active_mtu), max_qp_rd_atom=int(attr.max_qp_rd_atom),
                            max_qp_init_rd_atom=int(attr.max_qp_init_rd_atom),
                            atomics=int(attr.atomic_caps) != e.IBV_ATOMIC_NONE)
            return ctx, DeviceChoice(candidate, p, info)
        ctx.close()
    raise NoDevice("no RDMA port is ACTIVE (" + "; ".join(problems) + "): check the link "
                   "(`rdma link`, `ibv_devinfo`); or " + ALTERNATIVES)
