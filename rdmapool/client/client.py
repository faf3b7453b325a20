"""The pool client: batched put / lookup_prefix / get / delete over a set of memory servers.

Theory of operation
-------------------
Keys are routed to servers (`routing`); each server gets one control round trip per call for all its keys.
Bytes move only by one-sided operations on the transport:

- put: `allocate` reserves slots -> one WRITE per block (header, payload, trailer as a 3-piece gather list, so a
  registered payload is never copied) -> `commit` the blocks whose WRITE completed, `abort` the others.
- lookup_prefix: `lookup` with prefix semantics on each server's part of the chain; the chain's prefix ends at
  the first miss on any server. Each hit comes back with a read lease.
- get / read: one READ per block of header + payload + trailer (a 3-piece scatter list), then `block.validate`
  against the lookup reply: key, generation at both ends, length, self-checks and (for host memory) the payload
  checksum. A block that fails is a miss and a `corrupt_blocks` count, never data.

A server that is down, slow or misbehaving costs misses: `ServerUnavailable` and transport errors are caught
here, counted, and the server is skipped until its retry pause ends. Caller mistakes raise `UsageError`.
The client is thread-safe by one lock (calls are serialised).
"""

from __future__ import annotations

import enum
import functools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from rdmapool import block
from rdmapool.client import tensors
from rdmapool.client.buffers import Arena, RegionSlice, Registry
from rdmapool.client.connection import ServerConnection
from rdmapool.client.datapath import BlockWriter, read_blocks
from rdmapool.client.hashing import Hasher
from rdmapool.client.protocol import (
    Hit,
    Reservation,
    all_hits,
    check_hits,
    commit_fields,
    leading_hits,
    parse_grants,
    parse_results,
    unpack_hits,
)
from rdmapool.client.routing import RendezvousRouter, Router
from rdmapool.client.stats import ClientCounters
from rdmapool.config import ClientConfig, ServerAddress
from rdmapool.errors import (
    AuthError,
    ProtocolError,
    ServerUnavailable,
    TransportError,
    UsageError,
)
from rdmapool.server import wire
from rdmapool.server.core import AllocStatus
from rdmapool.server.slots import BlockHint
from rdmapool.server.wire import HIT
from rdmapool.transport import BACKENDS
from rdmapool.transport.base import Access, MemoryKind, MemoryRegion, Transport

#: errors that make a server's keys misses instead of failing the caller
_DEGRADE = (ServerUnavailable, TransportError, ProtocolError, AuthError)
#: a lease is trusted until this fraction of it has passed on the client's clock
LEASE_MARGIN = 0.8
DEFAULT_MAX_KEYS = 4096
#: a put of at least twice this many bytes (to one server) is pipelined: the first blocks up to this size are
#: reserved alone, and blocks are committed early while at least this many bytes are still moving
PIPELINE_BYTES = 4 << 20
#: while a large put still moves, written blocks are committed in round trips of at least this many bytes
COMMIT_BYTES = 16 << 20
#: each reservation round trip of a pipelined put covers this many times the bytes of the one before
CHUNK_GROWTH = 4
#: a put of CUDA tensors through staging records an event after about this many bytes of device copies (its first
#: blocks wait only for their own copies; see `PoolClient._stage_sources`)
COPY_EVENT_BYTES = 4 << 20


class PutStatus(enum.Enum):
    STORED = "stored"
    EXISTS = "exists"  # already resident, or another writer is storing it
    FULL = "full"
    TOO_BIG = "too_big"
    FAILED = "failed"  # the write or the commit did not go through
    UNAVAILABLE = "unavailable"


_FROM_ALLOC = {AllocStatus.EXISTS: PutStatus.EXISTS, AllocStatus.FULL: PutStatus.FULL,
               AllocStatus.TOO_BIG: PutStatus.TOO_BIG, AllocStatus.REFUSED: PutStatus.UNAVAILABLE}


class BlockRef(NamedTuple):
    """A leased hit from a lookup, readable with `PoolClient.read` until `lease_until` (client clock).
    A NamedTuple because a lookup builds one per hit (see docs/decisions.md)."""

    key: bytes
    server: ServerAddress
    epoch: int
    hit: Hit
    lease_until: float

    @property
    def length(self) -> int:
        return self.hit[3]


_new_ref = functools.partial(tuple.__new__, BlockRef)


class PackedRefs(Sequence):
    """One server's lookup reply for `keys`, kept packed as it arrived (`wire.HIT` records): a read-only
    sequence of `BlockRef` (None for a miss, or past the hits a prefix lookup returned) whose refs are built
    on first use, all at once in C loops, and kept. A lookup that only counts its hits builds none (512 Hits and
    BlockRefs cost ~0.15 ms of client CPU; see docs/decisions.md)."""

    __slots__ = ("_keys", "_server", "_epoch", "_raw", "_until", "_n", "_refs")

    def __init__(self, keys: Sequence[bytes], server: ServerAddress, epoch: int, raw: bytes, until: float,
                 n: int) -> None:
        self._keys, self._server, self._epoch, self._raw, self._until = keys, server, epoch, raw, until
        self._n = n  # entries: len(keys), or fewer for a prefix
        self._refs: list[BlockRef | None] | None = None

    def leading_hits(self) -> int:
        """Entries before the first miss, without building any ref."""
        return min(self._n, leading_hits(self._raw))

    def _built(self) -> list[BlockRef | None]:
        refs = self._refs
        if refs is None:
            hits = unpack_hits(self._raw)[: self._n]
            refs = list(map(_new_ref, zip(self._keys, repeat(self._server), repeat(self._epoch), hits,
                                          repeat(self._until))))
            if not all_hits(hits):
                refs = [r if r[3][2] else None for r in refs]
            refs += [None] * (self._n - len(refs))
            self._refs = refs
        return refs

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if start == 0 and step == 1 and self._refs is None:
                return PackedRefs(self._keys, self._server, self._epoch, self._raw, self._until, stop)
            return tuple(self._built()[i])
        return self._built()[i]

    def __iter__(self) -> Iterator[BlockRef | None]:
        return iter(self._built())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedRefs | tuple):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PackedRefs({list(self)!r})"


@dataclass(frozen=True, slots=True)
class LookupResult:
    refs: Sequence[BlockRef]  # a tuple or a PackedRefs (refs built on first use)

    def __len__(self) -> int:
        return len(self.refs)


Buffer = Any  # a buffer-protocol object, a torch tensor (host or CUDA) or a RegionSlice
_PLAIN_BUFFERS = frozenset((memoryview, bytes, bytearray, np.ndarray))


class _OnDevice(NamedTuple):
    """A CUDA tensor outside GPU memory registered with the client: it moves through `DeviceStaging`."""

    tensor: Any
    nbytes: int


class PoolClient:
    def __init__(self, servers: Sequence[ServerAddress | str] | Router, config: ClientConfig,
                 transport: Transport | None = None, transport_name: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(servers, str):
            raise UsageError(f"servers must be a list of HOST:PORT addresses, got one str: write [{servers!r}]")
        if transport is None and transport_name is not None and transport_name not in BACKENDS:
            raise UsageError(f"unknown transport {transport_name!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(servers, Sequence):
            servers = RendezvousRouter([s if isinstance(s, ServerAddress) else ServerAddress.parse(s) for s in servers])
        self.router: Router = servers
        self.config = config
        self.clock = clock
        self.counters = ClientCounters()
        self._transport = transport
        self._own_transport = transport is None
        # the servers' transport name; an injected transport (e.g. a fault-injecting wrapper) may be named otherwise
        self._transport_name = transport_name or (transport.name if transport is not None else "tcp")
        self._conns: dict[ServerAddress, ServerConnection] = {}
        self._arena: Arena | None = None
        self._registry = Registry()
        self._devices = tensors.DeviceRegions()  # GPU memory registered through `register`
        self._staging: tensors.DeviceStaging | None = None  # made when the first unregistered CUDA tensor comes
        self.hasher = Hasher(config.hash_threads)
        self._lock = threading.RLock()
        self._closed = False

    # ---- memory -----------------------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            from rdmapool import transport as transports

            self._transport = transports.create(self._transport_name)
        return self._transport

    def register(self, buffer: Any) -> MemoryRegion:
        """Register memory so puts from it and gets into it are zero-copy: a host buffer or tensor, or a CUDA
        tensor where the transport can register GPU memory (shm, verbs with GPUDirect; tcp cannot, and says so).
        Tensors inside it (views, slices) then move in place."""
        with self._lock:
            if self._closed:
                raise UsageError("this PoolClient is closed: make a new one")
            if tensors.is_tensor(buffer):
                tensors.check_dense(buffer, "the tensor to register")
                if buffer.device.type == "cuda":
                    ptr, length = buffer.data_ptr(), tensors.nbytes(buffer)
                    region = self.transport.register_pointer(ptr, length, MemoryKind.CUDA, Access.ALL, owner=buffer)
                    self._devices.add(ptr, length, region)
                    self._registry.regions.append(region)  # deregistered on close (`Registry.find` skips it)
                    return region
                buffer = tensors.host_bytes(buffer, "the tensor to register")
            elif _holds_objects(buffer):
                raise UsageError(_OBJECTS.format("the buffer to register"))
            region = self.transport.register(buffer, Access.ALL)
            self._registry.regions.append(region)
            return region

    def _device_staging(self) -> tensors.DeviceStaging:
        if self._staging is None:
            self._staging = tensors.DeviceStaging(self.register, self._drop_region, self.config.device_staging_bytes)
        return self._staging

    def _drop_region(self, region: MemoryRegion) -> None:
        self._registry.regions.remove(region)
        self.transport.deregister(region)

    def _item(self, buf: Buffer, i: int, call: str):
        """Buffer i of a put (a source) or get (a target) as the data path takes it: a byte view, a RegionSlice,
        or an `_OnDevice` CUDA tensor to stage."""
        if type(buf) not in _PLAIN_BUFFERS:  # (runs once per block: the common types skip the checks below)
            if isinstance(buf, RegionSlice):
                return buf
            if tensors.is_tensor(buf):
                return self._tensor_item(buf, i, call)
        try:
            view = memoryview(buf)
        except TypeError:
            what = "buffers (bytes, bytearray, numpy arrays" if call == "put" else "writable buffers (bytearray, numpy arrays"
            raise UsageError(f"{call} needs {what}, torch tensors, RegionSlices); buffer {i} is a "
                             f"{type(buf).__name__}") from None
        if not view.c_contiguous:
            raise UsageError(f"buffer {i} is not C-contiguous: a block is one contiguous run of bytes")
        if "O" in view.format:
            raise UsageError(_OBJECTS.format(f"buffer {i}"))
        if call == "get" and view.readonly:
            raise UsageError(f"get needs writable buffers; buffer {i} is read-only")
        return view.cast("B")

    def _tensor_item(self, t: Any, i: int, call: str):
        tensors.check_dense(t, f"buffer {i}")
        if t.device.type == "cpu":
            return tensors.host_bytes(t, f"buffer {i}")
        # a put stages even registered device memory: in place, its block would carry no checksum, and readers into
        # host memory (verify_checksum on) would count it corrupt
        found = self._devices.find(t) if call == "get" else None
        return found if found is not None else _OnDevice(t, tensors.nbytes(t))

    def arena(self) -> Arena:
        """The registered staging arena (made on first use)."""
        if self._arena is None:
            self._arena = Arena(self.transport, self.config.staging_bytes)
        return self._arena

    @property
    def registry(self) -> Registry:
        """Regions registered through `register`: buffers inside them move without a copy."""
        return self._registry

    def _transport_for(self, name: str) -> Transport:
        if name != self._transport_name:
            raise ProtocolError(f"server speaks transport {name!r}, this client {self._transport_name!r}")
        return self.transport

    def _conn(self, addr: ServerAddress) -> ServerConnection:
        conn = self._conns.get(addr)
        if conn is None:
            if self._closed:  # (a closed client has no connections: every call after close comes here)
                raise UsageError("this PoolClient is closed: make a new one")
            conn = self._conns[addr] = ServerConnection(addr, self.config, self._transport_for, self.clock)
        return conn

    def _groups(self, keys: Sequence[bytes]) -> dict[ServerAddress, list[int]]:
        servers = self.router.servers
        if len(servers) == 1:
            return {servers[0]: list(range(len(keys)))}
        groups: dict[ServerAddress, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[servers[self.router.route(key)]].append(i)
        return groups

    def _batches(self, keys: Sequence[bytes]) -> Iterator[tuple[ServerConnection, list[int]]]:
        """(connection, key indices) per server, in chunks of at most the server's `max_keys`. A server that
        cannot be reached is counted and skipped (its keys stay misses)."""
        for addr, idx in self._groups(keys).items():
            conn = self._conn(addr)
            try:
                conn.ensure()
            except _DEGRADE as exc:
                self._degraded(conn, exc)
                continue
            step = max(1, int(conn.hello.get("max_keys", DEFAULT_MAX_KEYS)))
            for start in range(0, len(idx), step):
                yield conn, idx[start : start + step]

    def _degraded(self, conn: ServerConnection, exc: Exception) -> None:
        self.counters.add("unavailable" if isinstance(exc, ServerUnavailable) else f"error_{type(exc).__name__}")
        if not isinstance(exc, ServerUnavailable):
            conn.close(mark_down=True)

    # ---- put --------------------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], buffers: Sequence[Buffer],
            hints: Sequence[BlockHint] | None = None) -> list[PutStatus]:
        """Store blocks. `hints` (optional, one per key) tell the servers' eviction policy each block's parent
        key, depth and token count."""
        keys = block.check_keys(keys)
        if len(keys) != len(buffers) or (hints is not None and len(hints) != len(keys)):
            raise UsageError(f"put got {len(keys)} keys, {len(buffers)} buffers"
                             + (f" and {len(hints)} hints" if hints is not None else ""))
        wire_hints = None if hints is None else [_hint_to_wire(h) for h in hints]
        sources = [self._item(b, i, "put") for i, b in enumerate(buffers)]
        out = [PutStatus.UNAVAILABLE] * len(keys)
        with self._lock:
            staged = {i: s.nbytes for i, s in enumerate(sources) if type(s) is _OnDevice}
            if not staged:
                self._put_all(keys, sources, wire_hints, out)
            else:  # CUDA tensors copied to pinned staging first, in rounds that fit it
                staging = self._device_staging()
                for part in tensors.groups(staged, len(keys), staging.cap):
                    gate = self._stage_sources(staging, sources, part)
                    statuses = [PutStatus.UNAVAILABLE] * len(part)
                    try:
                        self._put_all([keys[i] for i in part], [sources[i] for i in part],
                                      None if wire_hints is None else [wire_hints[i] for i in part], statuses, gate)
                    finally:
                        gate(range(len(part)))  # no copy still lands in staging the next call reuses
                    for i, status in zip(part, statuses, strict=True):
                        out[i] = status
                    staging.trim()
            for status, n in Counter(out).items():
                self.counters.add(f"put_{status.value}", n)
        return out

    def _put_all(self, keys: list[bytes], sources: list, wire_hints: list | None, out: list[PutStatus],
                 ready: Callable[[Sequence[int]], None] | None = None) -> None:
        for conn, idx in self._batches(keys):
            try:
                hint_part = None if wire_hints is None else [wire_hints[i] for i in idx]
                self._put_one_server(conn, [keys[i] for i in idx], [sources[i] for i in idx], idx, out, hint_part,
                                     ready)
            except _DEGRADE as exc:
                self._degraded(conn, exc)

    @staticmethod
    def _stage_sources(staging: tensors.DeviceStaging, sources: list,
                       part: list[int]) -> Callable[[Sequence[int]], None]:
        """Queue copies of the CUDA tensors among `sources[part]` into pinned staging and put byte views of the
        staged copies in their place. Returns the gate: `gate(positions)` (0..len(part)-1) returns once the copies
        of those positions landed. The put calls it before each reservation chunk's blocks are built, so its first
        blocks move while later ones still copy (H200 host, 256 MiB puts, two runs: 0.92-1.05 of a host put, against
        0.90-0.98 waiting for every copy first; docs/decisions.md)."""
        moved = [i for i in part if type(sources[i]) is _OnDevice]
        pieces = dict(zip(moved, staging.pieces([sources[i].nbytes for i in moved]), strict=True))
        event_of: list[Any] = [None] * len(part)  # the event recorded after position j's copy
        since: dict[Any, tuple[list[int], int]] = {}  # device -> (positions copied since its last event, bytes)
        for j, i in enumerate(part):
            if i not in pieces:
                continue
            tensor = sources[i].tensor
            pieces[i].copy_(tensors.byte_tensor(tensor), non_blocking=True)  # current stream: after its writers
            waiting, nbytes = since.pop(tensor.device, ([], 0))
            waiting.append(j)
            nbytes += sources[i].nbytes
            if nbytes >= COPY_EVENT_BYTES or j == len(part) - 1:
                _mark(event_of, waiting, tensor.device)
            else:
                since[tensor.device] = (waiting, nbytes)
        for device, (waiting, _) in since.items():
            _mark(event_of, waiting, device)
        for i, piece in pieces.items():
            sources[i] = memoryview(piece.numpy())

        def gate(positions: Sequence[int]) -> None:
            for event in {id(e): e for e in map(event_of.__getitem__, positions) if e is not None}.values():
                event.synchronize()

        return gate

    def _put_one_server(self, conn: ServerConnection, keys: list[bytes], sources: list, idx: list[int],
                        out: list[PutStatus], hints: list | None,
                        ready: Callable[[Sequence[int]], None] | None = None) -> None:
        """allocate -> WRITE -> commit for one server's keys, pipelined for large batches: the first blocks are
        reserved alone so their WRITEs start early, the rest are reserved while those move, and blocks written
        early are committed while later ones move (`PIPELINE_BYTES`). Only the first reservation and the last
        commit wait on a round trip with nothing moving."""
        lengths = [_length(s) for s in sources]
        writer = BlockWriter(self, conn)
        todo: list[int] = []  # key positions with a reservation, in the order the writer numbers them
        grants: dict[int, Reservation] = {}
        early: list[int] = []  # written, not yet committed
        sent: list[tuple[list[int], list[int]]] = []  # an early commit sent, its reply not read: (ids, positions)

        def settle() -> None:
            """Read the reply of the early commit sent last (it arrived while blocks moved, as a rule)."""
            for ids, commits in sent:
                self._committed(conn.receive(ids)[0], commits, lengths, idx, out)
            sent.clear()

        def commit_written(at_least: int) -> bool:
            """While blocks still move: commit the written ones once they hold `at_least` bytes, without waiting
            for the reply (a round trip measured 0.2-3 ms on a busy two-core VM, longer than the bytes still
            queued take to move); with a reservation reply still owed, in one round trip."""
            early.extend(todo[n] for n in writer.take_written())
            if sum(lengths[j] for j in early) < at_least:
                return False
            settle()
            if conn.owes:
                self._commit(conn, early, keys, grants, lengths, idx, out)
            else:
                sent.append((conn.send(self._commit_requests(early, keys, grants)), list(early)))
            early.clear()
            return True

        # pipelining needs an endpoint that moves bytes while this thread waits on a round trip (not tcp without
        # its sender thread, whose progress then runs in this thread: an extra round trip only adds its latency)
        pipelined = writer.pipelines and sum(lengths) >= 2 * PIPELINE_BYTES
        if pipelined:
            writer.idle = lambda: commit_written(COMMIT_BYTES)

        def reserve(a: int, b: int) -> list[tuple[str, dict]]:
            fields = {"keys": wire.pack_keys(keys[a:b]), "lengths": wire.pack_u64s(lengths[a:b])}
            if hints is not None:
                fields["hints"] = hints[a:b]
            return [("allocate", fields)]

        chunks = _allocation_chunks(lengths) if pipelined else [(0, len(keys))]
        first = conn.call_many(reserve(*chunks[0]))[0]  # (a call: reconnects once if the server closed it idle)
        try:
            self._write_chunks(conn, writer, chunks, reserve, first, keys, sources, lengths, idx, out, grants, todo,
                               ready)
            # commit early blocks while enough bytes are still moving to cover the round trip
            while pipelined and writer.busy and writer.flying_bytes >= PIPELINE_BYTES:
                if not commit_written(PIPELINE_BYTES):
                    writer.wait_some()
            written = writer.finish()
            settle()
        except BaseException:
            # a reply still owed goes with the connection: a reservation's expires; an early commit's blocks are
            # stored but reported unavailable (never the other way round)
            conn.abandon()
            raise
        last = early + [todo[n] for n in writer.take_written()]
        failed = [j for j, ok in zip(todo, written, strict=True) if not ok]
        self._commit(conn, last, keys, grants, lengths, idx, out, aborts=failed)

    def _write_chunks(self, conn: ServerConnection, writer: BlockWriter, chunks: list[tuple[int, int]],
                      reserve: Callable, reply: dict, keys: list[bytes], sources: list, lengths: list[int],
                      idx: list[int], out: list[PutStatus], grants: dict, todo: list[int],
                      ready: Callable[[Sequence[int]], None] | None = None) -> None:
        """Hand each chunk's reserved blocks to the writer (which posts them and returns while they move). The
        next chunk's reservation is sent before this chunk is written, so its round trip (~5-10 us a key on the
        server) runs while this chunk moves, not after it was posted."""
        owed: list[int] = []
        for i, (a, b) in enumerate(chunks):
            if i:
                reply = conn.receive(owed)[0]
            if i + 1 < len(chunks):
                owed = conn.send(reserve(*chunks[i + 1]))
            part = parse_grants(reply, b - a)
            chunk = []
            for j, grant in enumerate(part, a):
                if grant.status == AllocStatus.OK:
                    if grant.capacity < lengths[j]:
                        raise ProtocolError("server reserved a slot smaller than asked")
                    grants[j] = grant
                    chunk.append(j)
                else:
                    out[idx[j]] = _FROM_ALLOC.get(grant.status, PutStatus.FAILED)
            todo.extend(chunk)
            if ready is not None:  # staged device copies of these sources have landed
                ready([idx[j] for j in chunk])
            writer.add([(keys[j], grants[j], sources[j]) for j in chunk])

    def _commit(self, conn: ServerConnection, commits: list[int], keys: list[bytes], grants: dict, lengths: list[int],
                idx: list[int], out: list[PutStatus], aborts: Sequence[int] = ()) -> None:
        """Commit written blocks (and abort failed ones) in one round trip; sets their put status."""
        for j in aborts:
            out[idx[j]] = PutStatus.FAILED
        requests = self._commit_requests(commits, keys, grants) + (
            [("abort", _commit_fields(aborts, keys, grants))] if aborts else [])
        if not requests:
            return
        replies = conn.call_many(requests)
        if commits:
            self._committed(replies[0], commits, lengths, idx, out)

    @staticmethod
    def _commit_requests(commits: list[int], keys: list[bytes], grants: dict) -> list[tuple[str, dict]]:
        return [("commit", _commit_fields(commits, keys, grants))] if commits else []

    def _committed(self, reply: dict, commits: list[int], lengths: list[int], idx: list[int],
                   out: list[PutStatus]) -> None:
        """Put statuses from a commit reply."""
        written = 0
        for j, ok in zip(commits, parse_results(reply, len(commits)), strict=True):
            out[idx[j]] = PutStatus.STORED if ok else PutStatus.FAILED
            if ok:
                written += lengths[j]
        if written:
            self.counters.add("bytes_written", written)

    # ---- lookup -----------------------------------------------------------------------------------------
    def lookup_prefix(self, keys: Sequence[bytes]) -> LookupResult:
        """The longest prefix of `keys` stored in the pool, each with a read lease."""
        keys = block.check_keys(keys)
        with self._lock:
            refs = self._lookup(keys, prefix=True)
            if isinstance(refs, PackedRefs):
                end = refs.leading_hits()
                found: Sequence[BlockRef] = refs[:end]
            else:
                end = next((i for i, r in enumerate(refs) if r is None), len(keys))
                found = tuple(refs[:end])
            self.counters.add("lookup_keys", len(keys))
            self.counters.add("lookup_hits", end)
            return LookupResult(found)

    def _lookup(self, keys: list[bytes], prefix: bool) -> Sequence[BlockRef | None]:
        """One entry per key: its leased ref or None. One server's reply for all keys comes back as it arrived
        (`PackedRefs`); keys spread over servers or batches are gathered into a list."""
        parts: list[tuple[list[int], PackedRefs]] = []
        missed: set[ServerAddress] = set()
        for conn, idx in self._batches(keys):
            addr = conn.address
            if prefix and addr in missed:
                continue  # this server's part of the chain already ended: the prefix cannot reach further
            try:
                start = self.clock()
                part = keys if len(idx) == len(keys) else [keys[i] for i in idx]
                raw = check_hits(conn.call("lookup", keys=wire.pack_keys(part), prefix=prefix), len(idx))
                lease = float(conn.hello.get("lease_s", 0)) * LEASE_MARGIN
                refs = PackedRefs(part, addr, int(conn.hello.get("epoch", 0)), raw, start + lease, len(idx))
                if prefix and len(raw) < len(idx) * HIT.size:
                    missed.add(addr)
                parts.append((idx, refs))
            except _DEGRADE as exc:
                self._degraded(conn, exc)
        if len(parts) == 1 and len(parts[0][0]) == len(keys):
            return parts[0][1]  # the common case: one server, one batch
        out: list[BlockRef | None] = [None] * len(keys)
        for idx, refs in parts:
            for i, ref in zip(idx, refs, strict=True):
                out[i] = ref
        return out

    # ---- get --------------------------------------------------------------------------------------------
    def get(self, keys: Sequence[bytes], into: Sequence[Buffer]) -> list[int | None]:
        """Read each key's block into its buffer; returns payload lengths, None for misses. The contents of a
        buffer whose key missed are unspecified."""
        keys = block.check_keys(keys)
        if len(keys) != len(into):
            raise UsageError(f"get got {len(keys)} keys and {len(into)} buffers")
        with self._lock:
            refs = self._lookup(keys, prefix=False)
            return self._read(refs, into)

    def read(self, refs: LookupResult | Sequence[BlockRef], into: Sequence[Buffer]) -> list[int | None]:
        """Read blocks found by `lookup_prefix` (its result or any of its refs; no further round trip to the
        servers)."""
        if isinstance(refs, LookupResult):
            refs = refs.refs
        if len(refs) != len(into):
            raise UsageError(f"read got {len(refs)} refs and {len(into)} buffers")
        with self._lock:
            return self._read(list(refs), into)

    def _read(self, refs: list[BlockRef | None], into: Sequence[Buffer]) -> list[int | None]:
        targets = [self._item(b, i, "get") for i, b in enumerate(into)]
        staged = {i: t.nbytes for i, t in enumerate(targets) if type(t) is _OnDevice}
        if not staged:
            return self._read_into(refs, targets)
        for i, ref in enumerate(refs):  # checked here, where the positions are the caller's
            if ref is not None and _length(targets[i]) < ref.length:
                raise UsageError(f"buffer {i} holds {_length(targets[i])} bytes, block has {ref.length}")
        # CUDA tensors: read into pinned staging (validated there, checksum included), then copy the hits
        out: list[int | None] = [None] * len(refs)
        staging = self._device_staging()
        for part in tensors.groups(staged, len(refs), staging.cap):
            moved = [i for i in part if type(targets[i]) is _OnDevice]
            pieces = dict(zip(moved, staging.pieces([targets[i].nbytes for i in moved]), strict=True))
            devices: set = set()

            def landed(j: int, n: int, part: list[int] = part, pieces: dict = pieces, devices: set = devices) -> None:
                """Block j of this round was validated in staging: its copy to the GPU starts now, while later
                blocks still move (H200 host, 256 MiB calls: shm 0.97-1.04 of a host get against 0.85-0.93 copying
                after the round; tcp within noise either way; docs/decisions.md)."""
                i = part[j]
                if i in pieces:
                    tensor = targets[i].tensor
                    tensors.byte_tensor(tensor)[:n].copy_(pieces[i][:n], non_blocking=True)
                    devices.add(tensor.device)

            try:
                got = self._read_into([refs[i] for i in part],
                                      [memoryview(pieces[i].numpy()) if i in pieces else targets[i] for i in part],
                                      landed)
            finally:
                _synchronize(devices)  # the tensors hold their bytes on return, and the staging may be reused
            for i, n in zip(part, got, strict=True):
                out[i] = n
        staging.trim()
        return out

    def _read_into(self, refs: list[BlockRef | None], targets: list,
                   landed: Callable[[int, int], None] | None = None) -> list[int | None]:
        out: list[int | None] = [None] * len(refs)
        now = self.clock()
        by_server: dict[ServerAddress, list[int]] = defaultdict(list)
        for i, ref in enumerate(refs):
            if ref is None:
                continue
            if _length(targets[i]) < ref.length:
                raise UsageError(f"buffer {i} holds {_length(targets[i])} bytes, block has {ref.length}")
            if now >= ref.lease_until:
                self.counters.add("lease_expired")
                continue
            by_server[ref.server].append(i)
        for addr, idx in by_server.items():
            conn = self._conn(addr)
            try:
                conn.ensure()
                read_blocks(self, conn, [refs[i] for i in idx], [targets[i] for i in idx], idx, out, landed)
            except _DEGRADE as exc:
                self._degraded(conn, exc)
        hits = sum(1 for v in out if v is not None)
        self.counters.add("get_hits", hits)
        self.counters.add("get_misses", len(refs) - hits)
        return out

    # ---- delete, touch, stats ---------------------------------------------------------------------------
    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        keys = block.check_keys(keys)
        out = [False] * len(keys)
        with self._lock:
            for conn, idx in self._batches(keys):
                try:
                    results = parse_results(conn.call("delete", keys=wire.pack_keys([keys[i] for i in idx])),
                                            len(idx))
                    for i, ok in zip(idx, results, strict=True):
                        out[i] = ok
                except _DEGRADE as exc:
                    self._degraded(conn, exc)
        return out

    def touch(self, keys: Sequence[bytes]) -> None:
        """Report accesses (e.g. reads through cached refs) to the servers' eviction policies."""
        keys = block.check_keys(keys)
        with self._lock:
            for conn, idx in self._batches(keys):
                try:
                    conn.call("touch", keys=wire.pack_keys([keys[i] for i in idx]))
                except _DEGRADE as exc:
                    self._degraded(conn, exc)

    def server_stats(self, server: ServerAddress | str) -> dict:
        addr = server if isinstance(server, ServerAddress) else ServerAddress.parse(server)
        with self._lock:
            stats = self._conn(addr).call("stats").get("stats")
        if not isinstance(stats, dict):
            raise ProtocolError("stats reply lacks a map")
        return stats

    def close(self) -> None:
        """Close connections, the transport (if this client made it) and its memory. Idempotent; any later call
        raises UsageError rather than quietly opening it all again."""
        with self._lock:
            self._closed = True
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
            self.hasher.close()
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            if self._arena is not None:
                self._arena.close()
                self._arena = None
            if self._transport is not None:
                for region in self._registry.regions:
                    self._transport.deregister(region)
                self._registry.regions.clear()
                self._devices.clear()
                if self._own_transport:
                    self._transport.close()
                    self._transport = None

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _commit_fields(positions: list[int], keys: list[bytes], grants: dict) -> dict:
    return commit_fields([keys[j] for j in positions], [grants[j].generation for j in positions])


_OBJECTS = ("{} holds Python objects (an object dtype): its bytes are pointers into this process, meaningless in "
            "the pool and unsafe to overwrite; pass numeric data")


def _holds_objects(buffer: object) -> bool:
    """A buffer of Python object pointers, such as a numpy array of dtype object."""
    try:
        with memoryview(buffer) as view:  # type: ignore[arg-type]
            return "O" in view.format
    except TypeError:
        return False  # not a buffer at all: the transport's register says so


def _allocation_chunks(lengths: list[int]) -> list[tuple[int, int]]:
    """[start, end) key ranges reserved in one round trip each, for a pipelined put: the first blocks up to
    `PIPELINE_BYTES` (at least one), then chunks `CHUNK_GROWTH` times larger than the one before. Each round
    trip runs while the chunk before it moves, and its cost grows with its keys (~5-10 us a key on the server):
    one round trip for all the rest left the transport idle for most of it (~2 ms at 252 keys, measured)."""
    chunks, start, want = [], 0, PIPELINE_BYTES
    while start < len(lengths):
        end, total = start, 0
        while end < len(lengths) and (end == start or total < want):
            total += lengths[end]
            end += 1
        chunks.append((start, end))
        start, want = end, want * CHUNK_GROWTH
    return chunks


def _hint_to_wire(h: BlockHint) -> list:
    if not isinstance(h, BlockHint):
        raise UsageError(f"hints must be BlockHint objects, got {type(h).__name__}")
    if h.parent is not None:
        block.check_key(h.parent)
    return [h.parent, int(h.depth), int(h.tokens)]


def _mark(event_of: list, positions: list[int], device: Any) -> None:
    """Record an event after the copies queued on `device`'s current stream (CUDA; a host copy is done)."""
    if device.type != "cuda":
        return
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    for j in positions:
        event_of[j] = event


def _synchronize(devices: set) -> None:
    """Wait for the copies queued on each device's current stream."""
    if devices:
        import torch

        for device in devices:
            torch.cuda.current_stream(device).synchronize()


def _length(src) -> int:
    if type(src) is _OnDevice:
        return src.nbytes
    return src.length if isinstance(src, RegionSlice) else len(src)
