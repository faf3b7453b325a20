"""Model checks: random batches through post() and post_plan() against base.py's semantics (statuses,
flushes, and the bytes of both sides)."""

from __future__ import annotations

import os

from rdmapool.transport import WcStatus, WorkRequest
from rdmapool.transport.shm import ShmTransport

# --- model check -----------------------------------------------------------------------------------------------
REGION_SIZE, LOCAL_SIZE = 512, 256


def _model(ops, region: bytearray, local: bytearray) -> list[tuple[int, WcStatus]]:
    """What base.py's semantics say a batch must do to `region` and `local`, and which completions it gives."""
    out: list[tuple[int, WcStatus]] = []
    failed = False
    for i, (kind, loff, roff, length, a, b, signaled, good_key) in enumerate(ops):
        if failed:
            out.append((i, WcStatus.WR_FLUSH_ERR))
            continue
        if not good_key or roff < 0 or roff + length > REGION_SIZE:
            out.append((i, WcStatus.REM_ACCESS_ERR))
            failed = True
            continue
        if kind == "read":
            local[loff:loff + length] = region[roff:roff + length]
        elif kind == "write":
            region[roff:roff + length] = local[loff:loff + length]
        else:
            old = int.from_bytes(region[roff:roff + 8], "little")
            new = (old + a) % 2**64 if kind == "faa" else (b if old == a else old)
            region[roff:roff + 8] = new.to_bytes(8, "little")
            local[loff:loff + 8] = old.to_bytes(8, "little")
        if signaled:
            out.append((i, WcStatus.SUCCESS))
    return out


def _op_strategy():
    from hypothesis import strategies as st

    def build(kind, loff, roff, length, a, b, signaled, good_key):
        if kind in ("cas", "faa"):  # WorkRequest.cas/faa are always signalled
            length, loff, roff, signaled = 8, loff // 8 * 8 % (LOCAL_SIZE - 8), roff // 8 * 8, True
        else:
            loff = min(loff, LOCAL_SIZE - length)
        return (kind, loff, roff, length, a, b, signaled, good_key)

    return st.builds(build, st.sampled_from(["read", "write", "cas", "faa"]), st.integers(0, LOCAL_SIZE - 1),
                     st.integers(-16, REGION_SIZE + 8), st.integers(0, 64), st.sampled_from([0, 1, 5, 2**64 - 1]),
                     st.sampled_from([0, 7]), st.booleans(), st.integers(0, 30).map(lambda v: v != 0))


def test_batches_match_the_semantic_model():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with ShmTransport(cuda="off") as srv, ShmTransport(cuda="off") as cli:
        region = srv.allocate(REGION_SIZE)
        local_buf = bytearray(LOCAL_SIZE)
        lr = cli.register(local_buf)
        info = srv.peer_info()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(_op_strategy(), min_size=1, max_size=12), st.binary(min_size=REGION_SIZE, max_size=REGION_SIZE))
        def check(ops, initial):
            region.view[:] = initial
            local_buf[:] = bytes(range(LOCAL_SIZE))
            want_region, want_local = bytearray(initial), bytearray(local_buf)
            want = _model(ops, want_region, want_local)
            wrs = []
            for i, (kind, loff, roff, length, a, b, signaled, good_key) in enumerate(ops):
                rkey = region.rkey if good_key else region.rkey ^ 0x5000
                sge, remote = lr.sge(loff, length), region.addr + roff
                if kind == "read":
                    wrs.append(WorkRequest.read(i, sge, remote, rkey, signaled=signaled))
                elif kind == "write":
                    wrs.append(WorkRequest.write(i, sge, remote, rkey, signaled=signaled))
                elif kind == "cas":
                    wrs.append(WorkRequest.cas(i, sge, remote, rkey, a, b))
                else:
                    wrs.append(WorkRequest.faa(i, sge, remote, rkey, a))
            with cli.connect(info) as ep:
                ep.post(wrs)
                got = [(c.wr_id, c.status) for c in ep.poll(100)]
            assert got == want
            assert bytes(region.view) == bytes(want_region)
            assert local_buf == want_local

        check()


def test_post_plan_matches_the_semantic_model():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from rdmapool.transport import Opcode, TransferPlan

    with ShmTransport(cuda="off") as srv, ShmTransport(cuda="off") as cli:
        region = srv.allocate(REGION_SIZE)
        local_buf = bytearray(LOCAL_SIZE)
        lr = cli.register(local_buf)
        info = srv.peer_info()
        local_st = st.tuples(st.integers(0, LOCAL_SIZE - 64), st.integers(0, 64))
        remote_st = st.tuples(st.integers(-16, REGION_SIZE + 8), st.integers(0, 20).map(lambda v: v != 0))

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(local_st, min_size=1, max_size=4), st.lists(remote_st, min_size=1, max_size=4),
               st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12),
               st.sampled_from([Opcode.READ, Opcode.WRITE]), st.integers(1, 4))
        def check(locals_, remotes, raw_pairs, opcode, every):
            pairs = [(li % len(locals_), ri % len(remotes)) for li, ri in raw_pairs]
            region.view[:] = os.urandom(REGION_SIZE)
            local_buf[:] = os.urandom(LOCAL_SIZE)
            ops = [("read" if opcode is Opcode.READ else "write", locals_[li][0], remotes[ri][0], locals_[li][1],
                    0, 0, (i + 1) % every == 0 or i == len(pairs) - 1, remotes[ri][1])
                   for i, (li, ri) in enumerate(pairs)]
            want_region, want_local = bytearray(region.view), bytearray(local_buf)
            want = _model(ops, want_region, want_local)
            plan = TransferPlan.build([lr.sge(off, n) for off, n in locals_],
                                      [(region.addr + off, region.rkey if good else region.rkey ^ 0x5000)
                                       for off, good in remotes])
            with cli.connect(info) as ep:
                ep.post_plan(plan, opcode, pairs, signal_every=every)
                got = [(c.wr_id, c.status) for c in ep.poll(100)]
            assert got == want
            assert bytes(region.view) == bytes(want_region)
            assert local_buf == want_local

        check()
