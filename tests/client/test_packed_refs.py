"""The client's view of a lookup reply: packed hit records checked, counted and turned into refs lazily."""

from __future__ import annotations

import pytest

from rdmapool.client.client import BlockRef, PackedRefs
from rdmapool.client.protocol import Hit, check_hits, leading_hits
from rdmapool.config import ServerAddress
from rdmapool.errors import ProtocolError
from rdmapool.server.wire import HIT

SERVER = ServerAddress("127.0.0.1", 7000)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def records(*generations: int) -> bytes:
    return b"".join(HIT.pack(0x1000 * (i + 1), 9, g, 100 + i) for i, g in enumerate(generations))


def test_check_hits_refuses_malformed_replies() -> None:
    assert check_hits({"hits": records(5, 6)}, 2) == records(5, 6)
    for bad in ({"hits": records(5, 6)[:-1]}, {"hits": [1, 2]}, {}, {"hits": bytearray(records(5))}):
        with pytest.raises(ProtocolError):
            check_hits(bad, 2)
    with pytest.raises(ProtocolError):  # more hits than keys asked
        check_hits({"hits": records(5, 6, 7)}, 2)


@pytest.mark.parametrize("generations, expected", [
    ((), 0), ((0,), 0), ((5, 6, 0, 7), 2), ((5, 6, 7), 3),
    ((1 << 56, 1 << 8), 2),  # zero bytes across the boundary of two generations are not a zero generation
    ((1 << 63, 1, 0), 2),
])
def test_leading_hits_stops_at_the_first_zero_generation(generations, expected) -> None:
    assert leading_hits(records(*generations)) == expected


def test_packed_refs_build_the_refs_the_records_describe() -> None:
    keys = [key(i) for i in range(4)]
    raw = records(11, 0, 13)  # a prefix=False reply for 3 of 4 keys would not be short; this checks the padding
    refs = PackedRefs(keys, SERVER, 3, raw, 50.0, 4)
    hits = [Hit(*rec) if rec[2] else None for rec in HIT.iter_unpack(raw)]  # generation 0: a miss
    assert len(refs) == 4 and refs.leading_hits() == 1
    expected = [None if h is None else BlockRef(k, SERVER, 3, h, 50.0) for k, h in zip(keys, hits + [None],
                                                                                      strict=True)]
    assert list(refs) == expected and refs[2] == expected[2] and refs[3] is None
    assert isinstance(refs[0].hit, Hit) and refs[0].length == 100 and refs[0].hit.generation == 11
    assert refs[1:3] == tuple(expected[1:3])


def test_a_prefix_view_builds_nothing_until_used() -> None:
    keys = [key(i) for i in range(3)]
    refs = PackedRefs(keys, SERVER, 3, records(1, 2, 3), 50.0, 3)
    head = refs[:2]
    assert isinstance(head, PackedRefs) and len(head) == 2 and refs._refs is None and head._refs is None
    assert head == tuple(refs)[:2] and [r.key for r in head] == keys[:2]
    assert head != tuple(refs) and hash(head) == hash(tuple(head))
    assert refs[:0] == ()
