"""A pool client in its own process, for tests that kill clients or race several of them.

    python -m tests.support.client_child ADDRESS TRANSPORT TOKEN MODE KEYHEX [ARG]

MODE put (ARG: payload byte value; starts at the unix time in $START_AT), hang-write (reserve, write half the
block, then wait to be killed), hang-read (look up, post ARG READs of the whole block without waiting for
them, then wait to be killed: the kill lands while the transport moves them). Prints one JSON line.
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
from rdmapool.server import wire
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
        (grant,) = parse_grants(conn.call("allocate", keys=key, lengths=wire.pack_u64s([50_000])), 1)
        data = bytearray(block.encode_block(key, grant.generation, b"w" * 50_000))
        staging = client.transport.allocate(len(data))
        staging.view[: len(data) // 2] = data[: len(data) // 2]
        conn.endpoint.execute([WorkRequest(1, Opcode.WRITE, (staging.sge(0, len(data) // 2),), grant.addr,
                                           grant.rkey)], timeout=5.0)
        print(json.dumps({"reserved": grant.generation}), flush=True)
    elif mode == "hang-read":
        refs = client.lookup_prefix([key]).refs
        reads = int(sys.argv[6]) if len(sys.argv) > 6 else 0
        if refs and reads:
            (ref,) = refs
            size = block.block_size(ref.length)
            target = client.transport.allocate(size)  # every READ lands in this buffer: only bytes matter
            conn.endpoint.post([WorkRequest(n, Opcode.READ, (target.sge(0, size),), ref.hit.addr,
                                            ref.hit.rkey) for n in range(reads)])
        print(json.dumps({"hits": len(refs), "posted": reads if refs else 0,
                          "outstanding": conn.endpoint.outstanding}), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
