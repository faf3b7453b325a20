"""Where the cluster lives in etcd: one prefix per cluster, three kinds of keys under it."""

from __future__ import annotations

from dataclasses import dataclass

from rdmapool.errors import UsageError


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    cluster: str = "default"
    root: str = "/rdmapool"

    def __post_init__(self) -> None:
        if not self.cluster or "/" in self.cluster:
            raise UsageError(f"cluster name must be non-empty without '/', got {self.cluster!r}")

    @property
    def prefix(self) -> bytes:
        return f"{self.root}/{self.cluster}/".encode()

    @property
    def members(self) -> bytes:
        """Prefix of membership records, one key per server, each attached to that server's lease."""
        return self.prefix + b"members/"

    def member(self, member_id: str) -> bytes:
        return self.members + member_id.encode()

    def member_id(self, key: bytes) -> str:
        return key[len(self.members):].decode()

    @property
    def shard_map(self) -> bytes:
        return self.prefix + b"map"

    @property
    def coordinator(self) -> bytes:
        """The election key: holds the coordinator's id, attached to its lease; its create revision fences."""
        return self.prefix + b"coordinator"
