"""Real soft-RoCE in CI: boot the QEMU VM, bring up rxe0, and run the transport conformance suite against the
verbs backend inside it; the junit result comes back through the 9p job folder and counts here."""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.vm.conftest import finish, junit_summary, run_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SUITE = """set -u
export RDMAPOOL_TIMEOUT_SCALE=4  # TCG on a shared 2-core host: see rdmapool.transport.verbs_conn.timeout_scale
# rxe under TCG loses packets (sent 740242, received 734274 in one run): retry each loss after 134 ms, not 537 ms
# (rdmapool.transport.verbs_conn.default_ack_timeout)
export RDMAPOOL_VERBS_ACK_TIMEOUT=15
# the host scripts, for real: tear rxe0 down and bring it back up
bash scripts/rxe-teardown.sh rxe0 && bash scripts/rxe-setup.sh ens3 rxe0 || exit 4
bash scripts/verbs-checks.sh smoke || exit 3
bash scripts/verbs-checks.sh conformance --junit /mnt/job/junit.xml; rc=$?
# rxe's own counters (retries, sequence errors, duplicates), so a failure's report says what the device saw
echo "rxe0 counters: $(cd /sys/class/infiniband/rxe0/ports/1/hw_counters 2>/dev/null && grep -H . * | tr '\n' ' ')"
exit $rc
"""


#: what a verbs test failing only because rxe stalled looks like: no completion until the endpoint's software
#: watchdog fired (RETRY_EXC_ERR, "no progress for ...s"). rxe in the guest's 6.1 kernel does this now and then
#: under TCG, always on a READ batch right after a 2 MiB READ: rxe kept retrying (63 and 147 retries counted) and
#: lost ~6000 packets, where a passing run loses ~150 (docs/verbs.md). Such a test runs once more in a fresh VM.
STALL_MARKS = ("RETRY_EXC_ERR", "no progress for")

RERUN = """set -u
export RDMAPOOL_TIMEOUT_SCALE=4 RDMAPOOL_VERBS_ACK_TIMEOUT=15
python3 -m pytest -p no:cacheprovider -q -o addopts='' --timeout 600 --junitxml=/mnt/job/junit.xml {ids}
"""


def stalls_and_failures(junit: Path) -> tuple[list[str], list[str]]:
    """(pytest ids of the tests that failed only by an rxe stall, names of every other failure)."""
    stalls, others = [], []
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        text = (bad.get("message") or "") + (bad.text or "")
        path = case.get("classname", "").replace(".", "/") + ".py"
        if case.find("failure") is not None and all(mark in text for mark in STALL_MARKS):
            stalls.append(f"{path}::{case.get('name')}")
        else:
            others.append(f"{case.get('classname')}::{case.get('name')}")
    return stalls, others


@pytest.mark.timeout(1200)
def test_conformance_suite_against_verbs_on_rxe(vm_image, tmp_path):
    job = tmp_path / "job"
    run = finish(run_vm(job, SUITE, timeout=540), job, 540)
    assert "rxe0" in run.guest_log, f"rxe0 did not come up in the guest:\n{run.describe()}"
    assert (job / "junit.xml").exists(), f"the guest produced no junit result:\n{run.describe()}"
    totals, _, skipped = junit_summary(job / "junit.xml")
    stalls, others = stalls_and_failures(job / "junit.xml")
    assert not others, f"verbs conformance failures in the VM: {others}\n{run.describe()}"
    assert not skipped, f"verbs tests skipped inside the VM (the device should be there): {skipped}\n{run.output[-3000:]}"
    assert totals["tests"] >= 20, totals  # the whole suite ran, not a subset
    assert run.rc == 0 or (stalls and run.rc == 1), run.describe()
    assert "byte-exact True" in run.output
    assert "rxe-teardown: removed rxe0" in run.output and "rxe-setup: rxe0 on ens3" in run.output, run.output[:2000]
    if stalls:  # rxe stalled: the same tests, once more, in a fresh VM, must pass
        again = tmp_path / "rerun"
        rerun = finish(run_vm(again, RERUN.format(ids=" ".join(stalls)), timeout=300), again, 300)
        assert (again / "junit.xml").exists(), f"the rerun produced no junit result:\n{rerun.describe()}"
        _, failed_again, _ = junit_summary(again / "junit.xml")
        assert not failed_again and rerun.rc == 0, f"failed again after an rxe stall: {failed_again}\n{rerun.describe()}"
        counters = next((line for line in run.output.splitlines() if line.startswith("rxe0 counters")), "")
        warnings.warn(f"rxe stalled in {stalls} (watchdog: no completion); passed when run again in a fresh VM. "
                      f"{counters}", stacklevel=1)


def test_a_stall_is_told_apart_from_other_failures(tmp_path):
    """Only a failure that is an rxe stall caught by the watchdog earns a rerun; errors and other failures do not."""
    junit = tmp_path / "junit.xml"
    junit.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.transport.test_transport_conformance" name="test_a[verbs]">
  <failure message="assert not [Completion(wr_id=8, status=&lt;WcStatus.RETRY_EXC_ERR: 12&gt;, detail='no progress for...">
  </failure></testcase>
<testcase classname="tests.transport.test_transport_conformance" name="test_b[verbs]">
  <failure message="assert b'x' == b'y'">wrong bytes</failure></testcase>
<testcase classname="tests.transport.test_transport_conformance" name="test_c[verbs]">
  <error message="RETRY_EXC_ERR no progress for 20s in a fixture"/></testcase>
<testcase classname="tests.transport.test_transport_conformance" name="test_d[verbs]"/>
</testsuite></testsuites>""")
    stalls, others = stalls_and_failures(junit)
    assert stalls == ["tests/transport/test_transport_conformance.py::test_a[verbs]"]
    assert others == ["tests.transport.test_transport_conformance::test_b[verbs]",
                      "tests.transport.test_transport_conformance::test_c[verbs]"]
