"""The client's one-sided data path for one server: WRITE reserved blocks, READ and validate leased blocks.

Theory of operation
-------------------
Each block moves in ONE request: a WRITE gathers (header, payload, trailer) and a READ scatters the same three
pieces, so a registered payload is never copied and the remote bytes are contiguous. Header and trailer live
in the client's registered staging arena (as do payloads of unregistered buffers); when the arena fills, the
batch drains (every request in flight completes) before the arena is reused.

Requests are posted as soon as each is built and completions are taken as they arrive (`_Batch`), so building
or validating one block overlaps the transfer of others. Payload checksums come from the transport when its
endpoint digests (`Endpoint.digests`: the shm mover hashes each stride right after copying it, while it is in
cache, so the payload is not read from DRAM a second time); reads ask for the digest of the payload SGE and
writes send payload and trailer first, then the header with its digest. Otherwise checksums of large blocks
run on the `Hasher`'s worker threads (GIL released), overlapping the transfer; results are collected before
the arena is reused and before the call returns, all within the call's data deadline.

A read counts only after `block.validate` against the lookup reply and, for host destinations, the payload
checksum: anything else is a miss and a `corrupt_blocks` count. Timeouts and broken endpoints close the
connection (`ServerUnavailable` upwards: misses).

A server connection may hold several endpoints (verbs: `qps_per_peer` queue pairs); a batch spreads its
requests round-robin over them (`_Batch`), so one queue pair's outstanding-read limit does not cap the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rdmapool import block
from rdmapool.client.buffers import Arena, RegionSlice
from rdmapool.client.connection import ServerConnection
from rdmapool.client.hashing import Hasher
from rdmapool.errors import CorruptBlock, ServerUnavailable
from rdmapool.transport.base import EndpointState, Opcode, WorkRequest

if TYPE_CHECKING:
    from rdmapool.client.client import BlockRef, PoolClient


class _Batch:
    """One-sided requests on one server's data endpoints: posted one by one (or a list at a time), spread
    round-robin over the endpoints, completions handed to `done(wr_id, ok, digest)` as they arrive, all within
    one `data_timeout_s` deadline.

    Requests need no order across endpoints: each block is one READ or one WRITE, and a header WRITE that must
    follow its payload is built only after the payload's completion came back. Each endpoint keeps its own RC
    order and its own count in flight; an endpoint left in ERROR closes the whole connection."""

    def __init__(self, client: PoolClient, conn: ServerConnection,
                 done: Callable[[int, bool, bytes | None], None]) -> None:
        if not conn.endpoints:
            raise ServerUnavailable(f"{conn.address}: no data endpoint")
        self.client, self.conn, self.done = client, conn, done
        self.endpoints = list(conn.endpoints)
        self.endpoint = self.endpoints[0]  # every endpoint of a transport has the same `digests`
        self.flying = [0] * len(self.endpoints)  # requests in flight, per endpoint
        self._next = 0  # the endpoint the next request goes to
        self.deadline = client.clock() + client.config.data_timeout_s

    @property
    def in_flight(self) -> int:
        return sum(self.flying)

    def remaining(self) -> float:
        return self.deadline - self.client.clock()

    def post(self, wr: WorkRequest) -> None:
        i = self._next
        self._next = (i + 1) % len(self.endpoints)
        self.endpoints[i].post([wr])
        self.flying[i] += 1
        self._poll_all()

    def post_many(self, wrs: list[WorkRequest]) -> None:
        """One post per endpoint for several requests (shm: one pass of the native mover, GIL released once)."""
        if not wrs:
            return
        k = len(self.endpoints)
        start = self._next
        self._next = (start + len(wrs)) % k
        for j in range(min(k, len(wrs))):
            i = (start + j) % k
            part = wrs[j::k]
            self.endpoints[i].post(part)
            self.flying[i] += len(part)
        self._poll_all()

    def drain(self) -> None:
        while self.in_flight:
            i = next(j for j, f in enumerate(self.flying) if f)
            remaining = self.remaining()
            try:
                if remaining <= 0:
                    raise TimeoutError
                got = self.endpoints[i].wait(1, remaining)
            except TimeoutError as exc:
                self.conn.close(mark_down=True)
                raise ServerUnavailable(f"{self.conn.address}: one-sided operations timed out") from exc
            self._reap(i, got)
            self._poll_all()
        if any(ep.state is not EndpointState.READY for ep in self.endpoints):
            self.conn.close()  # a broken endpoint is never repaired: reconnect on the next call

    def timed_out(self) -> ServerUnavailable:
        self.conn.close(mark_down=True)
        return ServerUnavailable(f"{self.conn.address}: data path timed out")

    def _poll_all(self) -> None:
        for i, ep in enumerate(self.endpoints):
            if self.flying[i]:
                self._reap(i, ep.poll(self.flying[i]))

    def _reap(self, i: int, completions: list) -> None:
        for c in completions:
            self.flying[i] -= 1
            if not c.ok:
                self.client.counters.add(f"wc_{c.status.name.lower()}")
            self.done(c.wr_id, c.ok, c.digest)


def write_blocks(client: PoolClient, conn: ServerConnection, items: list) -> list[bool]:
    """items: (key, reservation, source); returns which blocks were written completely.

    When the endpoint digests WRITEs (see `Endpoint.digests`), payload and trailer go first (the trailer holds
    no checksum) and the transport hashes the payload as it copies; its completion's digest then goes into the
    header, written by a second request (the slot is reserved and invisible until commit, so the order in which
    the pieces land does not matter). Otherwise the checksum is computed first (`Hasher`) and one WRITE
    carries header, payload and trailer."""
    arena = client.arena()
    hasher: Hasher = client.hasher
    fused = conn.endpoint is not None and Opcode.WRITE in conn.endpoint.digests  # the same on every endpoint
    ok: list[bool] = [False] * len(items)
    good = [0] * len(items)  # requests of block n completed successfully
    need = [1] * len(items)  # requests block n takes
    ready: list[tuple[int, bytes | None]] = []  # payloads landed: (n, digest) whose header and trailer are due
    late: dict[int, tuple] = {}  # n -> (head, payload view) for the second request

    def done(wr_id: int, success: bool, digest: bytes | None) -> None:
        n, part = divmod(wr_id, 4)
        if success:
            good[n] += 1
            ok[n] = good[n] == need[n]
            if part == 1:
                ready.append((n, digest))

    batch = _Batch(client, conn, done)

    pending: list[WorkRequest] = []  # payload+trailer WRITEs, posted together

    def post_ready() -> None:
        """The headers of the blocks whose payload and trailer landed, in one post."""
        wrs = []
        for n, digest in ready:
            key, grant, _src = items[n]
            head, view = late.pop(n)
            checksum = digest if digest is not None else block.payload_checksum(view)
            head[1][:] = block.encode_header(key, grant.generation, len(view), checksum)
            wrs.append(WorkRequest(4 * n + 2, Opcode.WRITE, (head[0],), grant.addr, grant.rkey))
        ready.clear()
        batch.post_many(wrs)

    def finish() -> None:
        while True:
            batch.post_many(pending)
            pending.clear()
            post_ready()
            batch.drain()
            if not ready:
                return

    hosts = [_host_view(src) for _, _, src in items]
    split = [fused and h is not None and len(h) > 0 for h in hosts]
    # start every large checksum the transport will not compute: workers hash ahead while blocks are posted
    sums = [None if (h is None or split[n]) else hasher.submit(h) for n, h in enumerate(hosts)]
    arena.reset()
    for n, (key, grant, src) in enumerate(items):
        if split[n]:
            need[n] = 2
            wr = _payload_request(client, n, arena, key, grant, src, late)
            if wr is None:
                finish()
                arena.reset()
                wr = _payload_request(client, n, arena, key, grant, src, late)
        else:
            try:
                checksum = None if sums[n] is None else hasher.result(sums[n], batch.remaining())
            except TimeoutError:
                raise batch.timed_out() from None
            wr = _write_request(client, 4 * n, arena, key, grant, src, checksum)
            if wr is None:  # arena full: let what is staged land, then start over
                finish()
                arena.reset()
                wr = _write_request(client, 4 * n, arena, key, grant, src, checksum)
        if split[n]:
            pending.append(wr)
        else:
            batch.post(wr)  # right away: its transfer overlaps the next checksum
    finish()
    arena.reset()
    return ok


def _payload_request(client: PoolClient, n: int, arena: Arena, key: bytes, grant, src,
                     late: dict) -> WorkRequest | None:
    """Block n's WRITE of payload and trailer (no checksum in it), digest of the payload requested; the
    header's arena slot is kept in `late` for the second request."""
    head, tail = arena.take(block.HEADER_SIZE), arena.take(block.TRAILER_SIZE)
    if head is None or tail is None:
        return None
    view = _host_view(src)
    if isinstance(src, RegionSlice):
        sge = src.region.sge(src.offset, src.length)
    else:
        sge = client.registry.find(src)
    if sge is None:
        staged = arena.take(len(view))
        if staged is None:
            return None
        sge, staged_view = staged
        staged_view[:] = view
    tail[1][:] = block.encode_trailer(key, grant.generation, len(view), False)
    late[n] = (head, view)
    return WorkRequest(4 * n + 1, Opcode.WRITE, (sge, tail[0]), grant.addr + block.HEADER_SIZE, grant.rkey,
                       digest=0)


def _host_view(src) -> memoryview | None:
    return src.view() if isinstance(src, RegionSlice) else src


def _write_request(client: PoolClient, n: int, arena: Arena, key: bytes, grant, src,
                   checksum: bytes | None) -> WorkRequest | None:
    length = src.length if isinstance(src, RegionSlice) else len(src)
    head, tail = arena.take(block.HEADER_SIZE), arena.take(block.TRAILER_SIZE)
    if head is None or tail is None:
        return None
    if isinstance(src, RegionSlice):
        payload_sge = src.region.sge(src.offset, src.length)
    else:
        payload_sge = client.registry.find(src)
    if payload_sge is None and length:
        staged = arena.take(length)
        if staged is None:
            return None
        payload_sge, view = staged
        view[:] = src
    # a None checksum (device memory) is recorded as such in the flags; readers then need verify off
    head[1][:] = block.encode_header(key, grant.generation, length, checksum)
    tail[1][:] = block.encode_trailer(key, grant.generation, length, checksum is None)
    sgl = (head[0], payload_sge, tail[0]) if length else (head[0], tail[0])
    return WorkRequest(n, Opcode.WRITE, sgl, grant.addr, grant.rkey)


def read_blocks(client: PoolClient, conn: ServerConnection, refs: list[BlockRef], targets: list,
                idx: list[int], out: list[int | None]) -> None:
    """One READ per block; each validated as it completes; `out[idx[n]]` = payload length for good blocks."""
    arena = client.arena()
    arena.reset()
    staged: dict[int, tuple] = {}
    hashing: list[tuple] = []  # (future, wanted checksum, n, payload, target, copy)
    verify = client.config.verify_checksum

    def accept(n: int, payload, target, copy: bool) -> None:
        if copy:
            target[: refs[n].length] = payload
        out[idx[n]] = refs[n].length
        client.counters.add("bytes_read", refs[n].length)

    def done(n: int, success: bool, digest: bytes | None) -> None:
        head, payload, tail, target, copy = staged.pop(n)
        if not success:
            return
        ref = refs[n]
        check = verify and payload is not None
        try:
            want = block.validate(head, payload, tail, block.Expected(ref.key, ref.hit.generation, ref.length),
                                  verify_checksum=False)
            if check and want is None:
                raise CorruptBlock("block was written without a checksum but the reader requires one")
        except CorruptBlock:
            client.counters.add("corrupt_blocks")
            return
        if check and digest is None:  # the transport did not hash what landed: hash it here
            hashing.append((client.hasher.submit(payload), want, n, payload, target, copy))
        elif check and digest != want:
            client.counters.add("corrupt_blocks")
        else:
            accept(n, payload, target, copy)

    def settle() -> None:
        """Collect the checksums started so far (before the arena is reused, and at the end)."""
        for fut, want, n, payload, target, copy in hashing:
            try:
                got = client.hasher.result(fut, batch.remaining())
            except TimeoutError:
                raise batch.timed_out() from None
            if got == want:
                accept(n, payload, target, copy)
            else:
                client.counters.add("corrupt_blocks")
        hashing.clear()

    batch = _Batch(client, conn, done)
    # an endpoint that digests READs needs no hashing to overlap: its requests go in one post
    together = Opcode.READ in batch.endpoint.digests
    pending: list[WorkRequest] = []
    epoch = int(conn.hello.get("epoch", -1))
    for n, (ref, target) in enumerate(zip(refs, targets, strict=True)):
        if ref.epoch != epoch:
            client.counters.add("stale_refs")  # the server restarted since the lookup
            continue
        pieces = _read_pieces(client, arena, ref, target)
        if pieces is None:  # arena full: finish what is in flight, then reuse the arena
            batch.post_many(pending)
            pending.clear()
            batch.drain()
            settle()
            arena.reset()
            pieces = _read_pieces(client, arena, ref, target)
        head, payload_sge, payload_view, tail, copy = pieces
        sgl = (head[0], payload_sge, tail[0]) if ref.length else (head[0], tail[0])
        staged[n] = (head[1], payload_view, tail[1], target, copy)
        digest = 1 if verify and ref.length and payload_view is not None else None  # the payload SGE
        wr = WorkRequest(n, Opcode.READ, sgl, ref.hit.addr, ref.hit.rkey, digest=digest)
        if together:
            pending.append(wr)
        else:
            batch.post(wr)
    batch.post_many(pending)
    batch.drain()
    settle()


def _read_pieces(client: PoolClient, arena: Arena, ref: BlockRef, target):
    head, tail = arena.take(block.HEADER_SIZE), arena.take(block.TRAILER_SIZE)
    if head is None or tail is None:
        return None
    n = ref.length
    if isinstance(target, RegionSlice):
        sge = target.region.sge(target.offset, n)
        view = target.view()
        return head, sge, None if view is None else view[:n], tail, False
    direct = client.registry.find(target[:n])
    if direct is not None:
        return head, direct, target[:n], tail, False
    staged = arena.take(n)
    if staged is None:
        return None
    return head, staged[0], staged[1], tail, True
