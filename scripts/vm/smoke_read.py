"""Smoke test of the rxe VM, independent of rdmapool: two RC queue pairs on one device, one 1 MiB RDMA READ,
checked byte for byte. Run in the guest: `scripts/vm/exec.sh 'python3 scripts/vm/smoke_read.py'`.
Uses pyverbs directly (module-level enum names, as in Debian's rdma-core 44)."""

from __future__ import annotations

import os
import sys
import time

import pyverbs.enums as e
from pyverbs.addr import AHAttr, GlobalRoute
from pyverbs.cq import CQ
from pyverbs.device import Context, get_device_list
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, SendWR

SIZE = 1 << 20


def main() -> int:
    names = [d.name.decode() for d in get_device_list()]
    print("devices:", names)
    ctx = Context(name=names[0])
    port = ctx.query_port(1)
    gid = ctx.query_gid(1, 1)
    print("port state", port.state, "active mtu", port.active_mtu, "gid[1]", gid)
    pd = PD(ctx)
    cq = CQ(ctx, 64)
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
    src, dst = MR(pd, SIZE, access), MR(pd, SIZE, access)
    pattern = os.urandom(SIZE)
    src.write(pattern, SIZE)
    qps = [QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(16, 16, 1, 1))) for _ in range(2)]
    for me, peer in ((qps[0], qps[1]), (qps[1], qps[0])):
        attr = QPAttr(qp_state=e.IBV_QPS_INIT, cur_qp_state=e.IBV_QPS_RESET)
        attr.qp_access_flags = access
        attr.port_num = 1
        attr.pkey_index = 0
        me.to_init(attr)
        attr = QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.path_mtu = port.active_mtu
        attr.dest_qp_num = peer.qp_num
        attr.rq_psn = 0
        attr.max_dest_rd_atomic = 16
        attr.min_rnr_timer = 12
        attr.ah_attr = AHAttr(gr=GlobalRoute(dgid=gid, sgid_index=1), is_global=1, port_num=1)
        me.to_rtr(attr)
        attr.qp_state = e.IBV_QPS_RTS
        attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.sq_psn, attr.max_rd_atomic = 14, 7, 7, 0, 16
        me.to_rts(attr)
    wr = SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[SGE(dst.buf, SIZE, dst.lkey)],
                send_flags=e.IBV_SEND_SIGNALED)
    wr.set_wr_rdma(src.rkey, src.buf)
    t0 = time.monotonic()
    qps[0].post_send(wr)
    while True:
        n, wcs = cq.poll(1)
        if n:
            break
        if time.monotonic() - t0 > 30:
            print("no completion in 30 s")
            return 1
    dt = time.monotonic() - t0
    ok = wcs[0].status == e.IBV_WC_SUCCESS and dst.read(SIZE, 0) == pattern
    print(f"READ {SIZE} bytes: status {wcs[0].status}, byte-exact {ok}, {SIZE / dt / 1e6:.1f} MB/s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
