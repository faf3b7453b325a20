"""The on-slot block format: a header and a trailer that the client writes around every payload.

Theory of operation
-------------------
A memory server hands out slots but never touches their bytes; a client writes a block with one one-sided
WRITE and reads it back with one one-sided READ. Between the two, the slot may have been reused (a lease ran
out), a writer may have died half-way, or bytes may have been placed in any order (RDMA gives no order *within*
one message). So every read is validated against what the server's lookup reply promised:

    offset 0                      64                      64+length             64+length+32
           | header (64 bytes)     | payload (length bytes) | trailer (32 bytes) |

Header: magic b"RPLB", format version, flags, slot generation (u64), payload length (u64), key (16 bytes),
payload checksum (xxh3-128, zero when the writer skipped it), and an xxh3-64 of the header itself.
Trailer: magic b"RPLT", version, flags, the same generation and length, and an xxh3-64 over the trailer and the
key. Generation and length appear at *both* ends, so a read that caught a slot mid-rewrite sees two different
generations, or a generation other than the one the lookup returned; a tear inside the payload is caught by
the checksum. The checksum may be skipped (GPU destinations, where hashing would cost a copy); generations,
lengths, keys and the two self-checks never are.

Every failure is a `CorruptBlock` naming what did not match: the caller turns it into a miss and a metric.

The data path writes and checks headers and trailers in place through `write_header_trailer` and
`check_header_trailer`, which run in C (`rdmapool._blockformat`) where it is built: the Python code below is the
reference (tests compare the two byte for byte) and the fallback.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from rdmapool.errors import CorruptBlock, UsageError

try:
    from rdmapool import _blockformat as _native
except ImportError:  # not built: the Python reference below does the same work, slower
    _native = None

FORMAT_VERSION = 1
HEADER_MAGIC = b"RPLB"
TRAILER_MAGIC = b"RPLT"
KEY_SIZE = 16
HEADER_SIZE = 64
TRAILER_SIZE = 32
OVERHEAD = HEADER_SIZE + TRAILER_SIZE

#: flag: the writer did not compute the payload checksum (the field is zero)
FLAG_NO_CHECKSUM = 0x01
_KNOWN_FLAGS = FLAG_NO_CHECKSUM

# header: magic, version, flags, reserved, generation, length, key, checksum(16)  -> 56 bytes, + u64 self-check
_HEADER = struct.Struct("<4sBBHQQ16s16s")
_HEADER_CHECK = struct.Struct("<Q")
# trailer: magic, version, flags, reserved, generation, length  -> 24 bytes, + u64 self-check (over it + key)
_TRAILER = struct.Struct("<4sBBHQQ")
assert _HEADER.size + _HEADER_CHECK.size == HEADER_SIZE
assert _TRAILER.size + _HEADER_CHECK.size == TRAILER_SIZE


def block_size(length: int) -> int:
    """Bytes a block of `length` payload bytes occupies in a slot."""
    return HEADER_SIZE + length + TRAILER_SIZE


def payload_checksum(payload: object) -> bytes:
    """xxh3-128 of the payload (any buffer-protocol object)."""
    return xxhash.xxh3_128_digest(payload)


@dataclass(frozen=True, slots=True)
class Expected:
    """What the lookup reply says the slot holds; a read must match it exactly."""

    key: bytes
    generation: int
    length: int


def check_key(key: object) -> bytes:
    if type(key) is bytes and len(key) == KEY_SIZE:  # the common case, kept cheap: runs once per key
        return key
    if not isinstance(key, bytes | bytearray):
        raise UsageError(f"a key is {KEY_SIZE} bytes as bytes or bytearray, got {type(key).__name__}"
                         + (" (convert it with bytes(...))" if _is_buffer(key) else ""))
    if len(key) != KEY_SIZE:
        raise UsageError(f"a key is exactly {KEY_SIZE} bytes, got {type(key).__name__} of {len(key)}")
    return bytes(key)


def _is_buffer(value: object) -> bool:
    try:
        memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def check_keys(keys: object) -> list[bytes]:
    """`check_key` of each, as a new list; the all-valid case runs as C loops (lookups pass 512 keys)."""
    if isinstance(keys, bytes | bytearray | memoryview | str):
        raise UsageError(f"keys must be a sequence of {KEY_SIZE}-byte keys, got one {type(keys).__name__}: "
                         "wrap a single key in a list")
    try:
        keys = list(keys)  # type: ignore[call-overload]
    except TypeError:
        raise UsageError(f"keys must be a sequence of {KEY_SIZE}-byte keys, got {type(keys).__name__}") from None
    if set(map(type, keys)) <= {bytes} and set(map(len, keys)) <= {KEY_SIZE}:
        return keys
    return [check_key(k) for k in keys]


def encode_header(key: bytes, generation: int, length: int, checksum: bytes | None) -> bytes:
    """The 64 header bytes. `checksum=None` marks the block as written without a payload checksum."""
    check_key(key)
    if not 0 <= generation < 2**64 or not 0 <= length < 2**64:
        raise UsageError("generation and length must fit in 64 unsigned bits")
    flags = FLAG_NO_CHECKSUM if checksum is None else 0
    body = _HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, flags, 0, generation, length, key, checksum or bytes(16))
    return body + _HEADER_CHECK.pack(xxhash.xxh3_64_intdigest(body))


def encode_trailer(key: bytes, generation: int, length: int, checksum_skipped: bool = False) -> bytes:
    """The 32 trailer bytes; its self-check covers the key too, so a trailer of another key fails."""
    flags = FLAG_NO_CHECKSUM if checksum_skipped else 0
    body = _TRAILER.pack(TRAILER_MAGIC, FORMAT_VERSION, flags, 0, generation, length)
    return body + _HEADER_CHECK.pack(xxhash.xxh3_64_intdigest(body + check_key(key)))


def encode_block(key: bytes, generation: int, payload: object, with_checksum: bool = True) -> bytes:
    """Header + payload + trailer as one bytes object (tests and the copying path use this)."""
    data = memoryview(payload).cast("B")
    checksum = payload_checksum(data) if with_checksum else None
    return (
        encode_header(key, generation, len(data), checksum)
        + bytes(data)
        + encode_trailer(key, generation, len(data), checksum is None)
    )


def validate(header: object, payload: object, trailer: object, expected: Expected,
             verify_checksum: bool = True) -> bytes | None:
    """Raise CorruptBlock unless header, payload and trailer form the block `expected` names. Returns the
    payload checksum the header carries (None when written without one), as `stored_checksum` would.

    `payload` may be None when it lives where the CPU cannot hash it (GPU memory); then `verify_checksum`
    must be False. Checks run on copies of the small fields, never on memory that may still change.
    """
    h = bytes(memoryview(header).cast("B")[:HEADER_SIZE])
    t = bytes(memoryview(trailer).cast("B")[:TRAILER_SIZE])
    if len(h) != HEADER_SIZE or len(t) != TRAILER_SIZE:
        raise CorruptBlock("short header or trailer")
    magic, version, flags, _, gen, length, key, checksum = _HEADER.unpack_from(h)
    if magic != HEADER_MAGIC:
        raise CorruptBlock("bad header magic (slot never written, or overwritten)")
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"unknown block format version {version}")
    (hcheck,) = _HEADER_CHECK.unpack_from(h, _HEADER.size)
    if hcheck != xxhash.xxh3_64_intdigest(h[: _HEADER.size]):
        raise CorruptBlock("header self-check failed")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptBlock(f"unknown header flags {flags:#x}")
    if key != expected.key:
        raise CorruptBlock("header names another key")
    if gen != expected.generation:
        raise CorruptBlock(f"header generation {gen} != expected {expected.generation} (slot reused)")
    if length != expected.length:
        raise CorruptBlock(f"header length {length} != expected {expected.length}")
    tmagic, tversion, tflags, _, tgen, tlength = _TRAILER.unpack_from(t)
    (tcheck,) = _HEADER_CHECK.unpack_from(t, _TRAILER.size)
    if tmagic != TRAILER_MAGIC or tversion != FORMAT_VERSION:
        raise CorruptBlock("bad trailer magic or version")
    if tcheck != xxhash.xxh3_64_intdigest(t[: _TRAILER.size] + expected.key):
        raise CorruptBlock("trailer self-check failed")
    if tgen != gen or tlength != length or tflags != flags:
        raise CorruptBlock(f"trailer generation {tgen} / length {tlength} disagree with the header (torn read)")
    if not verify_checksum:
        return None if flags & FLAG_NO_CHECKSUM else checksum
    if flags & FLAG_NO_CHECKSUM:
        raise CorruptBlock("block was written without a checksum but the reader requires one")
    if payload is None:
        raise UsageError("verify_checksum needs the payload in host memory")
    view = memoryview(payload).cast("B")
    if len(view) != length:
        raise CorruptBlock(f"payload of {len(view)} bytes, header says {length}")
    if payload_checksum(view) != checksum:
        raise CorruptBlock("payload checksum mismatch (torn or corrupted payload)")
    return checksum


#: stands for "a checksum will follow" when a trailer is written before its header (the trailer holds only the
#: flag that says whether the block has a checksum, not the checksum itself)
PENDING_CHECKSUM = bytes(16)


def write_header_trailer(head: object, tail: object, key: bytes, generation: int, length: int,
                         checksum: bytes | None) -> None:
    """Write a block's header into `head` and its trailer into `tail` (writable buffers; either may be None to
    write only the other). `checksum=None` marks the block as written without a payload checksum."""
    if _native is not None:
        try:
            _native.encode(head, tail, key, generation, length, checksum)
            return
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    for buf, size, what in ((head, HEADER_SIZE, "header"), (tail, TRAILER_SIZE, "trailer")):
        if buf is not None and len(memoryview(buf).cast("B")) < size:
            raise UsageError(f"the {what} needs {size} writable bytes")
    if head is not None:
        memoryview(head).cast("B")[:HEADER_SIZE] = encode_header(key, generation, length, checksum)
    if tail is not None:
        memoryview(tail).cast("B")[:TRAILER_SIZE] = encode_trailer(key, generation, length, checksum is None)


def check_header_trailer(header: object, trailer: object, expected: Expected) -> bytes | None:
    """`validate` without the payload: raise CorruptBlock unless header and trailer name the block `expected`
    describes; return the payload checksum the header carries (None when written without one)."""
    if _native is None:
        return validate(header, None, trailer, expected, verify_checksum=False)
    try:
        got = _native.check(header, trailer, expected.key, expected.generation, expected.length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if type(got) is int:  # a mismatch: the reference checks name it (the bytes are re-read; if they changed
        validate(header, None, trailer, expected, verify_checksum=False)  # meanwhile, still a corrupt read)
        raise CorruptBlock(f"header or trailer check failed (code {got})")
    return got


def check_ends(header: object, trailer: object, key: bytes, generation: int, length: int) -> bytes | None | bool:
    """`check_header_trailer` for a read's per-block loop: False for a header or trailer that does not name this
    block (no exception, no `Expected`: it runs once per block of every get)."""
    if _native is None:
        try:
            return check_header_trailer(header, trailer, Expected(key, generation, length))
        except CorruptBlock:
            return False
    try:
        got = _native.check(header, trailer, key, generation, length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return False if type(got) is int else got


def stored_checksum(header: object) -> bytes:
    """The payload checksum a (validated) header carries; CorruptBlock if it was written without one."""
    h = bytes(memoryview(header).cast("B")[:HEADER_SIZE])
    _, _, flags, _, _, _, _, checksum = _HEADER.unpack_from(h)
    if flags & FLAG_NO_CHECKSUM:
        raise CorruptBlock("block was written without a checksum but the reader requires one")
    return checksum


def validate_block(data: object, expected: Expected, verify_checksum: bool = True) -> memoryview:
    """Validate one contiguous block; return a view of its payload."""
    view = memoryview(data).cast("B")
    if len(view) != block_size(expected.length):
        raise CorruptBlock(f"block of {len(view)} bytes, expected {block_size(expected.length)}")
    payload = view[HEADER_SIZE : HEADER_SIZE + expected.length]
    validate(view[:HEADER_SIZE], payload, view[HEADER_SIZE + expected.length :], expected, verify_checksum)
    return payload
