"""Transport benchmark: `rdmapool bench transport [--json] [--record]`.

One run on loopback, for blocks of 4 KiB, 64 KiB, 1 MiB and 32 MiB:
1. the limits: a raw TCP socket stream of the same bytes in send/recv calls of the block size (C, two threads,
   rdmapool._tcpengine.raw_stream) for `tcp`, and a plain memcpy of the same blocks (C) for `shm`.
   `raw_socket_gbps` sends from and receives into one block-sized buffer per side (cache-warm for small
   blocks: the strict bar); `raw_socket_region_gbps` walks buffers as large as the transport's region
   (64 MiB, huge pages advised, as TcpTransport.allocate does), touching as much memory as our transports do;
2. our `tcp` and `shm` READ and WRITE bandwidth (the serving side is another process; requests are posted from
   a prepared plan, ~2 MiB in flight, one completion signalled per half window) and READ latency p50/p99
   (one READ of the block at a time, `Endpoint.execute`, measured from Python);
3. Mooncake's Transfer Engine over TCP (`transfer_engine_bench`, installed by scripts/mooncake-setup.sh),
   target and initiator on 127.0.0.1; null (with the reason in `notes`) when it is missing or fails.

The last stdout line is one JSON object keyed by block size in bytes (a string). Each value holds
raw_socket_gbps, memcpy_gbps, tcp_read_gbps, tcp_write_gbps, shm_read_gbps, shm_write_gbps,
mooncake_read_gbps, mooncake_write_gbps, tcp_read_p50_us, tcp_read_p99_us, shm_read_p50_us, shm_read_p99_us
(GB = 1e9 bytes), plus the goal ratios (tcp_read_vs_raw, ...), `notes` (why a value is null) and `samples`.
Bandwidths are medians of `--repeat` rounds; each round measures the limits and our backends back to back, so a
load spike on a shared machine moves both sides of a ratio.
`--record` also writes bench/results/transport-<date>.json with machine, date and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = [4096, 65536, 1 << 20, 32 << 20]
IN_FLIGHT = 2 << 20  # bytes outstanding per endpoint; deeper queues were slower on loopback (docs/decisions.md)
IN_FLIGHT_CHOICES = (2 << 20, 8 << 20)  # calibrated per block size and operation (BackendRun.calibrate)
REGION = 64 << 20
MOONCAKE_THREADS = 1


def log(msg: str) -> None:
    print(f"[bench transport] {msg}", file=sys.stderr, flush=True)


# -- the serving side ----------------------------------------------------------------------------------------

def serve(backend: str, size: int) -> int:
    """Child process: allocate one region, print how to reach it, serve until stdin closes."""
    from rdmapool.transport import create

    transport = create(backend)
    region = transport.allocate(size)
    region.view[:] = bytes(range(256)) * (size // 256)
    print(json.dumps({"peer_info": transport.peer_info(), "region": region.descriptor.to_wire()}), flush=True)
    sys.stdin.read()
    transport.close()
    return 0


class Server:
    def __init__(self, backend: str, size: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", backend, "--region", str(size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"{backend} server exited with {self.proc.returncode}")
        hello = json.loads(line)
        self.peer_info = hello["peer_info"]
        self.region = hello["region"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


# -- our transports ------------------------------------------------------------------------------------------

def bandwidth(ep, local, desc, block: int, opcode, seconds: float, in_flight: int = IN_FLIGHT) -> float:
    from rdmapool.transport import TransferPlan

    nslots = max(1, min(REGION // block, local.length // block))
    addr, _, rkey = desc
    plan = TransferPlan.build([local.sge(i * block, block) for i in range(nslots)],
                              [(addr + i * block, rkey) for i in range(nslots)])
    depth = max(2, min(4096, in_flight // block))
    half = max(1, depth // 2)
    batches = [[(j % nslots, j % nslots) for j in range(k * half, (k + 1) * half)] for k in range(8)]
    inflight = 0
    moved = 0
    start = time.perf_counter()
    k = 0
    while True:
        while inflight < 2:
            ep.post_plan(plan, opcode, batches[k % 8], wr_id_base=k * half, signal_every=half)
            k += 1
            inflight += 1
        for c in ep.wait(1, 30.0):
            if not c.ok:
                raise RuntimeError(f"{opcode.name} failed: {c}")
        inflight -= 1
        moved += half * block
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and moved >= 4 * block:
            ep.wait(inflight, 30.0)
            return moved / elapsed / 1e9


def latency(ep, local, desc, block: int, seconds: float) -> tuple[float, float]:
    from rdmapool.transport import WorkRequest

    addr, _, rkey = desc
    wr = [WorkRequest.read(1, local.sge(0, block), addr, rkey)]
    for _ in range(20):
        ep.execute(wr, 30.0)
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 50:
        t = time.perf_counter()
        ep.execute(wr, 30.0)
        samples.append(time.perf_counter() - t)
        if len(samples) >= 20000:
            break
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6


class BackendRun:
    """A client transport, an endpoint and a serving process of one backend, kept for the whole run."""

    def __init__(self, name: str, region: int) -> None:
        from rdmapool.transport import create

        self.name = name
        self.client = create(name)
        self.server = None
        try:
            self.server = Server(name, region)
            self.local = self.client.allocate(region)
            self.local.view[:] = bytes(region)  # fault the pages in now, not during the first measurement
            self.ep = self.client.connect(self.server.peer_info)
        except Exception:
            self.close()
            raise

    def bandwidth(self, size: int, seconds: float, depth: dict | None = None) -> tuple[float, float]:
        from rdmapool.transport import Opcode

        depth = depth or {}
        r = bandwidth(self.ep, self.local, self.server.region, size, Opcode.READ, seconds,
                      depth.get("read", IN_FLIGHT))
        w = bandwidth(self.ep, self.local, self.server.region, size, Opcode.WRITE, seconds,
                      depth.get("write", IN_FLIGHT))
        log(f"{self.name} {size:>9}: read {r:.2f} GB/s, write {w:.2f} GB/s")
        return r, w

    def calibrate(self, size: int, seconds: float) -> dict:
        """Bytes in flight per operation for this block size: the faster of IN_FLIGHT_CHOICES, each measured
        once before the rounds (like perftest's tx-depth, chosen per test); these samples are not reported."""
        from rdmapool.transport import Opcode

        best = {}
        for name, op in (("read", Opcode.READ), ("write", Opcode.WRITE)):
            got = {d: bandwidth(self.ep, self.local, self.server.region, size, op, seconds, d)
                   for d in IN_FLIGHT_CHOICES}
            best[name] = max(got, key=got.__getitem__)
        log(f"{self.name} {size:>9}: bytes in flight {best}")
        return best

    def latency(self, size: int) -> tuple[float, float]:
        p50, p99 = latency(self.ep, self.local, self.server.region, size, 0.5)
        log(f"{self.name} {size:>9}: READ p50 {p50:.1f} us, p99 {p99:.1f} us")
        return p50, p99

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.client.close()


def start_backend(name: str, region: int) -> tuple[BackendRun | None, str | None]:
    try:
        return BackendRun(name, region), None
    except Exception as exc:  # noqa: BLE001 - any failure to start a backend becomes the reason
        return None, f"{name} unavailable: {type(exc).__name__}: {exc}"


# -- Mooncake ------------------------------------------------------------------------------------------------

def find_mooncake() -> str | None:
    """The real transfer_engine_bench binary inside the mooncake package (the console script of the same name
    is a Python wrapper whose child would outlive a kill of the wrapper), else whatever is on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "transfer_engine_bench"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("transfer_engine_bench", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


class MooncakeRun:
    """Mooncake's transfer_engine_bench over TCP: one target process for the run, one initiator per sample."""

    BUFFER = 1 << 30

    def __init__(self, seconds: float) -> None:
        binary = find_mooncake()
        if not binary:
            raise RuntimeError("Mooncake not installed (run scripts/mooncake-setup.sh)")
        self.binary, self.seconds = binary, seconds
        self.tmp = tempfile.TemporaryDirectory(prefix="rdmapool-mooncake-")
        log_path = Path(self.tmp.name) / "target.log"
        with open(log_path, "w") as target_log:
            self.target = subprocess.Popen(
                [binary, "--mode=target", "--metadata_server=P2PHANDSHAKE", "--local_server_name=127.0.0.1:17801",
                 "--protocol=tcp", f"--buffer_size={self.BUFFER}"],
                stdout=target_log, stderr=subprocess.STDOUT, cwd=self.tmp.name, start_new_session=True)
        self.port = None
        deadline = time.monotonic() + 20
        while self.port is None and time.monotonic() < deadline and self.target.poll() is None:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            self.port = m and m.group(1)
            time.sleep(0.1)
        if self.port is None:
            self.close()
            raise RuntimeError(f"Mooncake target did not start: {log_path.read_text()[-500:]}")

    def bandwidth(self, size: int) -> tuple[float, float]:
        # best of the configurations tried on the 2-core host (1 MiB READ: 12 threads x 8 -> 0.04 GB/s,
        # 4 x 4 -> 0.26, 2 x 16 -> 0.29, 1 x 32 -> 0.75; its default 12 x 128 at 64 KiB -> 0.17)
        threads = MOONCAKE_THREADS
        batch = max(2, min(128, (32 << 20) // (threads * size)))
        got = []
        for op in ("read", "write"):
            cmd = [self.binary, "--mode=initiator", "--metadata_server=P2PHANDSHAKE",
                   "--local_server_name=127.0.0.1:17802", f"--segment_id=127.0.0.1:{self.port}", "--protocol=tcp",
                   f"--operation={op}", f"--block_size={size}", f"--batch_size={batch}", f"--threads={threads}",
                   f"--duration={max(1, round(self.seconds))}", f"--buffer_size={self.BUFFER}", "--report_unit=GB"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=self.tmp.name, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"Mooncake initiator timed out ({op}, block {size})") from exc
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            m = re.search(r"throughput ([0-9.]+) GB/s", out)
            if not m:
                raise RuntimeError(f"Mooncake initiator gave no throughput ({op}, block {size}): {out[-400:]}")
            got.append(float(m.group(1)))
        log(f"mooncake {size:>9}: read {got[0]:.2f} GB/s, write {got[1]:.2f} GB/s ({threads} thread x batch {batch})")
        return got[0], got[1]

    def close(self) -> None:
        # the whole process group: a wrapper's child must not outlive the benchmark
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.target.pid, signal.SIGKILL)
        self.target.wait(10)
        self.tmp.cleanup()


def mooncake_version() -> str | None:
    try:
        import importlib.metadata as md

        return md.version("mooncake-transfer-engine-non-cuda")
    except Exception:  # noqa: BLE001
        return None


# -- the run -------------------------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def limits(size: int, region: int) -> tuple[float, float, float]:
    """(raw socket with one block-sized buffer per side, raw socket walking a region-sized buffer, memcpy)."""
    from rdmapool import _tcpengine

    total = max(256 << 20, 8 * size)
    return (total / _tcpengine.raw_stream(size, total) / 1e9, total / _tcpengine.raw_stream(size, total, region) / 1e9,
            total / _tcpengine.memcpy_stream(size, total) / 1e9)


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def run(sizes: list[int], seconds: float, mooncake: bool, repeat: int) -> dict:
    """Per block size, `repeat` rounds of [limits, each backend's and Mooncake's READ and WRITE bandwidth] back to back; each
    column is the median of its rounds (all samples are kept under `samples`), so the ratios compare numbers
    taken under the same load on a shared machine."""
    region = max(REGION, 2 * max(sizes))
    results: dict[str, dict] = {str(s): {"notes": {}, "samples": {}} for s in sizes}
    runs = {name: start_backend(name, region) for name in ("tcp", "shm")}
    mooncake_reason = "skipped (--no-mooncake)"
    mc = None
    if mooncake:
        try:
            mc = MooncakeRun(seconds)
        except (RuntimeError, OSError) as exc:
            mooncake_reason = str(exc)
    try:
        for s in sizes:
            row, samples = results[str(s)], results[str(s)]["samples"]
            depths = {name: br.calibrate(s, seconds) for name, (br, _) in runs.items() if br is not None}
            row["in_flight_bytes"] = depths
            for _ in range(repeat):
                raw, raw_region, mem = limits(s, region)
                log(f"limits {s:>9}: raw socket {raw:.2f} GB/s (region-sized buffers {raw_region:.2f}), "
                    f"memcpy {mem:.2f} GB/s")
                samples.setdefault("raw_socket_gbps", []).append(round(raw, 3))
                samples.setdefault("raw_socket_region_gbps", []).append(round(raw_region, 3))
                samples.setdefault("memcpy_gbps", []).append(round(mem, 3))
                for name, (br, _) in runs.items():
                    if br is not None:
                        r, w = br.bandwidth(s, seconds, depths[name])
                        samples.setdefault(f"{name}_read_gbps", []).append(round(r, 3))
                        samples.setdefault(f"{name}_write_gbps", []).append(round(w, 3))
                if mc is not None:
                    try:
                        r, w = mc.bandwidth(s)
                        samples.setdefault("mooncake_read_gbps", []).append(r)
                        samples.setdefault("mooncake_write_gbps", []).append(w)
                    except RuntimeError as exc:
                        mooncake_reason = str(exc)
                        mc.close()
                        mc = None
            for key in ("raw_socket_gbps", "raw_socket_region_gbps", "memcpy_gbps"):
                row[key] = round(median(samples[key]), 3)
            for key in ("mooncake_read_gbps", "mooncake_write_gbps"):
                row[key] = round(median(samples[key]), 3) if key in samples else None
            if "mooncake_read_gbps" not in samples:
                row["notes"]["mooncake"] = mooncake_reason
            for name, (br, reason) in runs.items():
                p50, p99 = br.latency(s) if br is not None else (None, None)
                for key in (f"{name}_read_gbps", f"{name}_write_gbps"):
                    row[key] = round(median(samples[key]), 3) if key in samples else None
                row[f"{name}_read_p50_us"] = round(p50, 1) if p50 is not None else None
                row[f"{name}_read_p99_us"] = round(p99, 1) if p99 is not None else None
                if br is None:
                    row["notes"][name] = reason
    finally:
        for br, _ in runs.values():
            if br is not None:
                br.close()
        if mc is not None:
            mc.close()
    for row in results.values():
        row["tcp_read_vs_raw"] = ratio(row["tcp_read_gbps"], row["raw_socket_gbps"])
        row["tcp_write_vs_raw"] = ratio(row["tcp_write_gbps"], row["raw_socket_gbps"])
        row["tcp_read_vs_raw_region"] = ratio(row["tcp_read_gbps"], row["raw_socket_region_gbps"])
        row["tcp_write_vs_raw_region"] = ratio(row["tcp_write_gbps"], row["raw_socket_region_gbps"])
        row["tcp_read_vs_mooncake"] = ratio(row["tcp_read_gbps"], row["mooncake_read_gbps"])
        row["tcp_write_vs_mooncake"] = ratio(row["tcp_write_gbps"], row["mooncake_write_gbps"])
        row["shm_read_vs_memcpy"] = ratio(row["shm_read_gbps"], row["memcpy_gbps"])
        row["shm_write_vs_memcpy"] = ratio(row["shm_write_gbps"], row["memcpy_gbps"])
    return results


def environment() -> dict:
    import rdmapool

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"machine": {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
                        "load_avg": os.getloadavg()},
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "rdmapool": rdmapool.__version__, "commit": commit,
                         "mooncake-transfer-engine-non-cuda": mooncake_version()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rdmapool bench transport", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="accepted for the contract: JSON is always the last line")
    parser.add_argument("--record", action="store_true", help="also write bench/results/transport-<date>.json")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="block sizes in bytes, comma-separated")
    parser.add_argument("--seconds", type=float, default=0.3, help="time per bandwidth measurement")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per block size (medians are reported)")
    parser.add_argument("--no-mooncake", action="store_true", help="skip the Mooncake columns")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--region", type=int, default=REGION, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.region)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes must be integers, got {args.sizes!r}")
    if not sizes or min(sizes) <= 0 or args.seconds <= 0 or args.repeat < 1:
        parser.error("sizes, --seconds and --repeat must be positive")
    results = run(sizes, args.seconds, not args.no_mooncake, args.repeat)
    if args.record:
        out = ROOT / "bench" / "results" / f"transport-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**environment(), "results": results}, indent=2) + "\n")
        log(f"recorded {out.relative_to(ROOT)}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
