import pytest

from rdmapool.transport.base import Access, Opcode, Sge, WcStatus, WorkRequest
from rdmapool.transport.verbs_enums import EnumTable
from rdmapool.transport.verbs_wr import build_chain, completion, wc_status


@pytest.fixture()
def e(pyverbs_enums):
    return EnumTable(pyverbs_enums)


def test_chain_carries_opcodes_ids_and_selective_signalling(e):
    s = Sge(0x1000, 8, 5)
    wrs = [WorkRequest.read(10, Sge(0x1000, 4096, 5), 0x9000, 77, signaled=False),
           WorkRequest.write(11, Sge(0x2000, 64, 5), 0xA000, 77),
           WorkRequest.cas(12, s, 0xB000, 77, compare=1, swap=2),
           WorkRequest.faa(13, s, 0xB008, 77, add=3)]
    chain = build_chain(e, wrs, [101, 102, 103, 104], [False, True, True, True])
    assert [w.wr_id for w in chain] == [101, 102, 103, 104]
    assert [w.opcode for w in chain] == [e.IBV_WR_RDMA_READ, e.IBV_WR_RDMA_WRITE, e.IBV_WR_ATOMIC_CMP_AND_SWP,
                                         e.IBV_WR_ATOMIC_FETCH_AND_ADD]
    assert [w.send_flags for w in chain] == [0, e.IBV_SEND_SIGNALED, e.IBV_SEND_SIGNALED, e.IBV_SEND_SIGNALED]
    assert all(w.num_sge == 1 for w in chain)


def test_multi_sge_request(e):
    wr = WorkRequest(1, Opcode.WRITE, (Sge(0x1000, 16, 1), Sge(0x3000, 32, 2)), 0x5000, 9)
    (send,) = build_chain(e, [wr], [1], [True])
    assert send.num_sge == 2


def test_completion_mapping():
    ok = completion(5, Opcode.READ, 0, 4096)
    assert ok.ok and ok.byte_len == 4096
    bad = completion(6, Opcode.READ, 10, 4096, vendor_err=0x88)
    assert bad.status == WcStatus.REM_ACCESS_ERR and bad.byte_len == 0 and "0x88" in bad.detail
    assert wc_status(12) == WcStatus.RETRY_EXC_ERR and wc_status(200) == WcStatus.GENERAL_ERR


def test_access_flags(e):
    from rdmapool.transport.verbs import access_flags

    assert access_flags(e, Access.ALL) == 1 | 2 | 4 | 8
    assert access_flags(e, Access.REMOTE_READ) == e.IBV_ACCESS_REMOTE_READ
    # remote write needs local write in verbs
    assert access_flags(e, Access.REMOTE_WRITE) == e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_LOCAL_WRITE
