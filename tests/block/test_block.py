"""The block format: round trips, and every kind of damage is a CorruptBlock, never data."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdmapool import block
from rdmapool.block import HEADER_SIZE, TRAILER_SIZE, Expected, encode_block, validate_block
from rdmapool.errors import CorruptBlock, UsageError

KEY = bytes(range(16))


def test_round_trip_returns_payload() -> None:
    payload = os.urandom(1000)
    data = encode_block(KEY, 7, payload)
    assert len(data) == block.block_size(1000)
    assert bytes(validate_block(data, Expected(KEY, 7, 1000))) == payload


def test_empty_payload_round_trips() -> None:
    assert bytes(validate_block(encode_block(KEY, 1, b""), Expected(KEY, 1, 0))) == b""


@pytest.mark.parametrize(
    ("expected", "reason"),
    [
        (Expected(bytes(16), 7, 100), "another key"),
        (Expected(KEY, 8, 100), "generation"),
        (Expected(KEY, 7, 99), "expected"),
    ],
)
def test_mismatch_with_lookup_reply_is_corrupt(expected: Expected, reason: str) -> None:
    data = encode_block(KEY, 7, os.urandom(100))
    if expected.length != 100:
        data = data[:HEADER_SIZE] + data[HEADER_SIZE : HEADER_SIZE + expected.length] + data[-TRAILER_SIZE:]
    with pytest.raises(CorruptBlock, match=reason):
        validate_block(data, expected)


def test_payload_flip_caught_by_checksum_and_passes_when_skipped() -> None:
    data = bytearray(encode_block(KEY, 3, os.urandom(4096)))
    data[HEADER_SIZE + 2000] ^= 0x40
    with pytest.raises(CorruptBlock, match="checksum"):
        validate_block(data, Expected(KEY, 3, 4096))
    # a GPU destination skips the checksum: only headers and generations are checked
    validate_block(data, Expected(KEY, 3, 4096), verify_checksum=False)


def test_no_checksum_block_is_refused_by_a_checksumming_reader() -> None:
    data = encode_block(KEY, 3, b"abc", with_checksum=False)
    validate_block(data, Expected(KEY, 3, 3), verify_checksum=False)
    with pytest.raises(CorruptBlock, match="without a checksum"):
        validate_block(data, Expected(KEY, 3, 3))


def test_torn_read_old_header_new_trailer_is_caught() -> None:
    old = encode_block(KEY, 10, b"A" * 256)
    new = encode_block(KEY, 11, b"B" * 256)
    torn = old[:HEADER_SIZE] + new[HEADER_SIZE:]
    for expected in (Expected(KEY, 10, 256), Expected(KEY, 11, 256)):
        with pytest.raises(CorruptBlock):
            validate_block(torn, expected)


def test_never_written_slot_is_corrupt() -> None:
    with pytest.raises(CorruptBlock, match="magic"):
        validate_block(bytes(block.block_size(10)), Expected(KEY, 1, 10))


def test_bad_key_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="16 bytes"):
        block.encode_header(b"short", 1, 1, None)


@given(
    payload=st.binary(min_size=1, max_size=300),
    pos=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_single_bit_flip_is_detected(payload: bytes, pos: int, bit: int) -> None:
    data = bytearray(encode_block(KEY, 99, payload))
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(CorruptBlock):
        validate_block(data, Expected(KEY, 99, len(payload)))


@given(split=st.lists(st.booleans(), min_size=8, max_size=8), n=st.integers(min_value=1, max_value=512))
def test_any_mix_of_two_generations_is_detected(split: list[bool], n: int) -> None:
    """A torn read: each eighth of the block comes from the old or the new write, in any placement order."""
    old = encode_block(KEY, 1, b"\x01" * n)
    new = encode_block(KEY, 2, b"\x02" * n)
    if all(split) or not any(split):
        return
    size = len(old)
    cuts = [size * i // 8 for i in range(9)]
    torn = b"".join((new if s else old)[cuts[i] : cuts[i + 1]] for i, s in enumerate(split))
    if torn in (old, new):
        return
    for gen in (1, 2):
        with pytest.raises(CorruptBlock):
            validate_block(torn, Expected(KEY, gen, n))


def test_validate_returns_the_stored_checksum() -> None:
    key, payload = os.urandom(16), os.urandom(5000)
    for with_checksum in (True, False):
        data = memoryview(encode_block(key, 9, payload, with_checksum=with_checksum))
        head, body, tail = data[:HEADER_SIZE], data[HEADER_SIZE:-TRAILER_SIZE], data[-TRAILER_SIZE:]
        want = block.payload_checksum(payload) if with_checksum else None
        assert block.validate(head, body, tail, Expected(key, 9, 5000), verify_checksum=False) == want
        if with_checksum:
            assert block.validate(head, body, tail, Expected(key, 9, 5000)) == want == block.stored_checksum(head)


needs_native = pytest.mark.skipif(block._native is None, reason="rdmapool._blockformat is not built (setup.py build_ext)")


@needs_native
@given(key=st.binary(min_size=16, max_size=16), gen=st.integers(0, 2**64 - 1), length=st.integers(0, 2**64 - 1),
       checksum=st.one_of(st.none(), st.binary(min_size=16, max_size=16)))
def test_native_header_and_trailer_are_the_reference_bytes(key: bytes, gen: int, length: int,
                                                           checksum: bytes | None) -> None:
    head, tail = bytearray(HEADER_SIZE), bytearray(TRAILER_SIZE)
    block.write_header_trailer(head, tail, key, gen, length, checksum)
    assert bytes(head) == block.encode_header(key, gen, length, checksum)
    assert bytes(tail) == block.encode_trailer(key, gen, length, checksum is None)
    assert block.check_header_trailer(head, tail, Expected(key, gen, length)) == checksum


@needs_native
def test_two_part_write_trailer_first_then_header_matches_one_part() -> None:
    """The split write path sends the trailer before the checksum exists (PENDING_CHECKSUM), the header after."""
    checksum = os.urandom(16)
    head, tail = bytearray(HEADER_SIZE), bytearray(TRAILER_SIZE)
    block.write_header_trailer(None, tail, KEY, 5, 77, block.PENDING_CHECKSUM)
    block.write_header_trailer(head, None, KEY, 5, 77, checksum)
    assert bytes(head) + bytes(tail) == block.encode_header(KEY, 5, 77, checksum) + block.encode_trailer(KEY, 5, 77)


@given(payload=st.binary(min_size=0, max_size=200), pos=st.integers(min_value=0), bit=st.integers(0, 7),
       expect=st.sampled_from(["same", "key", "gen", "length"]))
def test_header_trailer_check_agrees_with_validate(payload: bytes, pos: int, bit: int, expect: str) -> None:
    """Native (where built) or not, `check_header_trailer` refuses exactly what `validate` refuses without the
    payload checksum, with the reference's message."""
    data = bytearray(encode_block(KEY, 42, payload))
    hdr_and_tail = list(range(HEADER_SIZE)) + list(range(len(data) - TRAILER_SIZE, len(data)))
    data[hdr_and_tail[pos % len(hdr_and_tail)]] ^= 1 << bit
    expected = {"same": Expected(KEY, 42, len(payload)), "key": Expected(bytes(16), 42, len(payload)),
                "gen": Expected(KEY, 43, len(payload)), "length": Expected(KEY, 42, len(payload) + 1)}[expect]
    head, tail = bytes(data[:HEADER_SIZE]), bytes(data[-TRAILER_SIZE:])
    try:
        want = block.validate(head, None, tail, expected, verify_checksum=False)
    except CorruptBlock as exc:
        with pytest.raises(CorruptBlock) as got:
            block.check_header_trailer(head, tail, expected)
        assert str(got.value) == str(exc)
    else:
        assert block.check_header_trailer(head, tail, expected) == want


def test_write_header_trailer_refuses_bad_fields() -> None:
    head, tail = bytearray(HEADER_SIZE), bytearray(TRAILER_SIZE)
    with pytest.raises(UsageError, match="16 bytes"):
        block.write_header_trailer(head, tail, b"short", 1, 1, None)
    with pytest.raises(UsageError, match="64 unsigned bits"):
        block.write_header_trailer(head, tail, KEY, -1, 1, None)
    with pytest.raises(UsageError):
        block.write_header_trailer(bytearray(10), tail, KEY, 1, 1, None)
