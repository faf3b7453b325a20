"""A memory server and a client as separate processes in two VMs joined by QEMU socket networking: two kernels,
two rxe devices, RoCE v2 over a virtual wire. The client puts blocks into the server's pool and reads them back
one-sided over verbs (scripts/vm/pool_check.py) on two queue pairs; the verbs connection info travels over the server's control
protocol (Transport.accept / connect(exchange=...))."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.vm.conftest import finish, run_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PRELUDE = """set -u
export RDMAPOOL_TIMEOUT_SCALE=4
mkdir -p /tmp/x && mount -t 9p -o trans=virtio,version=9p2000.L xchg /tmp/x || exit 5
"""

SERVER = PRELUDE + """python3 -m rdmapool server --listen 10.9.0.1:7400 --transport verbs \\
    --tenant demo:vm-test-token:64MiB >/mnt/job/server.out 2>/mnt/job/server.err &
pid=$!
i=0
while [ ! -f /tmp/x/client.done ] && [ $i -lt 420 ] && kill -0 $pid 2>/dev/null; do sleep 1; i=$((i+1)); done
kill -TERM $pid 2>/dev/null
wait $pid
rc=$?
echo "server exit $rc"
exit $rc
"""

CLIENT = PRELUDE + """python3 scripts/vm/pool_check.py --servers 10.9.0.1:7400 --token vm-test-token --wait 300 \\
    >/mnt/job/pool.json
rc=$?
touch /tmp/x/client.done
exit $rc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_memory_server_and_client_in_two_vms_over_rxe(vm_image, tmp_path):
    xchg = tmp_path / "xchg"
    xchg.mkdir()
    port = free_port()
    common = ("--smp", "1", "--mem", "1536", "--share", str(xchg))
    server = run_vm(tmp_path / "server", SERVER, timeout=480,
                    extra=(*common, "--ip", "10.9.0.1/24", "--net", f"listen:{port}", "--mac", "52:54:00:00:09:01"))
    time.sleep(2.0)  # the connecting QEMU needs the listening one
    client = run_vm(tmp_path / "client", CLIENT, timeout=480,
                    extra=(*common, "--ip", "10.9.0.2/24", "--net", f"connect:{port}", "--mac", "52:54:00:00:09:02"))
    c = finish(client, tmp_path / "client", 480)
    (xchg / "client.done").touch()  # releases the server VM even when the client VM died early
    s = finish(server, tmp_path / "server", 480)
    pool = tmp_path / "client" / "pool.json"
    assert pool.exists() and pool.read_text().strip(), f"client produced no report\n{c.describe()}\n{s.describe()}"
    report = json.loads(pool.read_text().strip().splitlines()[-1])
    print("pool client over verbs across two VMs:", report)
    server_out = (tmp_path / "server" / "server.out").read_text()
    assert report["ok"], f"{report}\n{c.describe()}\n--- server\n{s.describe()}"
    assert report["transport"] == "verbs" and report["device"] == "rxe0"
    # the client holds two or more queue pairs to the server (issue 5) and spreads requests over all of them
    (qps,) = report["wrs_per_qp"]
    assert len(qps) >= 2 and all(qps), report
    assert '"ready": true' in server_out and '"transport": "verbs"' in server_out, server_out
    assert c.rc == 0 and s.rc == 0, f"client {c.rc}, server {s.rc}\n{s.describe()}"
