"""Evidence for the etcd client choice: each candidate client against the failure modes issue 4 lists.

`rdmapool bench etcd_clients [--python-for-grpc PATH] [--record]`. For each scenario a fresh 3-member etcd runs
on loopback; a probe process (one per client and scenario, so a hang or a crash is contained) watches a prefix
and reports what it saw; the parent injects the fault and classifies the outcome within a deadline:

- member_killed: SIGKILL the member the watch is on, then write through another member.
- member_frozen: SIGSTOP that member (a hung or partitioned member: no FIN, no RST), then write elsewhere.
- compacted: start the watch from a revision that was compacted.
- large_value: a 700 kB value arrives through the watch.
- fork: create the client, use it, fork; parent and child both use it 200 times.

Outcomes: `event` (the client delivered the post-fault change by itself), `error` (it surfaced an error the
caller can act on: re-watch or re-list), `silent` (nothing within the deadline: the caller would wait forever),
`import_error`, `fail`. CPU seconds the probe burnt during the wait are recorded (a spinning watch thread shows).
Clients: ours (rdmapool.cluster: GatewayEtcd + PrefixMirror, given all endpoints), etcd3gw (raw, one
endpoint), etcd3 (python-etcd3 0.12) and aetcd (asyncio gRPC) from an interpreter that has them (they are not
project dependencies; e.g. a throw-away venv: `python -m venv /tmp/v && /tmp/v/bin/pip install etcd3 aetcd`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCENARIOS = ("member_killed", "member_frozen", "compacted", "large_value", "fork")
CLIENTS = ("ours", "etcd3gw", "etcd3", "aetcd")
DEADLINE = 6.0


# ---------------------------------------------------------------------------------------------- probes ---
def _out(**kw) -> None:
    print(json.dumps(kw), flush=True)


def probe(client: str, scenario: str, endpoints: list[str], prefix: bytes, start: int) -> None:
    host, port = endpoints[0][len("http://"):].rsplit(":", 1)
    port = int(port)
    try:
        if client == "ours":
            from rdmapool.cluster.gateway import GatewayEtcd
            from rdmapool.cluster.mirror import PrefixMirror
            c = GatewayEtcd(endpoints, timeout=1.0)
        elif client == "etcd3gw":
            import etcd3gw
            c = etcd3gw.client(host=host, port=port, timeout=2)
        elif client == "etcd3":
            import etcd3
            c = etcd3.client(host=host, port=port, timeout=2)
        elif client == "aetcd":
            import asyncio

            import aetcd
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        _out(kind="import_error", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return

    if scenario == "fork":
        _fork_probe(client, c if client != "aetcd" else None, prefix, host, port)
        return

    def on_event(key: bytes, value: bytes) -> None:
        _out(kind="event", key=key.decode(errors="replace"), length=len(value))

    def on_error(exc: BaseException) -> None:
        _out(kind="error", detail=f"{type(exc).__name__}: {str(exc)[:160]}")

    if client == "ours":
        m = PrefixMirror(c, prefix, idle_timeout=2.0, retry_s=0.1)
        m._revision = start - 1  # resume semantics: as if listed at start-1
        m.listed.set()
        import threading

        def run() -> None:
            seen = {}
            from rdmapool.cluster.etcd import WatchCompacted
            while True:
                try:
                    w = c.watch_prefix(prefix, m._revision + 1, 2.0)
                    for batch in w:
                        for ev in batch.events:
                            if seen.get(ev.kv.key) != ev.kv.mod_revision:
                                seen[ev.kv.key] = ev.kv.mod_revision
                                on_event(ev.kv.key, ev.kv.value)
                                m._revision = max(m._revision, ev.kv.mod_revision)
                        if not batch.events:
                            m._revision = max(m._revision, batch.revision)
                except WatchCompacted as exc:
                    on_error(exc)  # the mirror re-lists here
                    kvs, rev = c.get_prefix(prefix)
                    for kv in kvs:
                        on_event(kv.key, kv.value)
                    m._revision = rev
                except Exception:  # noqa: BLE001 - the mirror retries
                    time.sleep(0.1)
        threading.Thread(target=run, daemon=True).start()
    elif client == "etcd3gw":
        import threading
        events, cancel = c.watch_prefix(prefix, start_revision=start)

        def run() -> None:
            try:
                for ev in events:
                    on_event(ev["kv"]["key"], ev["kv"].get("value", b""))
            except BaseException as exc:  # noqa: BLE001
                on_error(exc)
        threading.Thread(target=run, daemon=True).start()
    elif client == "etcd3":
        import threading
        events, cancel = c.watch_prefix(prefix, start_revision=start)

        def run() -> None:
            try:
                for ev in events:
                    on_event(ev.key, ev.value)
                on_error(RuntimeError("iterator ended"))
            except BaseException as exc:  # noqa: BLE001
                on_error(exc)
        threading.Thread(target=run, daemon=True).start()
    elif client == "aetcd":
        import threading

        async def main() -> None:
            async with aetcd.Client(host=host, port=port, timeout=2) as ac:
                try:
                    watch = await ac.watch_prefix(prefix, start_revision=start)
                    _out(kind="ready")
                    async for ev in watch:
                        on_event(ev.kv.key, ev.kv.value)
                    on_error(RuntimeError("iterator ended"))
                except BaseException as exc:  # noqa: BLE001
                    on_error(exc)
        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        time.sleep(60)
        return
    _out(kind="ready")
    time.sleep(60)


def _fork_probe(client: str, c, prefix: bytes, host: str, port: int) -> None:
    if client == "aetcd":
        import asyncio

        import aetcd

        async def use(tag: str, loop_client) -> int:
            bad = 0
            for i in range(200):
                await loop_client.put(prefix + tag.encode(), str(i).encode())
                got = await loop_client.get(prefix + tag.encode())
                bad += got.value != str(i).encode()
            return bad

        async def setup():
            ac = aetcd.Client(host=host, port=port, timeout=2)
            await ac.connect()
            await ac.get(prefix)
            return ac
        loop = asyncio.new_event_loop()
        ac = loop.run_until_complete(setup())
        put = get = None
    else:
        def put(k, v):
            c.put(k, v)

        def get(k):
            if client == "ours":
                kv = c.get(k)[0]
                return kv.value if kv else None
            if client == "etcd3gw":
                r = c.get(k)
                return r[0] if r else None
            return c.get(k)[0]
        get(prefix)
    pid = os.fork()
    tag = "child" if pid == 0 else "parent"
    bad = 0
    try:
        if client == "aetcd":
            bad = loop.run_until_complete(asyncio.wait_for(use(tag, ac), 10))
        else:
            for i in range(200):
                put(prefix + tag.encode(), str(i).encode())
                bad += get(prefix + tag.encode()) != str(i).encode()
        result = "ok" if bad == 0 else f"{bad} wrong reads"
    except BaseException as exc:  # noqa: BLE001
        result = f"{type(exc).__name__}: {str(exc)[:120]}"
    if pid == 0:
        _out(kind="fork_child", result=result)
        os._exit(0)
    os.waitpid(pid, 0)
    _out(kind="fork_parent", result=result)


# ---------------------------------------------------------------------------------------------- driver ---
def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def run_one(client: str, scenario: str, python: str) -> dict:
    from rdmapool.cluster.gateway import GatewayEtcd
    from rdmapool.cluster.local_etcd import LocalEtcd

    prefix = f"/probe/{client}/{scenario}/".encode()
    with LocalEtcd(3) as cluster:
        admin = GatewayEtcd(cluster.endpoints[1:], timeout=2.0)
        start = admin.put(prefix + b"k0", b"v0")
        if scenario == "compacted":
            for i in range(5):
                admin.put(prefix + b"k", str(i).encode())
            cluster.compact(admin.get(prefix)[1])
        eps = cluster.endpoints if client == "ours" else cluster.endpoints[:1]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        if client == "etcd3":
            env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"  # else it cannot even import
        proc = subprocess.Popen([python, __file__, "--probe", client, scenario, ",".join(eps), prefix.decode(),
                                 str(start + 1)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        os.set_blocking(proc.stdout.fileno(), False)
        lines: list[dict] = []
        buf = ""

        def pump(until: float, want=None) -> None:
            nonlocal buf
            while time.monotonic() < until:
                try:
                    chunk = os.read(proc.stdout.fileno(), 1 << 16).decode(errors="replace")
                except BlockingIOError:
                    chunk = ""
                buf += chunk
                while "\n" in buf:
                    line, buf = buf.split("\n", 1)
                    if line.strip():
                        lines.append(json.loads(line))
                if want and want(lines):
                    return
                if proc.poll() is not None and not chunk:
                    return
                time.sleep(0.02)

        frozen = False
        try:
            pump(time.monotonic() + 15, lambda ls: any(x["kind"] in ("ready", "import_error", "fork_parent")
                                                       for x in ls))
            outcome = {"client": client, "scenario": scenario}
            if any(x["kind"] == "import_error" for x in lines):
                outcome.update(outcome="import_error", detail=lines[-1]["detail"])
                return outcome
            if scenario == "fork":
                pump(time.monotonic() + 15, lambda ls: any(x["kind"] == "fork_parent" for x in ls))
                res = {x["kind"]: x["result"] for x in lines if x["kind"].startswith("fork")}
                ok = res.get("fork_parent") == "ok" and res.get("fork_child") == "ok"
                outcome.update(outcome="ok" if ok else "fail", detail=res or "hung")
                return outcome
            time.sleep(0.3)
            n_before = len(lines)
            if scenario == "member_killed":
                cluster.kill(0)
            elif scenario == "member_frozen":
                cluster.members[0].proc.send_signal(signal.SIGSTOP)
                frozen = True
            marker = prefix + b"after"
            value = b"x" * 700_000 if scenario == "large_value" else b"v"
            if scenario != "compacted":
                admin.put(marker, value)
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()

            def done(ls) -> bool:
                new = ls[n_before:]
                if scenario == "compacted":
                    return any(x["kind"] in ("error", "event") for x in new)
                return any(x["kind"] == "event" and x["key"].endswith("after") for x in new) or any(
                    x["kind"] == "error" for x in new)
            pump(t0 + DEADLINE, done)
            waited = time.monotonic() - t0
            cpu = _cpu_seconds(proc.pid) - cpu0
            new = lines[n_before:]
            if scenario == "compacted":
                errs = [x for x in new if x["kind"] == "error"]
                got = "error" if errs else ("event" if new else "silent")
                detail = errs[0]["detail"] if errs else (new[:2] if new else "no event, no error")
            else:
                evs = [x for x in new if x["kind"] == "event" and x["key"].endswith("after")]
                errs = [x for x in new if x["kind"] == "error"]
                if evs:
                    got = "event" if (scenario != "large_value" or evs[0]["length"] == 700_000) else "fail"
                    detail = f"after {waited:.2f}s, {evs[0]['length']} bytes"
                elif errs:
                    got, detail = "error", errs[0]["detail"]
                else:
                    got, detail = "silent", f"nothing in {DEADLINE:.0f}s"
            outcome.update(outcome=got, detail=detail, waited_s=round(waited, 2),
                           cpu_during_wait_s=round(cpu, 2))
            return outcome
        finally:
            if frozen and cluster.members[0].proc is not None:
                cluster.members[0].proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=5)
            proc.stdout.close()
            admin.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rdmapool bench etcd_clients")
    ap.add_argument("--python-for-grpc", default=os.environ.get("ETCD_CLIENTS_PYTHON", "/tmp/etcdclients-venv/bin/python"),
                    help="interpreter that has etcd3 and aetcd installed")
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for client in args.clients.split(","):
        python = sys.executable if client in ("ours", "etcd3gw") else args.python_for_grpc
        for scenario in args.scenarios.split(","):
            if not Path(python).exists():
                r = {"client": client, "scenario": scenario, "outcome": "not_run", "detail": f"no {python}"}
            else:
                r = run_one(client, scenario, python)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    doc = {"bench": "etcd_clients", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": platform.node(), "etcd": subprocess.run(["etcd", "--version"], capture_output=True,
                                                               text=True).stdout.split("\n")[0],
           "results": results}
    if args.record:
        out = REPO / "bench" / "results" / f"etcd_clients-{datetime.now(UTC):%Y%m%d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        _, _, client, scenario, eps, prefix, start = sys.argv
        probe(client, scenario, eps.split(","), prefix.encode(), int(start))
    else:
        sys.exit(main(sys.argv[1:]))
