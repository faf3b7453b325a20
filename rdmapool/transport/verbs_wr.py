"""Turning `WorkRequest` batches into one linked pyverbs SendWR list, and work completions back into
`Completion`s. Device-free: pyverbs' SGE/SendWR classes work without a device, so this is tested on any host.

Cost model (FACTS.md 2b): building one SendWR in Python costs ~2 us and `post_send` of a linked list is one
call into the provider (one doorbell), so a batch of N requests costs ~2N us of CPU plus one post. A 64 KiB READ
on a 25 GB/s NIC lasts 2.6 us: Python keeps up from ~64 KiB per request upwards and is the bottleneck below
(a 16 KiB-page fetch would need a native poster). rdmapool's KV blocks are >= 64 KiB, so no native poster yet;
`bench/verbs.py` measures the per-request cost (`post_us_per_wr`) so this can be revisited with numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rdmapool.transport.base import Completion, Opcode, WcStatus, WorkRequest
from rdmapool.transport.verbs_enums import EnumTable, import_pyverbs

_WR_OPCODE = {
    Opcode.READ: "IBV_WR_RDMA_READ",
    Opcode.WRITE: "IBV_WR_RDMA_WRITE",
    Opcode.CAS: "IBV_WR_ATOMIC_CMP_AND_SWP",
    Opcode.FAA: "IBV_WR_ATOMIC_FETCH_AND_ADD",
}
_STATUS = {s.value: s for s in WcStatus}


def build_chain(e: EnumTable, wrs: Sequence[WorkRequest], wr_ids: Sequence[int], signaled: Sequence[bool]
                ) -> list[Any]:
    """SendWR objects for `wrs`, linked in order (post the first). The caller keeps the returned list alive until
    post_send returns: pyverbs links the C structs by pointer. `wr_ids` are the ids the device reports back."""
    wr_mod = import_pyverbs("wr")
    sge_cls, send_cls = wr_mod.SGE, wr_mod.SendWR
    flag = e.IBV_SEND_SIGNALED
    chain: list[Any] = []
    for wr, wr_id, sig in zip(wrs, wr_ids, signaled, strict=True):
        sgl = [sge_cls(s.addr, s.length, s.lkey) for s in wr.sgl]
        send = send_cls(wr_id=wr_id, opcode=getattr(e, _WR_OPCODE[wr.opcode]), num_sge=len(sgl), sg=sgl,
                        send_flags=flag if sig else 0)
        if wr.opcode in (Opcode.READ, Opcode.WRITE):
            send.set_wr_rdma(wr.rkey, wr.remote_addr)
        else:
            send.set_wr_atomic(wr.rkey, wr.remote_addr, wr.compare, wr.swap)
        if chain:
            chain[-1].next_wr = send
        chain.append(send)
    return chain


def wc_status(raw: int) -> WcStatus:
    return _STATUS.get(int(raw), WcStatus.GENERAL_ERR)


def completion(wr_id: int, opcode: Opcode, raw_status: int, byte_len: int, vendor_err: int = 0) -> Completion:
    status = wc_status(raw_status)
    detail = ""
    if status != WcStatus.SUCCESS:
        detail = f"ibv_wc_status {int(raw_status)}" + (f", vendor error {vendor_err:#x}" if vendor_err else "")
    return Completion(wr_id, status, opcode, byte_len if status == WcStatus.SUCCESS else 0, detail)
