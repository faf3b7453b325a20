"""The client's one-sided data path for one server: WRITE reserved blocks, READ and validate leased blocks.

Theory of operation
-------------------
Each block moves in ONE request: a WRITE gathers (header, payload, trailer) and a READ scatters the same three
pieces, so a registered payload is never copied and the remote bytes are contiguous. Header and trailer live
in the client's registered staging arena (as do payloads of unregistered buffers); when the arena fills, the
batch drains (every request in flight completes) before the arena is reused.

Requests are posted as they are built (reads that need no per-block work between them, and every read on an
asynchronous endpoint, in groups of `STREAM_BYTES`), and completions are taken as they arrive
(`_Batch`), so building or validating one block overlaps the transfer of others; on an asynchronous endpoint
(`Endpoint.asynchronous`: shm's Mover thread) the bytes move while this thread works. Checksums:
- reads: the transport's digest of the payload SGE where the endpoint offers one (`Endpoint.digests`; shm's
  waiting caller hashes trailing the Mover's copy, the tcp engine hashes each received chunk as it lands, on a
  digest thread where the process has spare cores, and a tcp batch then waits in one call per endpoint);
  otherwise this thread hashes each payload as its completion arrives,
  while the bytes are still in its cache (or a worker does, where the process has spare cores: payloads under
  `THREAD_MIN` handed over `SMALL_HASH_BYTES` at a time, see `Hasher.submit_many`). shm on a process
  with spare cores takes the workers too (`spare_cores`: measured faster than hashing trailing the Mover),
  except for a large last block (`TAIL_DIGEST_MIN`), whose hash after landing nothing would overlap;
- writes of payloads from `SPLIT_MIN` (256 KiB) up, asynchronous endpoint with transport digests on: payload and
  trailer go first; the payload is hashed while it moves, by this thread (`BlockWriter.inline`, two CPUs) or by
  the `Hasher`'s workers several blocks at once (`offload`, spare cores), and the header follows as its checksum
  is known: nothing waits for a checksum before moving;
- writes of such payloads on an endpoint that digests WRITEs but moves them in the posting thread: payload and
  trailer first with the digest requested, the header once it landed;
- writes, otherwise (tcp, and every payload under `SPLIT_MIN`): checksums run ahead on the `Hasher`'s workers
  (small ones here, when due, or, with spare cores, on the workers `SMALL_HASH_BYTES` at a time) and one WRITE
  carries header, payload and trailer, posted in `GROUP_BYTES` groups;
  only a put's first block, from `LEAD_MIN` up, goes payload first, so nothing waits for the first checksum.
  The slot is reserved and invisible until commit, so the order in which the pieces land does not matter.
  Everything completes within the call's data deadline.

A read counts only after `block.check_header_trailer` against the lookup reply and, for host destinations, the payload
checksum: anything else is a miss and a `corrupt_blocks` count. Timeouts and broken endpoints close the
connection (`ServerUnavailable` upwards: misses).

A server connection may hold several endpoints (verbs: `qps_per_peer` queue pairs); a batch spreads its
requests round-robin over them (`_Batch`), so one queue pair's outstanding-read limit does not cap the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from rdmapool import block
from rdmapool.client.buffers import Arena, RegionSlice
from rdmapool.client.connection import ServerConnection
from rdmapool.client.hashing import THREAD_MIN, Hasher, PendingChecksum
from rdmapool.errors import ServerUnavailable
from rdmapool.transport.base import CompletionTimeout, EndpointState, Opcode, WcStatus, WorkRequest

if TYPE_CHECKING:
    from rdmapool.client.client import BlockRef, PoolClient

#: requests that need no per-block work between them are posted in groups of about this many payload bytes:
#: a transport that moves bytes asynchronously (shm's mover thread, the tcp engine) moves one group while
#: the next is built and the completed ones are validated
STREAM_BYTES = 4 << 20
#: whole-block WRITEs whose checksums are known are posted in groups of about this many payload bytes (one
#: 1 MiB block alone; 64 KiB blocks sixteen at a time): the tcp initiator sends up to 1 MiB per call
GROUP_BYTES = 1 << 20
#: smaller payloads are hashed by this thread before their block is built and go as one WRITE even where the
#: transport could hash them in flight or this thread could hash them while they move: a second request per
#: block (header after payload) costs more than hashing 64 KiB (~3 us)
SPLIT_MIN = 256 << 10
#: checksums submitted to the workers before the first whole-block WRITE is posted (the rest follow it)
FIRST_HASHES = 4
#: payload bytes of two-part blocks (see `BlockWriter`) queued on the transport at most (plus one group of
#: `WRITE_STREAM_BYTES`): deep enough to cover a reservation or commit round trip and the hash workers' lag
#: (16-core host, 1 MiB shm puts: 13-16% overhead against 18-24% with 4 + 4 MiB; no difference on two cores)
WINDOW_BYTES = 16 << 20
#: two-part WRITEs are posted in groups of about this many payload bytes
WRITE_STREAM_BYTES = 8 << 20
#: while a block's checksum is still being computed, the transport is driven in slices this long (`_Batch.drive`)
DRIVE_S = 0.0002
#: a get whose blocks are hashed by this thread or the workers once they landed asks the transport for the last
#: block's digest (hashed while it moves) from this size up
TAIL_DIGEST_MIN = 8 << 20
#: small payloads (under `THREAD_MIN`) hashed on the workers, where the process has spare cores, go to them in
#: one hand-off per this many bytes (`Hasher.submit_many`). This thread hashing every 64 KiB block in turn cost
#: the H200 host's shm get 47% of the raw READ's bandwidth, 25% with the workers (docs/decisions.md)
SMALL_HASH_BYTES = 1 << 20
#: tcp (bytes move only inside this thread's calls): a put's first block, from this size up, goes payload first with
#: its checksum on a worker and the header once it is known, so bytes move at once instead of after the first
#: checksum (a 32 MiB block's took ~2.7 ms here, with nothing moving)
LEAD_MIN = 4 << 20


class _Batch:
    """One-sided requests on one server's data endpoints: posted one by one (or a list at a time), spread
    round-robin over the endpoints, completions handed to `done(wr_id, ok, digest)` as they arrive, all within
    one `data_timeout_s` deadline.

    Requests need no order across endpoints: each block is one READ or one WRITE, or a payload and a header
    WRITE whose slot stays invisible until both completed and the block was committed. Each endpoint keeps its
    own RC order and its own count in flight; an endpoint left in ERROR closes the whole connection, and what
    the batch posts after that fails at once, as a queue pair in error flushes it (a miss, or a failed put)."""

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
        self.broken = False  # an endpoint failed and the connection was dropped: later requests flush

    @property
    def in_flight(self) -> int:
        return sum(self.flying)

    def remaining(self) -> float:
        return self.deadline - self.client.clock()

    def post(self, wr: WorkRequest) -> None:
        if self.broken:
            self._flush([wr])
            return
        i = self._next
        self._next = (i + 1) % len(self.endpoints)
        self.endpoints[i].post([wr])
        self.flying[i] += 1
        self._poll_all()

    def post_many(self, wrs: list[WorkRequest]) -> None:
        """One post per endpoint for several requests (shm: one pass of the native mover, GIL released once)."""
        if not wrs:
            return
        if self.broken:
            self._flush(wrs)
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

    def poll(self) -> None:
        """Take the completions that are ready, without blocking."""
        self._poll_all()

    def wait_one(self) -> None:
        """Block until one more request completes (of the first endpoint with any in flight)."""
        if not self.in_flight:
            return
        i = next(j for j, f in enumerate(self.flying) if f)
        self._reap(i, self._wait(i, 1))
        self._poll_all()

    def _wait(self, i: int, count: int) -> list:
        """`count` completions of endpoint i within the batch's deadline; a timeout closes the connection."""
        remaining = self.remaining()
        try:
            if remaining <= 0:
                raise TimeoutError
            return self.endpoints[i].wait_results(count, remaining)
        except TimeoutError as exc:
            raise self.timed_out() from exc

    def drive(self, seconds: float) -> None:
        """Let the transport move bytes for up to `seconds`, reaping what completes: a transport whose progress
        runs in the caller's calls (tcp) keeps its socket full while this thread waits for something else."""
        if not self.in_flight:
            return
        i = next(j for j, f in enumerate(self.flying) if f)
        remaining = self.remaining()
        if remaining <= 0:
            raise self.timed_out()
        try:
            got = self.endpoints[i].wait_results(1, min(seconds, remaining))
        except CompletionTimeout as exc:  # the short slice ran out: not a failure (count 1: nothing is lost)
            got = getattr(exc, "completions", [])
        self._reap(i, got)
        self._poll_all()

    def drain(self, bulk: bool = False) -> None:
        """Wait for everything in flight. `bulk`: in one wait per endpoint, completions handled after it (for a
        caller with nothing to do per block: one pass of the transport's wait loop instead of one per request)."""
        if bulk:
            for i in range(len(self.endpoints)):
                while self.flying[i]:
                    self._reap(i, self._wait(i, self.flying[i]))
        while self.in_flight:
            self.wait_one()
        if not self.broken and any(ep.state is not EndpointState.READY for ep in self.endpoints):
            self.broken = True
            self.conn.drop_broken_data_path()  # never repaired: reconnect on the next call

    def _flush(self, wrs: list[WorkRequest]) -> None:
        """Requests for a dropped data path: failed at once (WR_FLUSH_ERR), as a queue pair in error does."""
        self.client.counters.add("wc_wr_flush_err", len(wrs))
        for wr in wrs:
            self.done(wr.wr_id, False, None)

    def timed_out(self) -> ServerUnavailable:
        self.conn.close(mark_down=True)
        return ServerUnavailable(f"{self.conn.address}: data path timed out")

    def _poll_all(self) -> None:
        for i, ep in enumerate(self.endpoints):
            if self.flying[i]:
                self._reap(i, ep.poll_results(self.flying[i]))

    def _reap(self, i: int, completions: list) -> None:
        """Completions as `Endpoint.poll_results` tuples: (wr_id, status, opcode, byte_len[, digest])."""
        self.flying[i] -= len(completions)
        done = self.done
        for c in completions:
            if c[1]:
                self.client.counters.add(f"wc_{WcStatus(c[1]).name.lower()}")
            done(c[0], not c[1], c[4] if len(c) == 5 else None)


class BlockWriter:
    """WRITEs of reserved blocks to one server, added a chunk at a time (`add`), so the caller can reserve or
    commit one chunk in a control round trip while the transport moves the others. `take_written` hands out
    the blocks written completely since its last call; `finish` waits for the rest. How each block's checksum
    reaches its header (payload first, or one WRITE after the checksum) is in the module docstring; wr_ids are
    4n + part (0: the whole block, 1: payload+trailer whose header waits for its digest, 2: header, 3:
    payload+trailer whose header is posted right behind it)."""

    def __init__(self, client: PoolClient, conn: ServerConnection) -> None:
        self.client = client
        self.arena = client.arena()
        self.arena.reset()
        self.hasher: Hasher = client.hasher
        ep = conn.endpoint
        #: the endpoint moves bytes without this thread (shm's Mover)
        self.asynchronous = ep is not None and ep.asynchronous
        #: the bytes of posted WRITEs move while this thread awaits a control reply (shm's Mover, tcp's sender
        #: thread): a large put may reserve and commit in several round trips while blocks move
        self.pipelines = ep is not None and ep.sends_in_background
        #: post each payload (with its trailer) first, hash it while it moves, then post its header: here, right
        #: behind it (no thread hand-off; `inline`), or, where the process has spare cores, on the `Hasher`'s
        #: workers, several blocks at once, the header posted as each checksum lands (`offload`: this thread
        #: alone could not hash as fast as the transport moves). With transport digests off, workers hash first.
        two_part = self.asynchronous and client.config.transport_digests
        self.offload = two_part and self.hasher.threads > 0 and spare_cores()
        self.inline = two_part and not self.offload
        #: payloads under `THREAD_MIN` written whole are hashed by the workers, `SMALL_HASH_BYTES` per hand-off,
        #: where the process has spare cores (on two, this thread hashing each just before its block was cheaper)
        self.small_offload = self.hasher.threads > 0 and self.hasher.native and spare_cores()
        self.fused = (client.config.transport_digests and ep is not None and Opcode.WRITE in ep.digests
                      and not two_part)
        self.hashing: dict[int, PendingChecksum] = {}  # offload: block n's checksum, on a worker; its header not posted
        self.lead: int | None = None  # tcp: the block sent payload first (`LEAD_MIN`), its checksum on a worker
        self.items: list[tuple] = []  # (key, grant, source)
        self.ok: list[bool] = []
        self.good: list[int] = []  # requests of block n completed successfully
        self.need: list[int] = []  # requests block n takes
        self.ready: list[tuple[int, bytes | None]] = []  # payloads landed: (n, digest) whose header is due
        self.late: dict[int, tuple] = {}  # n -> (head, payload view) for the second request
        self.written: list[int] = []  # blocks complete since the last take_written
        self.pending: list[WorkRequest] = []  # payload+trailer WRITEs not yet posted
        self.whole: list[WorkRequest] = []  # whole-block WRITEs (checksum known) not yet posted
        self.whole_bytes = 0
        self.pending_bytes = 0
        self.flying_bytes = 0  # payload bytes of blocks posted and not complete
        self.unlanded = 0  # payload bytes of two-part blocks posted whose payload has not landed yet
        #: called while `add` waits for room (see `_room`): the caller commits what is written meanwhile
        self.idle: Callable[[], None] | None = None
        self._sizes: list[int] = []
        self.batch = _Batch(client, conn, self._done)

    def _done(self, wr_id: int, success: bool, digest: bytes | None) -> None:
        n, part = divmod(wr_id, 4)
        if part & 1:  # the payload (1: its header follows its digest; 3: its header is already posted)
            self.unlanded -= self._sizes[n]
        if success:
            self.good[n] += 1
            if part == 1:
                self.ready.append((n, digest))
            if self.good[n] == self.need[n]:
                self.ok[n] = True
                self.written.append(n)
                self.flying_bytes -= self._sizes[n]
        elif self.need[n]:  # failed: no longer in flight, never written
            self.need[n] = 0
            self.flying_bytes -= self._sizes[n]

    def add(self, items: list) -> None:
        """Post the WRITEs of more blocks: items are (key, reservation, source); block numbers continue from the
        blocks added before (the n-th item added overall is block n)."""
        base = len(self.items)
        self.items.extend(items)
        hosts = [_host_view(src) for _, _, src in items]
        split = [(self.fused or self.inline or self.offload) and h is not None and len(h) >= SPLIT_MIN
                 for h in hosts]
        if (not base and items and not self.asynchronous and not split[0] and self.hasher.threads > 0
                and hosts[0] is not None and len(hosts[0]) >= LEAD_MIN):
            split[0] = True
            self.lead = 0
        # large checksums the transport will not compute run on workers, ahead of the blocks being built: the
        # first few at once, the rest once the first block is posted (submitting a whole call's first delayed
        # the first post by ~5 ms at 256 blocks; submitting one per block built instead, a window ahead, measured
        # 41-45% tcp put overhead against 23-36% on two cores: each submission then waits for the GIL). Small
        # ones are hashed here just before their block is built (`Hasher.submit_large` gives None for them).
        sums: list = [None] * len(items)
        whole = [k for k in range(len(items)) if hosts[k] is not None and not split[k]]
        for k in whole[:FIRST_HASHES]:
            sums[k] = self.hasher.submit_large(hosts[k])
        rest = whole[FIRST_HASHES:]
        small = [k for k in whole if len(hosts[k]) < THREAD_MIN] if self.small_offload else []
        if small:  # the first hand-off now, the rest once the first group is on its way
            small = self._submit_small(hosts, small, sums, first_only=True)
        self.ok.extend([False] * len(items))
        self.good.extend([0] * len(items))
        self.need.extend([2 if sp else 1 for sp in split])
        self._sizes.extend(_length(src) for _, _, src in items)
        client, arena, batch = self.client, self.arena, self.batch
        for k, (key, grant, src) in enumerate(items):
            n = base + k
            self.flying_bytes += self._sizes[n]
            if split[k]:
                eager = self.inline or self.offload or n == self.lead
                wr = _payload_request(client, n, arena, key, grant, src, self.late, eager)
                if wr is None:  # arena full: let what is staged land, then start over
                    self._drain_all()
                    arena.reset()
                    wr = _payload_request(client, n, arena, key, grant, src, self.late, eager)
                self.pending.append(wr)
                self.pending_bytes += len(hosts[k])
                if n == self.lead:
                    self._post_pending()  # moving now; its header goes out when the worker has its checksum
                    continue
                if self.asynchronous and self.pending_bytes >= WRITE_STREAM_BYTES:  # move while we build more
                    if not self.inline:
                        self._room()
                    self._post_pending()
                    if self.ready:
                        self._post_ready()
                continue
            if self.hashing:
                self._post_hashed()  # the lead block's header, once its checksum is in
            if small and small[0] == k:  # no group posted yet (the arena filled first): hand over the rest now
                small = self._submit_small(hosts, small, sums)
            pending_sum = sums[k]
            if pending_sum is None and hosts[k] is not None:
                checksum = block.payload_checksum(hosts[k])  # small: cheaper here than a hand-off
            elif pending_sum is not None and len(hosts[k]) < THREAD_MIN:  # a worker has it, or this thread hashes
                try:  # it now (`Hasher.result`): too short a wait to drive the transport in
                    checksum = self.hasher.result(pending_sum, batch.remaining())
                except TimeoutError:
                    raise batch.timed_out() from None
            else:
                if pending_sum is not None and not pending_sum.done():
                    self._post_whole()  # what is built moves while this checksum finishes
                    while not pending_sum.done() and batch.in_flight:
                        batch.drive(DRIVE_S)  # earlier blocks keep moving (tcp moves bytes only in our calls)
                try:
                    checksum = None if pending_sum is None else self.hasher.result(pending_sum, batch.remaining())
                except TimeoutError:
                    raise batch.timed_out() from None
            wr = _write_request(client, 4 * n, arena, key, grant, src, checksum)
            if wr is None:
                self._drain_all()
                arena.reset()
                wr = _write_request(client, 4 * n, arena, key, grant, src, checksum)
            self.whole.append(wr)
            self.whole_bytes += self._sizes[n]
            if self.whole_bytes >= GROUP_BYTES:  # right away: its transfer overlaps the next checksums
                self._post_whole()
            if (rest or small) and not self.whole:  # the first group is on its way: start every other checksum
                for j in rest:
                    sums[j] = self.hasher.submit_large(hosts[j])
                rest = []
                small = self._submit_small(hosts, small, sums)
        self._post_whole()
        self._post_pending()
        if self.ready:
            self._post_ready()

    def _submit_small(self, hosts: list, small: list[int], sums: list, first_only: bool = False) -> list[int]:
        """Hand the small payloads of blocks `small` to the workers, `SMALL_HASH_BYTES` at a time (only the first
        hand-off with `first_only`); returns the blocks not handed over."""
        chunk: list[int] = []
        size = 0
        for i, k in enumerate(small):
            chunk.append(k)
            size += len(hosts[k])
            if size >= SMALL_HASH_BYTES or i == len(small) - 1:
                for j, pending in zip(chunk, self.hasher.submit_many([hosts[j] for j in chunk]), strict=True):
                    sums[j] = pending
                if first_only:
                    return small[i + 1 :]
                chunk, size = [], 0
        return []

    def _post_whole(self) -> None:
        """Post the whole-block WRITEs built so far, in one post (one pass of the transport's send loop)."""
        if self.whole:
            self.batch.post_many(self.whole)
            self.whole.clear()
            self.whole_bytes = 0

    def _room(self) -> None:
        """Two-part blocks: keep at most `WINDOW_BYTES` of payloads queued on the transport. Each header is
        posted when its payload lands and queues behind what is already posted; a short queue lets blocks
        complete (and be committed, by `idle`) while later ones move, instead of all at the end."""
        while self.unlanded >= WINDOW_BYTES:
            if self.idle is not None:
                self.idle()
                if self.unlanded < WINDOW_BYTES:
                    return
            self.wait_some()

    def _post_pending(self) -> None:
        """Post the payload WRITEs built so far; with `inline`, then hash each payload (here, while the transport
        moves it) and post the headers right behind them."""
        self.unlanded += sum(self._sizes[wr.wr_id // 4] for wr in self.pending)
        self.batch.post_many(self.pending)
        eager = [wr.wr_id // 4 for wr in self.pending if wr.wr_id % 4 == 3]
        self.pending.clear()
        self.pending_bytes = 0
        if self.offload or self.lead in eager:
            offloaded, eager = eager, []
        else:
            offloaded = []
        for n in offloaded:
            self.hashing[n] = self.hasher.submit(self.late[n][1])
        if offloaded:
            self._post_hashed()
        if eager:
            wrs = []
            for n in eager:
                key, grant, _src = self.items[n]
                head, view = self.late.pop(n)
                block.write_header_trailer(head[1], None, key, grant.generation, len(view),
                                           block.payload_checksum(view))
                wrs.append(WorkRequest(4 * n + 2, Opcode.WRITE, (head[0],), grant.addr, grant.rkey))
            self.batch.post_many(wrs)

    def _post_hashed(self, wait: bool = False) -> None:
        """offload: post the headers of the blocks whose checksums the workers finished (all of them, waiting
        within the batch's deadline, with `wait`), in one post."""
        wrs = []
        for n, pending in list(self.hashing.items()):
            if not wait and not pending.done():
                continue
            while not self.asynchronous and not pending.done() and self.batch.in_flight:
                self.batch.drive(DRIVE_S)  # tcp moves bytes only in this thread's calls: keep them moving
            try:
                checksum = self.hasher.result(pending, self.batch.remaining())
            except TimeoutError:
                raise self.batch.timed_out() from None
            del self.hashing[n]
            key, grant, _src = self.items[n]
            head, view = self.late.pop(n)
            block.write_header_trailer(head[1], None, key, grant.generation, len(view), checksum)
            wrs.append(WorkRequest(4 * n + 2, Opcode.WRITE, (head[0],), grant.addr, grant.rkey))
        self.batch.post_many(wrs)

    def _post_ready(self) -> None:
        """The headers of the blocks whose payload and trailer landed, in one post."""
        wrs = []
        for n, digest in self.ready:
            key, grant, _src = self.items[n]
            head, view = self.late.pop(n)
            checksum = digest if digest is not None else block.payload_checksum(view)
            block.write_header_trailer(head[1], None, key, grant.generation, len(view), checksum)
            wrs.append(WorkRequest(4 * n + 2, Opcode.WRITE, (head[0],), grant.addr, grant.rkey))
        self.ready.clear()
        self.batch.post_many(wrs)

    def _drain_all(self) -> None:
        self._post_whole()
        while True:
            self._post_pending()
            self._post_hashed(wait=True)
            self._post_ready()
            self.batch.drain()
            if not self.ready:
                return

    def take_written(self) -> list[int]:
        """Blocks written completely since the last call (their commit may go out now)."""
        self.batch.poll()
        if self.ready:
            self._post_ready()
        if self.hashing:
            self._post_hashed()
        out, self.written = self.written, []
        return out

    def wait_some(self) -> None:
        """Block until at least one more request completes (within the batch's deadline)."""
        if self.hashing:
            self._post_hashed()
        self.batch.wait_one()
        if self.ready:
            self._post_ready()
        if self.hashing:
            self._post_hashed()

    @property
    def busy(self) -> bool:
        return self.batch.in_flight > 0

    def finish(self) -> list[bool]:
        """Wait for every block; returns which were written completely (all blocks added)."""
        self._drain_all()
        self.arena.reset()
        return self.ok


def _length(src) -> int:
    return src.length if isinstance(src, RegionSlice) else len(src)


def _payload_request(client: PoolClient, n: int, arena: Arena, key: bytes, grant, src,
                     late: dict, eager: bool = False) -> WorkRequest | None:
    """Block n's WRITE of payload and trailer (no checksum in it); the header's arena slot is kept in `late`
    for the second request. The digest of the payload is requested, unless `eager` (the caller hashes it
    while it moves and posts the header right behind it: wr_id part 3 instead of 1)."""
    ends = arena.take_pair(block.HEADER_SIZE, block.TRAILER_SIZE)
    if ends is None:
        return None
    head, tail = ends[:2], ends[2:]
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
    block.write_header_trailer(None, tail[1], key, grant.generation, len(view), block.PENDING_CHECKSUM)
    late[n] = (head, view)
    if eager:
        return WorkRequest(4 * n + 3, Opcode.WRITE, (sge, tail[0]), grant.addr + block.HEADER_SIZE, grant.rkey)
    return WorkRequest(4 * n + 1, Opcode.WRITE, (sge, tail[0]), grant.addr + block.HEADER_SIZE, grant.rkey,
                       digest=0)


def _host_view(src) -> memoryview | None:
    return src.view() if isinstance(src, RegionSlice) else src


def _write_request(client: PoolClient, n: int, arena: Arena, key: bytes, grant, src,
                   checksum: bytes | None) -> WorkRequest | None:
    length = src.length if isinstance(src, RegionSlice) else len(src)
    ends = arena.take_pair(block.HEADER_SIZE, block.TRAILER_SIZE)
    if ends is None:
        return None
    head, tail = ends[:2], ends[2:]
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
    block.write_header_trailer(head[1], tail[1], key, grant.generation, length, checksum)
    sgl = (head[0], payload_sge, tail[0]) if length else (head[0], tail[0])
    return WorkRequest(n, Opcode.WRITE, sgl, grant.addr, grant.rkey)


def read_blocks(client: PoolClient, conn: ServerConnection, refs: list[BlockRef], targets: list,
                idx: list[int], out: list[int | None], landed: Callable[[int, int], None] | None = None) -> None:
    """One READ per block; each validated as it completes; `out[idx[n]]` = payload length for good blocks, and
    `landed(idx[n], length)` called as each is accepted (while later blocks still move).
    Runs once per block of every get: kept lean (a 1 MiB get of 256 blocks spent ~6 ms of a ~70 ms call in
    this function on a 16-core Xeon host before; docs/decisions.md)."""
    arena = client.arena()
    arena.reset()
    verify = client.config.verify_checksum
    count = client.counters.add
    check = block.check_ends
    # per block: (header view, payload view or None, trailer view, target, copy), cleared once completed
    staged: list[tuple | None] = [None] * len(refs)
    read_bytes = 0

    def accept(n: int, payload, target, copy: bool) -> None:
        nonlocal read_bytes
        length = refs[n].hit.length
        if copy:
            target[:length] = payload
        out[idx[n]] = length
        read_bytes += length
        if landed is not None:
            landed(idx[n], length)

    def done(n: int, success: bool, digest: bytes | None) -> None:
        nonlocal small_bytes
        head, payload, tail, target, copy = staged[n]
        staged[n] = None
        if not success:
            return
        ref = refs[n]
        hit = ref.hit
        want = check(head, tail, ref.key, hit.generation, hit.length)  # the checksum, None if written without, or False
        if want is False or (verify and want is None and payload is not None):
            count("corrupt_blocks")  # header or trailer wrong, or no checksum where the reader needs one
            return
        if not verify or payload is None:  # no checksum of what landed (device memory, or verify off): the lease,
            if client.clock() >= ref.lease_until:  # still running now the READ completed, says the server
                count("lease_expired")  # did not reuse the slot while it was read; otherwise it may have
                return
            accept(n, payload, target, copy)
            return
        if digest is None and threaded:  # spare cores: a worker hashes while this thread receives
            if len(payload) >= THREAD_MIN:
                hashing.append((client.hasher.submit(payload), want, n, payload, target, copy))
                collect(False)
            else:  # small: handed over several at a time
                small.append((want, n, payload, target, copy))
                small_bytes += len(payload)
                if small_bytes >= SMALL_HASH_BYTES:
                    hand_small()
            return
        if digest is None:  # the transport did not hash what landed: hash it here, now, while the
            digest = block.payload_checksum(payload)  # bytes are in this thread's cache (see docs/decisions.md)
        if digest != want:
            count("corrupt_blocks")
        else:
            accept(n, payload, target, copy)

    def hand_small() -> None:
        nonlocal small_bytes
        pending = client.hasher.submit_many([item[2] for item in small])
        hashing.extend((p, *item) for p, item in zip(pending, small, strict=True))
        small.clear()
        small_bytes = 0
        collect(False)  # the batches handed over before this one are likely hashed by now

    def collect(wait: bool) -> None:
        """Check the blocks whose checksums the workers finished, in hand-off order: while others still move
        (`wait` False: up to the first not finished; checking them all after the last one landed cost 64 KiB
        gets on the H200 host 3-4 points of bandwidth), or all of them, waiting (before the arena is reused,
        and at the end)."""
        nonlocal collected
        while collected < len(hashing):
            fut, want, n, payload, target, copy = hashing[collected]
            if not wait and not (isinstance(fut, bytes) or fut.done()):
                return
            try:
                got = client.hasher.result(fut, batch.remaining())
            except TimeoutError:
                raise batch.timed_out() from None
            hashing[collected] = None  # lets go of the payload and, once all of its blocks are, of the batch
            collected += 1
            if got == want:
                accept(n, payload, target, copy)
            else:
                count("corrupt_blocks")

    def settle() -> None:
        nonlocal collected
        if small:
            hand_small()
        collect(True)
        hashing.clear()
        collected = 0

    hashing: list[tuple | None] = []  # (future, wanted checksum, n, payload, target, copy); None once checked
    collected = 0  # hashing[:collected] are checked
    small: list[tuple] = []  # (wanted checksum, n, payload, target, copy): landed, not yet handed to the workers
    small_bytes = 0
    threaded = client.hasher.threads > 0 and spare_cores()
    batch = _Batch(client, conn, done)
    # an endpoint that digests READs needs no hashing to overlap: its requests go in groups, the first moving while
    # the rest are built
    # shm's READ digests come from a waiting thread hashing right behind the Mover's copy: on two CPUs (sibling
    # threads of one core here) that is nearly free, but with spare cores the client's workers hashing each
    # landed block measured faster (the trailing reads pull every line across cores; docs/decisions.md)
    offered = client.config.transport_digests and Opcode.READ in batch.endpoint.digests
    together = offered and not (threaded and batch.endpoint.asynchronous)
    asynchronous = batch.endpoint.asynchronous
    grouped = together or asynchronous  # in groups: one Mover job per group, not per block
    # ... except a large last block: hashed after it landed, it is the one hash nothing overlaps (a 32 MiB block's
    # took ~4 ms of a ~45 ms get); with the transport's digest it is hashed while it moves
    last = len(refs) - 1
    last_digest = offered and not together and bool(refs) and refs[-1].hit.length >= TAIL_DIGEST_MIN
    digest_all = together and verify
    pending: list[WorkRequest] = []
    pending_bytes = 0
    epoch = int(conn.hello.get("epoch", -1))
    find = client.registry.find
    for n, ref in enumerate(refs):
        if ref.epoch != epoch:
            count("stale_refs")  # the server restarted since the lookup
            continue
        hit = ref.hit
        length = hit.length
        target = targets[n]
        pieces = _read_pieces(arena, find, length, target)
        if pieces is None:  # arena full: finish what is in flight, then reuse the arena
            batch.post_many(pending)
            pending.clear()
            batch.drain()
            settle()
            arena.reset()
            pieces = _read_pieces(arena, find, length, target)
        head_sge, head, payload_sge, payload, tail_sge, tail, copy = pieces
        staged[n] = (head, payload, tail, target, copy)
        digest = (1 if (digest_all or (last_digest and verify and n == last)) and length and payload is not None
                  else None)  # the payload SGE
        wr = WorkRequest(n, Opcode.READ, (head_sge, payload_sge, tail_sge) if length else (head_sge, tail_sge),
                         hit.addr, hit.rkey, digest=digest)
        if grouped:
            pending.append(wr)
            pending_bytes += length
            if pending_bytes >= STREAM_BYTES:  # moving (tcp: the server sending) while the rest is built
                batch.post_many(pending)
                pending.clear()
                pending_bytes = 0
        else:
            batch.post(wr)
    batch.post_many(pending)
    # the transport digests and moves bytes only inside wait (tcp): one wait for the whole batch. shm's waiters
    # hash trailing its Mover per completion; a bulk wait there measured slower (1 MiB get 10-11% vs 1%)
    try:
        batch.drain(bulk=together and not asynchronous)
        settle()
    finally:
        if read_bytes:
            count("bytes_read", read_bytes)


def spare_cores() -> bool:
    """Whether this process may run on more than two CPUs. With two, a tcp read's receiving thread and the
    peer's engine use both, and hashing each block inline right after it lands (in cache) was faster than
    worker threads; with more, workers hash while the caller keeps receiving (docs/decisions.md)."""
    try:
        return len(os.sched_getaffinity(0)) > 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) > 2


def _read_pieces(arena: Arena, find: Callable, length: int, target):
    """(header Sge, header view, payload Sge, payload view or None, trailer Sge, trailer view, copy) for one
    READ, header and trailer from one arena piece; None when the arena is full."""
    ends = arena.take_pair(block.HEADER_SIZE, block.TRAILER_SIZE)
    if ends is None:
        return None
    if isinstance(target, RegionSlice):
        view = target.view()
        return (*ends[:2], target.region.sge(target.offset, length), None if view is None else view[:length],
                *ends[2:], False)
    if len(target) != length:
        target = target[:length]
    direct = find(target)
    if direct is not None:
        return (*ends[:2], direct, target, *ends[2:], False)
    staged = arena.take(length)
    if staged is None:
        return None
    return (*ends[:2], staged[0], staged[1], *ends[2:], True)
