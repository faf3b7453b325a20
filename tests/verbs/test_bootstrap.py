import socket
import struct

import pytest

from rdmapool.errors import ServerUnavailable
from rdmapool.transport.verbs_bootstrap import BootstrapServer, exchange


@pytest.fixture()
def server():
    def handler(req):
        if req.get("fail"):
            raise ValueError("refused on purpose")
        return {"echo": req}

    srv = BootstrapServer("127.0.0.1", handler)
    yield srv
    srv.close()


def test_request_reply(server):
    assert exchange(server.address, {"a": [1, 2]}, timeout=5) == {"echo": {"a": [1, 2]}}


def test_handler_errors_become_refusals(server):
    with pytest.raises(ServerUnavailable, match="refused on purpose"):
        exchange(server.address, {"fail": True}, timeout=5)


def test_garbage_does_not_stop_the_listener(server):
    for junk in (b"\xff\xff\xff\xff", struct.pack(">I", 3) + b"\xc1\xc1\xc1", b"\x00"):
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(junk)
    assert exchange(server.address, {"b": 1}, timeout=5) == {"echo": {"b": 1}}


def test_unreachable_peer_is_server_unavailable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ServerUnavailable, match="unreachable"):
        exchange(("127.0.0.1", port), {}, timeout=2)
