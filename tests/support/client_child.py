"""A pool client in its own process, for tests that kill clients or race several of them.

    python -m tests.support.client_child ADDRESS TRANSPORT TOKEN MODE KEYHEX [ARG]

MODE put (ARG: payload byte value; starts at the unix time in $START_AT), hang-write (reserve, write half the
block, then wait to be killed), hang-read (look up, then wait to be killed). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

from rdmapool import block
from rdmapool.client import PoolClient
from rdmapool.client.protocol import parse_grants
from rdmapool.config import ClientConfig
from rdmapool.transport.base import Opcode, WorkRequest


def main() -> None:
    address, transport, token, mode, keyhex = sys.argv[1:6]
    key = bytes.fromhex(keyhex)
    client = PoolClient([address], ClientConfig(token=token, staging_bytes=1 << 20), transport_name=transport)
    if mode == "put":
        payload = bytes([int(sys.argv[6])]) * 50_000
        delay = float(os.environ.get("START_AT", "0")) - time.time()
        if delay > 0:
            time.sleep(delay)
        print(json.dumps({"status": client.put([key], [payload])[0].value}), flush=True)
        client.close()
        return
    conn = client._conn(client.router.servers[0])
    if mode == "hang-write":
        (grant,) = parse_grants(conn.call("allocate", keys=key, lengths=[50_000]), 1)
        data = bytearray(block.encode_block(key, grant.generation, b"w" * 50_000))
        staging = client.transport.allocate(len(data))
        staging.view[: len(data) // 2] = data[: len(data) // 2]
        conn.endpoint.execute([WorkRequest(1, Opcode.WRITE, (staging.sge(0, len(data) // 2),), grant.addr,
                                           grant.rkey)], timeout=5.0)
        print(json.dumps({"reserved": grant.generation}), flush=True)
    elif mode == "hang-read":
        print(json.dumps({"hits": len(client.lookup_prefix([key]))}), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
