"""`rdmapool bench verbs`: our verbs READ/WRITE against perftest's ib_read_bw/ib_write_bw on the same device.

On a host without an RDMA device it boots the rxe QEMU VM (scripts/vm/run.sh) once and runs itself inside
(`--here`); on a host with a device it runs directly. For each message size (default 64 KiB..4 MiB) and op it
runs perftest (server and client on the same device, one QP, perftest's default tx depth) and then ours: one RC
queue pair, batches of `--batch` requests posted as one linked list, the last of each batch signalled, up to
`--window` requests in flight, the same bytes moved. Reports MB/s (10^6) and ours/perftest. Under TCG the
absolute numbers say nothing about hardware; the ratio says whether our Python posting keeps the device busy.
Also reports `build_us_per_wr` (Python time to turn one request into a pyverbs SendWR: the per-WR cost model
of verbs_wr) and `post_cpu_us_per_wr` (CPU time of post() per request; on rxe this includes the kernel's
software data movement, which runs inside post_send, so it is only meaningful on a NIC).

    rdmapool bench verbs [--sizes 65536,262144,1048576,4194304] [--mib-per-point 8] [--rounds 3] [--record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PERF_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def perftest(tool: str, device: str, gid_index: int, size: int, iters: int, port: int, host: str) -> float:
    """MB/s (10^6) reported by a perftest bandwidth tool, server and client on this machine."""
    common = [tool, "-d", device, "-x", str(gid_index), "-s", str(size), "-n", str(iters), "-F", "-p", str(port),
              "--report_gbits"]
    server = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        client = None
        for _ in range(20):  # the server may still be starting (slow under TCG)
            client = subprocess.run([*common, host], capture_output=True, text=True, timeout=300)
            if client.returncode == 0:
                break
            time.sleep(0.5)
        if client is None or client.returncode != 0:
            raise RuntimeError(f"{tool} failed: {client.stdout[-800:] if client else ''}{client.stderr[-800:] if client else ''}")
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    for line in client.stdout.splitlines():
        m = PERF_LINE.match(line)
        if m and int(m.group(1)) == size:
            return float(m.group(4)) * 125.0  # Gb/s -> MB/s
    raise RuntimeError(f"could not parse {tool} output:\n{client.stdout[-1500:]}")


def ours(ep, local, remote, opcode, size: int, iters: int, batch: int, window: int) -> tuple[float, float]:
    """(MB/s, CPU microseconds to build and post one request) for `iters` requests of `size` bytes."""
    from rdmapool.transport import WorkRequest

    make = WorkRequest.read if opcode == "read" else WorkRequest.write
    sge = local.sge(0, size)
    posted = done = 0
    post_cpu = 0.0
    t0 = time.perf_counter()
    while done < iters:
        while posted < iters and posted - done < window:
            n = min(batch, iters - posted)
            wrs = [make(posted + i, sge, remote.remote(0), remote.rkey, signaled=(i == n - 1)) for i in range(n)]
            c0 = time.process_time()
            ep.post(wrs)
            post_cpu += time.process_time() - c0
            posted += n
        for c in ep.wait(1, 120.0):
            if not c.ok:
                raise RuntimeError(f"completion error: {c}")
            done = c.wr_id + 1
    elapsed = time.perf_counter() - t0
    return size * iters / elapsed / 1e6, post_cpu / iters * 1e6


def run_here(args: argparse.Namespace) -> dict:
    from rdmapool.transport import create

    server, client = create("verbs"), create("verbs")
    dev = client.device
    maxsize = max(args.sizes)
    remote, local = server.allocate(maxsize), client.allocate(maxsize)
    ep = client.connect(server.peer_info(), timeout=60)
    host = os.environ.get("RDMAPOOL_VM_IP") or "127.0.0.1"
    samples: dict[tuple[str, int], dict[str, list[float]]] = {}
    port = 18515
    for rnd in range(args.rounds):  # interleaved rounds, medians: the host is shared and noisy
        for size in args.sizes:
            iters = max(8, (args.mib_per_point << 20) // size)
            for op, tool in (("read", "ib_read_bw"), ("write", "ib_write_bw")):
                port += 1
                s = samples.setdefault((op, size), {"perftest": [], "ours": [], "post": []})
                order = ("perftest", "ours") if rnd % 2 == 0 else ("ours", "perftest")
                for who in order:
                    if who == "perftest":
                        s["perftest"].append(perftest(tool, dev.name, dev.port_info.gid_index, size, iters, port, host))
                    else:
                        mbps, post_us = ours(ep, local, remote, op, size, iters, args.batch, args.window)
                        s["ours"].append(mbps)
                        s["post"].append(post_us)
                print(json.dumps({"round": rnd, "op": op, "size": size, "perftest": round(s["perftest"][-1], 1),
                                  "ours": round(s["ours"][-1], 1)}), file=sys.stderr, flush=True)
    rows = []
    for (op, size), s in samples.items():
        ref, mine = statistics.median(s["perftest"]), statistics.median(s["ours"])
        rows.append({"op": op, "size": size, "perftest_MBps": round(ref, 1), "ours_MBps": round(mine, 1),
                     "ratio": round(mine / ref, 3), "post_cpu_us_per_wr": round(statistics.median(s["post"]), 1),
                     "perftest_runs": [round(v, 1) for v in s["perftest"]], "ours_runs": [round(v, 1) for v in s["ours"]]})
    client.close()
    server.close()
    return {"device": dev.name, "active_mtu_enum": dev.port_info.active_mtu, "qp": repr(ep.params),
            "build_us_per_wr": build_cost(), "rows": rows, "min_ratio": min(r["ratio"] for r in rows)}


def build_cost(n: int = 2000) -> float:
    """Microseconds of Python to turn one WorkRequest into a linked pyverbs SendWR (no device involved): the
    per-WR cost in the model of rdmapool.transport.verbs_wr."""
    from rdmapool.transport import Sge, WorkRequest
    from rdmapool.transport.verbs_enums import enums
    from rdmapool.transport.verbs_wr import build_chain

    wrs = [WorkRequest.read(i, Sge(0x1000, 65536, 1), 0x2000, 2, signaled=False) for i in range(n)]
    t0 = time.perf_counter()
    build_chain(enums(), wrs, range(n), [False] * n)
    return round((time.perf_counter() - t0) / n * 1e6, 2)


def run_in_vm(args: argparse.Namespace, argv: list[str]) -> dict:
    job = Path(tempfile.mkdtemp(prefix="rdmapool-bench-verbs-"))
    inner = " ".join(a for a in argv if a != "--record")
    (job / "cmd.sh").write_text(f"python3 bench/verbs.py --here {inner} > /mnt/job/result.json\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "vm" / "run.sh"), "--timeout", "900", str(job)],
                          capture_output=True, text=True)
    out = (job / "output.log").read_text(errors="replace") if (job / "output.log").exists() else ""
    result = (job / "result.json").read_text() if (job / "result.json").exists() else ""
    if proc.returncode != 0 or not result.strip():
        raise SystemExit(f"bench verbs in the VM failed (exit {proc.returncode}):\n{out[-3000:]}\n{proc.stderr[-2000:]}")
    data = json.loads(result.strip().splitlines()[-1])
    data["where"] = "rxe in a QEMU TCG VM (scripts/vm): a ratio, not a hardware figure"
    return data


def has_device() -> bool:
    return os.path.isdir("/sys/class/infiniband") and bool(os.listdir("/sys/class/infiniband"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rdmapool bench verbs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536,262144,1048576,4194304",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--mib-per-point", type=int, default=8, help="bytes moved per (size, op, round), in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--batch", type=int, default=16, help="requests per posted list (last one signalled)")
    parser.add_argument("--window", type=int, default=64, help="requests in flight")
    parser.add_argument("--here", action="store_true", help="run on this machine's device (used inside the VM)")
    parser.add_argument("--record", action="store_true", help="write bench/results/verbs-<date>.json")
    args = parser.parse_args(argv)
    if args.here or has_device():
        data = run_here(args)
        data.setdefault("where", "this host's RDMA device" if not os.environ.get("RDMAPOOL_IN_VM") else
                        "rxe in a QEMU TCG VM: a ratio, not a hardware figure")
    else:
        data = run_in_vm(args, argv)
    data["goal"] = "ours >= 0.8 x perftest at every size"
    data["meets_goal"] = data["min_ratio"] >= 0.8
    if args.record:
        data.update(date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), machine=platform.node(),
                    python=platform.python_version())
        out = ROOT / "bench" / "results" / f"verbs-{dt.date.today().isoformat()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
