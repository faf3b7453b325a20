"""A transport peer in its own process, for the cross-process conformance tests.

Serve mode (default): create a transport by name, allocate regions, print one JSON line
{"pid", "peer_info", "regions": [[addr, length, rkey], ...]} and then answer JSON commands, one per stdin line:
  {"cmd": "fill", "region": i, "seed": s}          fill region i with a deterministic pattern
  {"cmd": "hash", "region": i, "offset": o, "length": n}  -> {"hash": hex}
  {"cmd": "u64", "region": i, "offset": o}        -> {"value": int}
  {"cmd": "dereg", "region": i}                    deregister region i
  {"cmd": "quit"}
EOF at stdin also quits. Client mode (--client JSON): connect to a peer and hammer one 8-byte counter with FAA
and a second one with CAS retry loops, then print {"faa": n, "cas": n, "cas_retries": r}.

Run as a script: python tests/transport/peer.py --backend tcp --region 1048576
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transport_harness import digest, make, pattern  # noqa: E402  (this script's folder is on sys.path)

from rdmapool.transport import RegionDescriptor, WcStatus, WorkRequest  # noqa: E402


def serve(args: argparse.Namespace) -> int:
    transport = make(args.backend)
    regions = [transport.allocate(size) for size in args.region]
    info = {"pid": __import__("os").getpid(), "peer_info": transport.peer_info(),
            "regions": [r.descriptor.to_wire() for r in regions]}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd, reply = msg.get("cmd"), {"ok": True}
        if cmd == "quit":
            break
        region = regions[msg["region"]] if "region" in msg else None
        if cmd == "fill":
            region.view[:] = pattern(region.length, msg["seed"])
        elif cmd == "hash":
            o, n = msg["offset"], msg["length"]
            reply["hash"] = digest(region.view[o:o + n])
        elif cmd == "u64":
            o = msg["offset"]
            reply["value"] = int.from_bytes(region.view[o:o + 8], "little")
        elif cmd == "dereg":
            transport.deregister(region)
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        print(json.dumps(reply), flush=True)
    transport.close()
    return 0


def hammer(args: argparse.Namespace) -> int:
    spec = json.loads(args.client)
    transport = make(args.backend)
    local = transport.allocate(4096)
    ep = transport.connect(spec["peer_info"], timeout=5.0)
    desc = RegionDescriptor.from_wire(spec["region"])
    faa_addr, cas_addr = desc.addr + spec["faa_offset"], desc.addr + spec["cas_offset"]
    for i in range(spec["count"]):
        (c,) = ep.execute([WorkRequest.faa(i, local.sge(0, 8), faa_addr, desc.rkey, 1)], timeout=10.0)
        if c.status != WcStatus.SUCCESS:
            raise SystemExit(f"FAA failed: {c}")
    retries = 0
    for i in range(spec["count"]):
        expected = 0
        while True:
            (c,) = ep.execute([WorkRequest.cas(i, local.sge(8, 8), cas_addr, desc.rkey, expected, expected + 1)],
                              timeout=10.0)
            if c.status != WcStatus.SUCCESS:
                raise SystemExit(f"CAS failed: {c}")
            old = int.from_bytes(local.view[8:16], "little")
            if old == expected:
                break
            expected = old
            retries += 1
    ep.close()
    transport.close()
    print(json.dumps({"faa": spec["count"], "cas": spec["count"], "cas_retries": retries}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--region", type=int, action="append", default=[])
    parser.add_argument("--client", help="client mode: JSON with peer_info, region, faa_offset, cas_offset, count")
    args = parser.parse_args()
    return hammer(args) if args.client else serve(args)


if __name__ == "__main__":
    sys.exit(main())
