"""The client side of the control protocol, sans-IO: requests to bytes, bytes to checked, typed replies.

Replies are untrusted too: a server that sends a malformed reply is treated like one that is down.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import NamedTuple

from rdmapool.errors import AuthError, ProtocolError, UsageError
from rdmapool.server import wire


class Hit(NamedTuple):
    """A lookup hit: where the block is, the generation it must carry, its payload length. (A NamedTuple: one
    is built per hit, 512 per lookup; see docs/decisions.md.)"""

    addr: int
    rkey: int
    generation: int
    length: int


_new_hit = functools.partial(tuple.__new__, Hit)
_generation = operator.itemgetter(2)
_ZERO_GENERATION = bytes(8)
_HIT_FIELDS = wire.HIT.size // 8  # u64 fields per record; the generation is the third


class Reservation(NamedTuple):
    """An allocate grant (`wire.GRANT`): where to write a block, and the generation to write into it. (A
    NamedTuple: one is built per key of every put.)"""

    status: int  # rdmapool.server.core.AllocStatus value
    addr: int = 0
    rkey: int = 0
    generation: int = 0
    capacity: int = 0


_new_reservation = functools.partial(tuple.__new__, Reservation)


class ClientSession:
    """Frames requests with fresh ids and matches replies to them."""

    def __init__(self, max_frame: int) -> None:
        self._ids = itertools.count(1)
        self._decoder = wire.FrameDecoder(max_frame)

    def request(self, op: str, **fields: object) -> tuple[int, bytes]:
        rid = next(self._ids) & 0xFFFFFFFF
        return rid, wire.encode({"v": wire.VERSION, "id": rid, "op": op, **fields})

    def receive(self, data: bytes | memoryview) -> list[dict]:
        self._decoder.feed(data)
        return list(self._decoder.messages())


def check_reply(reply: dict, rid: int) -> dict:
    if reply.get("id") != rid:
        raise ProtocolError(f"reply id {reply.get('id')!r} does not match request {rid}")
    if reply.get("ok") is True:
        return reply
    kind, error = reply.get("kind"), reply.get("error")
    if kind == "AuthError":
        raise AuthError(f"server refused: {error}")
    if kind == "UsageError":
        raise UsageError(f"server refused: {error}")
    raise ProtocolError(f"server refused the request: {kind}: {error}")


def check_hits(reply: dict, asked: int) -> bytes:
    """The reply's packed hit records (`wire.HIT`), checked for shape only: every value is an unsigned 64-bit
    integer by construction, and generation 0 (never issued by a server) marks a miss."""
    raw = reply.get("hits")
    size = wire.HIT.size
    if type(raw) is not bytes or len(raw) % size or len(raw) // size > asked:
        raise ProtocolError(f"hits must be bytes of at most {asked} records of {size} bytes")
    return raw


def leading_hits(raw: bytes) -> int:
    """How many records of `raw` (checked hits) come before the first miss: C loops, no object per hit."""
    generations = memoryview(raw).cast("Q")[2::_HIT_FIELDS].tobytes()  # zero or not: byte order does not matter
    at = generations.find(_ZERO_GENERATION)
    while at > 0 and at % 8:  # a run of zero bytes across two generations, not a zero generation: look further
        at = generations.find(_ZERO_GENERATION, at + 1)
    return len(generations) // 8 if at < 0 else at // 8


def unpack_hits(raw: bytes) -> list[Hit]:
    """Every record of `raw` (checked hits) as a Hit, misses included: one C loop, no Python frame per hit."""
    return list(map(_new_hit, wire.HIT.iter_unpack(raw)))


def all_hits(hits: list[Hit]) -> bool:
    """No miss (generation 0) among `hits`."""
    return all(map(_generation, hits))


def parse_grants(reply: dict, asked: int) -> list[Reservation]:
    """The reply's packed grants (`wire.GRANT`, one per key asked), unpacked in one C loop: every field is an
    unsigned 64-bit integer by construction; the caller checks each status and capacity."""
    raw = reply.get("grants")
    if type(raw) is not bytes or len(raw) != asked * wire.GRANT.size:
        raise ProtocolError(f"grants must be bytes of {asked} records of {wire.GRANT.size} bytes")
    return list(map(_new_reservation, wire.GRANT.iter_unpack(raw)))


def commit_fields(keys: list[bytes], generations: list[int]) -> dict:
    """A commit's or abort's fields: the keys and the generation each was granted."""
    return {"keys": wire.pack_keys(keys), "generations": wire.pack_u64s(generations)}


def parse_results(reply: dict, asked: int) -> list[bool]:
    raw = wire.get_list(reply, "results", asked)
    if len(raw) != asked or not all(isinstance(v, bool) for v in raw):
        raise ProtocolError("results must be one boolean per item")
    return raw
