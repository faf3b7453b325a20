"""Control-protocol framing and field validation, shared by the server and the client.

Theory of operation
-------------------
A frame is a 4-byte big-endian length N (1 <= N <= max_frame) followed by N bytes of msgpack holding one map.
Requests carry `v` (protocol version), `id` (echoed in the reply) and `op`; replies carry `v`, `id`, `ok` and
either the op's fields or `error` + `kind`. A list of keys travels as one binary string of 16 bytes per key
(version 2; version 1 sent a list of binaries), and so do the per-key integers of the write path: allocate's
lengths and grants, commit's and abort's generations (version 3): no msgpack object per key, and checking a
field is one length test.
A peer speaking another version gets an error naming both versions, and its connection is closed. msgpack is
decoded with extension types refused and container sizes bounded by the frame; nothing is ever unpickled.
Every field is checked by the `get_*` helpers below, which raise `ProtocolError` naming the field: a peer's
malformed frame can only ever close that peer's connection.

`FrameDecoder` is sans-IO: feed it bytes as they arrive, take whole messages out.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from rdmapool.block import KEY_SIZE
from rdmapool.errors import ProtocolError

VERSION = 3
_LEN = struct.Struct(">I")
#: one lookup hit on the wire: addr, rkey, generation, length (u64 little-endian each); generation 0 = miss
HIT = struct.Struct("<QQQQ")
#: one allocate grant on the wire: status, addr, rkey, generation, capacity (u64 little-endian each); every field
#: but the status is 0 unless the status is OK
GRANT = struct.Struct("<QQQQQ")
U64 = 2**64


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def encode(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, decoded message maps out. Raises ProtocolError on an oversized, empty or undecodable frame."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole frame (a truncated frame at EOF leaves this > 0)."""
        return len(self._buf)

    def messages(self) -> Iterator[dict]:
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n == 0 or n > self.max_frame:
                raise ProtocolError(f"frame of {n} bytes (allowed 1..{self.max_frame})")
            if len(self._buf) < _LEN.size + n:
                return
            with memoryview(self._buf) as view, view[_LEN.size : _LEN.size + n] as body:
                msg = decode_body(body, self.max_frame)  # decoded in place (msgpack copies what it keeps)
            del self._buf[: _LEN.size + n]
            yield msg


def decode_body(body: bytes | memoryview, max_frame: int) -> dict:
    try:
        msg = msgpack.unpackb(
            body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True,
            timestamp=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a frame must hold a map, got {type(msg).__name__}")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r} not supported (this side speaks {VERSION})")
    return msg


# ---- field access with validation ------------------------------------------------------------------------
def get_int(msg: dict, name: str, lo: int = 0, hi: int = U64) -> int:
    value = msg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < hi:
        raise ProtocolError(f"field {name!r} must be an integer in [{lo}, {hi}), got {type(value).__name__}")
    return value


def get_str(msg: dict, name: str, max_len: int = 256) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"field {name!r} must be a string of at most {max_len} characters")
    return value


def get_bool(msg: dict, name: str, default: bool | None = None) -> bool:
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be a boolean")
    return value


def get_list(msg: dict, name: str, max_items: int) -> list:
    value = msg.get(name)
    if not isinstance(value, list):
        raise ProtocolError(f"field {name!r} must be a list")
    if len(value) > max_items:
        raise ProtocolError(f"field {name!r} has {len(value)} items (at most {max_items})")
    return value


def check_key(value: object, where: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_SIZE:
        raise ProtocolError(f"{where}: a key is {KEY_SIZE} bytes of binary")
    return value


def pack_keys(keys: Sequence[bytes]) -> bytes:
    """Keys (already checked: 16-byte `bytes` each) as the wire's one binary string."""
    return b"".join(keys)


@functools.lru_cache(maxsize=32)
def _keys_struct(n: int) -> struct.Struct:
    return struct.Struct(f"{KEY_SIZE}s" * n)


def unpack_keys(blob: bytes) -> tuple[bytes, ...]:
    """The keys of a (length-checked) blob, split in one C call."""
    return _keys_struct(len(blob) // KEY_SIZE).unpack(blob)


def get_keys(msg: dict, name: str, max_items: int) -> tuple[bytes, ...]:
    blob = msg.get(name)
    if type(blob) is not bytes or len(blob) % KEY_SIZE:
        raise ProtocolError(f"field {name!r} must be binary of {KEY_SIZE} bytes per key")
    if len(blob) > max_items * KEY_SIZE:
        raise ProtocolError(f"field {name!r} has {len(blob) // KEY_SIZE} keys (at most {max_items})")
    return unpack_keys(blob)


@functools.lru_cache(maxsize=32)
def _u64s_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}Q")


def pack_u64s(values: Sequence[int]) -> bytes:
    """Unsigned 64-bit integers as the wire's one binary string (little-endian, 8 bytes each)."""
    try:
        return _u64s_struct(len(values)).pack(*values)
    except struct.error:
        raise ProtocolError("a per-key integer is not a 64-bit unsigned integer") from None


def get_u64s(msg: dict, name: str, count: int) -> tuple[int, ...]:
    """Field `name`: exactly `count` unsigned 64-bit integers packed by `pack_u64s` (one per key of the request),
    unpacked in one C call."""
    blob = msg.get(name)
    if type(blob) is not bytes or len(blob) != 8 * count:
        raise ProtocolError(f"field {name!r} must be binary of 8 bytes (a u64) per key: {count} keys, "
                            f"got {len(blob) if type(blob) is bytes else type(blob).__name__}")
    return _u64s_struct(count).unpack(blob)
