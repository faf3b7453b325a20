"""Fixtures for cluster tests: real etcd processes on loopback, a fresh cluster prefix per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdmapool.cluster.gateway import GatewayEtcd
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.local_etcd import LocalEtcd

HAVE_ETCD = shutil.which("etcd") is not None
REPO = Path(__file__).resolve().parents[2]
needs_etcd = pytest.mark.skipif(not HAVE_ETCD, reason="etcd binary not installed (apt install etcd-server)")


@pytest.fixture(scope="session")
def etcd1() -> Iterator[LocalEtcd]:
    if not HAVE_ETCD:
        pytest.skip("etcd binary not installed (apt install etcd-server)")
    with LocalEtcd(1) as cluster:
        yield cluster


@pytest.fixture
def keys() -> ClusterKeys:
    return ClusterKeys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def client(etcd1: LocalEtcd) -> Iterator[GatewayEtcd]:
    c = GatewayEtcd(etcd1.endpoints, timeout=2.0)
    yield c
    c.close()


def spawn_member(endpoints: list[str], cluster: str, member_id: str, *extra: str,
                 prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`rdmapool cluster join` in a child process (stdout: JSON lines of its events)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [*prefix, sys.executable, "-m", "rdmapool", "cluster", "join", "--etcd", ",".join(endpoints),
           "--cluster", cluster, "--id", member_id, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO))
