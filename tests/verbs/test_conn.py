import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdmapool.errors import ProtocolError, UsageError
from rdmapool.transport.verbs_conn import (
    DEFAULT_TIMEOUT,
    Handshake,
    PortInfo,
    QpInfo,
    dead_peer_seconds,
    default_ack_timeout,
    negotiate,
)

RXE = PortInfo(gid="00000000000000000000ffff0a00020f", gid_index=1, lid=0, link_layer="ethernet", active_mtu=3,
               max_qp_rd_atom=128, max_qp_init_rd_atom=128, atomics=True)
CX6 = PortInfo(gid="00000000000000000000ffff0a000210", gid_index=3, lid=0, link_layer="ethernet", active_mtu=5,
               max_qp_rd_atom=16, max_qp_init_rd_atom=16, atomics=True)
IB = PortInfo(gid="0" * 32, gid_index=0, lid=7, link_layer="infiniband", active_mtu=5, max_qp_rd_atom=16,
              max_qp_init_rd_atom=16, atomics=True)


def test_negotiation_takes_the_smaller_mtu_and_the_devices_read_depth():
    ours, theirs = negotiate(RXE, CX6), negotiate(CX6, RXE)
    assert ours.path_mtu == theirs.path_mtu == 3  # min(1024, 4096)
    assert ours.max_rd_atomic == 16 and ours.max_dest_rd_atomic == 16  # bounded by the ConnectX side
    assert ours.max_rd_atomic <= theirs.max_dest_rd_atomic and theirs.max_rd_atomic <= ours.max_dest_rd_atomic
    assert negotiate(RXE, RXE).max_rd_atomic == 128  # never rdma-core's test default of 1
    assert negotiate(RXE, RXE, rd_atomic_cap=8).max_dest_rd_atomic == 8


def test_asymmetric_read_depths():
    a = PortInfo(RXE.gid, 1, 0, "ethernet", 3, max_qp_rd_atom=32, max_qp_init_rd_atom=4, atomics=True)
    b = PortInfo(CX6.gid, 1, 0, "ethernet", 3, max_qp_rd_atom=8, max_qp_init_rd_atom=64, atomics=True)
    pa, pb = negotiate(a, b), negotiate(b, a)
    assert (pa.max_rd_atomic, pa.max_dest_rd_atomic) == (4, 32)
    assert (pb.max_rd_atomic, pb.max_dest_rd_atomic) == (32, 4)
    # what one side issues, the other accepts
    assert pa.max_rd_atomic <= pb.max_dest_rd_atomic and pb.max_rd_atomic <= pa.max_dest_rd_atomic


def test_link_layers_must_match_and_timeouts_are_bounded():
    with pytest.raises(UsageError, match="ethernet to infiniband"):
        negotiate(RXE, IB)
    with pytest.raises(UsageError, match="retry"):
        negotiate(RXE, RXE, retry_cnt=8)
    assert IB.uses_grh is False and RXE.uses_grh is True


def test_dead_peer_detection_time():
    assert dead_peer_seconds(17, 7) == pytest.approx(4.295, rel=1e-3)  # the default: 0.537 s x 8 tries
    assert dead_peer_seconds(14, 7) == pytest.approx(0.537, rel=1e-3)
    assert negotiate(RXE, RXE).dead_peer_seconds == pytest.approx(dead_peer_seconds(17, 7))


def test_handshake_round_trips_through_msgpack():
    hs = Handshake(RXE, (QpInfo(17, 123), QpInfo(18, 2**24 - 1)))
    wire = msgpack.unpackb(msgpack.packb(hs.to_wire()))
    assert Handshake.from_wire(wire) == hs


@pytest.mark.parametrize("bad", [
    None, [], {"verbs": 2}, {"verbs": 1, "port": RXE.to_wire(), "qps": []},
    {"verbs": 1, "port": RXE.to_wire(), "qps": [[0, 1]]},
    {"verbs": 1, "port": RXE.to_wire(), "qps": [[17, 2**24]]},
    {"verbs": 1, "port": RXE.to_wire(), "qps": [["17", 1]]},
    {"verbs": 1, "port": RXE.to_wire()[:-1], "qps": [[17, 1]]},
    {"verbs": 1, "port": ["zz" * 16, *RXE.to_wire()[1:]], "qps": [[17, 1]]},
    {"verbs": 1, "port": [*RXE.to_wire()[:4], 9, *RXE.to_wire()[5:]], "qps": [[17, 1]]},
    {"verbs": 1, "port": RXE.to_wire(), "qps": [[17, 1]] * 65},
])
def test_malformed_handshakes_are_protocol_errors(bad):
    with pytest.raises(ProtocolError):
        Handshake.from_wire(bad)


@given(st.recursive(st.none() | st.integers() | st.text(max_size=40) | st.booleans(),
                    lambda c: st.lists(c, max_size=9) | st.dictionaries(st.text(max_size=6), c, max_size=4)))
def test_arbitrary_input_never_escapes_as_another_exception(raw):
    with contextlib.suppress(ProtocolError):
        Handshake.from_wire(raw)


def test_ack_timeout_comes_from_the_environment_and_bad_values_are_named(monkeypatch):
    monkeypatch.delenv("RDMAPOOL_VERBS_ACK_TIMEOUT", raising=False)
    assert default_ack_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv("RDMAPOOL_VERBS_ACK_TIMEOUT", "15")
    assert default_ack_timeout() == 15
    from rdmapool.transport.verbs import VerbsOptions

    assert VerbsOptions().timeout == 15 and VerbsOptions(timeout=12).timeout == 12
    for bad in ("32", "-1", "fast"):
        monkeypatch.setenv("RDMAPOOL_VERBS_ACK_TIMEOUT", bad)
        with pytest.raises(UsageError, match="RDMAPOOL_VERBS_ACK_TIMEOUT must be an integer 0..31"):
            default_ack_timeout()
