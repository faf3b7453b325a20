"""Fixtures of the transport conformance suite: every test that takes `backend` runs once per backend listed
in backends.py, and is skipped (with the reason) for a backend that does not import here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transport_harness import Peer, backends, make

from rdmapool.transport import Transport


@pytest.fixture(params=backends.BACKENDS, ids=lambda s: s.name)
def backend(request: pytest.FixtureRequest) -> str:
    spec = request.param
    reason = backends.unavailable(spec)
    if reason:
        pytest.skip(reason)
    return spec.name


@pytest.fixture
def pair(backend: str) -> Iterator[tuple[Transport, Transport]]:
    """(serving transport, initiating transport), both in this process."""
    server, client = make(backend), make(backend)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


@pytest.fixture
def spawn_peer(backend: str) -> Iterator:
    peers: list[Peer] = []

    def start(regions: list[int]) -> Peer:
        peer = Peer(backend, regions)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()
