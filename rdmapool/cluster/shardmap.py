"""The shard map document and key -> shard routing.

Theory of operation
-------------------
A key hashes (xxh3-64) to one of `num_shards` shards; the map lists, per shard, R server ids in preference order
(read from the first healthy one, write to all). The document is versioned twice: `epoch` counts the maps the
coordinators wrote (it only grows), and etcd's mod revision of the map key is what writers fence on. `fence` is
the coordinator token (the create revision of the coordinator key) that wrote it, for audits.

Encoding: msgpack with the table as little-endian uint16 (65,536 shards x R=3 is 384 KiB; etcd's request limit
is 1.5 MiB), so a map supports up to 65,535 servers. Decoding validates everything: a malformed map in etcd is a
`ProtocolError`, never a crash of a client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np
import xxhash

from rdmapool.errors import ProtocolError, UsageError

FORMAT = 1
NO_SERVER = 0xFFFF


def key_hash(key: bytes | int) -> int:
    """64-bit hash of a key; ints (already hashes, e.g. chunk keys) are mixed so low bits are uniform."""
    if isinstance(key, int):
        return xxhash.xxh3_64_intdigest((key & (2**64 - 1)).to_bytes(8, "little"))
    if isinstance(key, bytes | bytearray | memoryview):
        return xxhash.xxh3_64_intdigest(bytes(key))
    raise UsageError(f"a key must be bytes or int, got {type(key).__name__}")


@dataclass(frozen=True, eq=False)
class ShardMap:
    epoch: int
    num_shards: int
    replicas: int
    servers: tuple[str, ...]
    table: np.ndarray = field(repr=False)  # (num_shards, replicas) int32 indices into servers, -1 = none
    coordinator: str = ""
    fence: int = 0
    members_revision: int = 0

    def __post_init__(self) -> None:
        if self.num_shards < 1 or self.replicas < 1:
            raise UsageError("a shard map needs num_shards >= 1 and replicas >= 1")
        if self.table.shape != (self.num_shards, self.replicas):
            raise UsageError(f"table shape {self.table.shape} != ({self.num_shards}, {self.replicas})")
        if len(self.servers) >= NO_SERVER:
            raise UsageError(f"at most {NO_SERVER - 1} servers in a map")
        if self.table.size and (self.table.max() >= len(self.servers) or self.table.min() < -1):
            raise UsageError("table refers to servers outside the server list")

    def shard_of(self, key: bytes | int) -> int:
        return key_hash(key) % self.num_shards

    def replicas_of_shard(self, shard: int) -> tuple[str, ...]:
        return tuple(self.servers[i] for i in self.table[shard] if i >= 0)

    def replicas_for(self, key: bytes | int) -> tuple[str, ...]:
        return self.replicas_of_shard(self.shard_of(key))

    def same_placement(self, other: ShardMap | None) -> bool:
        if other is None or other.num_shards != self.num_shards or other.replicas != self.replicas:
            return False
        a = np.array(self.servers + ("",), dtype=object)[self.table]
        b = np.array(other.servers + ("",), dtype=object)[other.table]
        return bool((a == b).all())

    def shard_counts(self) -> dict[str, tuple[int, int]]:
        """server id -> (shards where it is first, shards where it is any replica)."""
        n = len(self.servers)
        first = np.bincount(self.table[:, 0][self.table[:, 0] >= 0], minlength=n)
        anyr = np.bincount(self.table[self.table >= 0], minlength=n)
        return {s: (int(first[i]), int(anyr[i])) for i, s in enumerate(self.servers)}

    def encode(self) -> bytes:
        t = np.where(self.table >= 0, self.table, NO_SERVER).astype("<u2")
        return msgpack.packb({
            "format": FORMAT, "epoch": self.epoch, "num_shards": self.num_shards, "replicas": self.replicas,
            "servers": list(self.servers), "table": t.tobytes(), "coordinator": self.coordinator,
            "fence": self.fence, "members_revision": self.members_revision,
        })

    @classmethod
    def decode(cls, raw: bytes) -> ShardMap:
        try:
            d = msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises several kinds
            raise ProtocolError(f"shard map is not msgpack: {exc}") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ProtocolError(f"shard map has unknown format {d.get('format') if isinstance(d, dict) else d!r}")
        try:
            S, R = int(d["num_shards"]), int(d["replicas"])
            servers = tuple(str(s) for s in d["servers"])
            t = np.frombuffer(d["table"], dtype="<u2")
            if t.size != S * R:
                raise ProtocolError(f"shard map table has {t.size} entries, expected {S * R}")
            table = np.where(t == NO_SERVER, -1, t.astype(np.int32)).reshape(S, R)
            return cls(int(d["epoch"]), S, R, servers, table, str(d.get("coordinator", "")),
                       int(d.get("fence", 0)), int(d.get("members_revision", 0)))
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise ProtocolError(f"malformed shard map: {exc}") from exc
