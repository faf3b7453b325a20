"""The client over the transport's fault wrapper, against a real server process (tcp and shm): torn READs with a
slot rewrite between the pieces are misses; a payload byte flipped in the slot is a miss; a failed queue pair
costs misses, then the client reconnects."""

from __future__ import annotations

import os

import pytest

from rdmapool import block
from rdmapool import transport as transports
from rdmapool.client import PoolClient, PutStatus
from rdmapool.config import ClientConfig
from rdmapool.transport.base import Opcode, WcStatus, WorkRequest
from rdmapool.transport.faults import FaultyTransport, TornReads
from tests.support import procs

TRANSPORTS = ["tcp", "shm"]
SIZE = 64 << 10


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def faulty_client(srv: procs.ServerProc, transport: str) -> tuple[PoolClient, FaultyTransport]:
    ft = FaultyTransport(transports.create(transport))
    cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=1 << 20, retry_after_s=0.0)
    return PoolClient([srv.address], cfg, transport=ft, transport_name=transport), ft


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_torn_reads_with_a_rewrite_between_pieces_are_misses(transport: str) -> None:
    with procs.running(transport, "4MiB", "--size-classes", "64KiB") as srv:
        c, ft = faulty_client(srv, transport)
        with ft, c:
            good = os.urandom(SIZE)
            assert c.put([key(1)], [good]) == [PutStatus.STORED]
            (ref,) = c.lookup_prefix([key(1)]).refs
            (ep,) = ft.endpoints
            intruder = block.encode_block(key(2), ref.hit.generation + 1, os.urandom(SIZE))
            original = block.encode_block(key(1), ref.hit.generation, good)
            scratch = ft.allocate(len(intruder))
            writer = ft.inner.connect(srv.info["peer_info"], timeout=5.0)

            def overwrite(data: bytes) -> None:
                scratch.view[: len(data)] = data
                wr = WorkRequest(1, Opcode.WRITE, (scratch.sge(0, len(data)),), ref.hit.addr, ref.hit.rkey)
                (done,) = writer.execute([wr], 5.0)
                assert done.ok

            for pieces_done_at_rewrite in (1, 2, 3):
                overwrite(original)

                def hook(wr: WorkRequest, done: int, at: int = pieces_done_at_rewrite) -> None:
                    if done == at:
                        overwrite(intruder)  # the slot is rewritten while the READ is half done

                ep.tear_reads(TornReads(pieces=4, hook=hook))
                assert c.read([ref], [bytearray(SIZE)]) == [None]
            assert c.counters["corrupt_blocks"] == 3
            ep.tear_reads(None)
            overwrite(original)
            buf = bytearray(SIZE)
            assert c.read([ref], [buf]) == [SIZE] and bytes(buf) == good
            writer.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_payload_byte_flipped_in_the_slot_is_a_miss(transport: str) -> None:
    """Checksum corruption end to end: one payload byte of a stored block, flipped in the server's memory by a
    one-sided WRITE from another endpoint (header, trailer and generation untouched), makes the get a miss
    counted as a corrupt block; with the byte restored the block hits byte-exact again."""
    with procs.running(transport, "4MiB", "--size-classes", "64KiB") as srv, \
            PoolClient([srv.address], ClientConfig(token=procs.TOKENS["a"], staging_bytes=1 << 20),
                       transport_name=transport) as c, transports.create(transport) as other:
        good = os.urandom(SIZE)
        assert c.put([key(1)], [good]) == [PutStatus.STORED]
        (ref,) = c.lookup_prefix([key(1)]).refs
        writer = other.connect(srv.info["peer_info"], timeout=5.0)
        scratch = other.allocate(64)

        def poke(at: int, value: int) -> None:
            """Write one byte at payload offset `at` of the slot."""
            scratch.view[0] = value
            wr = WorkRequest(1, Opcode.WRITE, (scratch.sge(0, 1),), ref.hit.addr + block.HEADER_SIZE + at,
                             ref.hit.rkey)
            (done,) = writer.execute([wr], 5.0)
            assert done.ok

        for n, at in enumerate((0, SIZE // 2, SIZE - 1), 1):
            poke(at, good[at] ^ 0x01)
            assert c.get([key(1)], [bytearray(SIZE)]) == [None]
            assert c.counters["corrupt_blocks"] == n
            poke(at, good[at])
            buf = bytearray(SIZE)
            assert c.get([key(1)], [buf]) == [SIZE] and buf == good
        assert c.counters["corrupt_blocks"] == 3
        writer.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failed_queue_pair_costs_misses_then_reconnects(transport: str) -> None:
    with procs.running(transport, "4MiB", "--size-classes", "64KiB") as srv:
        c, ft = faulty_client(srv, transport)
        with ft, c:
            assert c.put([key(1)], [b"x" * 100]) == [PutStatus.STORED]
            ft.endpoints[-1].fail(WcStatus.RETRY_EXC_ERR, after=0)
            assert c.get([key(1)], [bytearray(100)]) == [None]
            assert c.counters["wc_retry_exc_err"] == 1
            assert c.get([key(1)], [bytearray(100)]) == [100]  # a fresh endpoint on the next call
            assert len(ft.endpoints) == 2
            ft.endpoints[-1].fail(WcStatus.REM_ACCESS_ERR, after=0)
            assert c.put([key(2)], [b"y" * 100]) == [PutStatus.FAILED]  # WRITE failed: aborted, not committed
            assert len(c.lookup_prefix([key(2)])) == 0
            assert c.put([key(2)], [b"y" * 100]) == [PutStatus.STORED]  # the abort freed the key
