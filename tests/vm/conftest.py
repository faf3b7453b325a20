"""Fixtures of the rxe VM tests: boot the cached QEMU image (scripts/vm/) and run a job in it.

These tests run in CI. They are skipped only where the VM cannot exist at all (no qemu-system-x86_64; or no
cached image and no way to build one: not root, no debootstrap); anything else that breaks is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VM = ROOT / "scripts" / "vm"
CACHE = Path(os.environ.get("RDMAPOOL_VM_CACHE", Path.home() / ".cache" / "rdmapool" / "rxe-vm"))


def vm_unavailable() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)"
    if not (CACHE / "rootfs.img").is_file():
        if os.geteuid() != 0:
            return f"no cached rxe VM image in {CACHE} and building one needs root (debootstrap, chroot)"
        if shutil.which("debootstrap") is None:
            return "no cached rxe VM image and debootstrap is not installed (scripts/setup.sh installs it)"
    return None


@dataclass(frozen=True)
class VmRun:
    rc: int
    job: Path
    output: str
    guest_log: str

    def describe(self) -> str:
        console = (self.job / "console.log").read_text(errors="replace")[-3000:] if (self.job / "console.log").exists() else ""
        return (f"exit {self.rc}\n--- guest.log\n{self.guest_log}\n--- output.log (tail)\n{self.output[-6000:]}"
                f"\n--- console (tail)\n{console}")


_started: list[subprocess.Popen] = []


def run_vm(job: Path, script: str, *, timeout: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    job.mkdir(parents=True, exist_ok=True)
    (job / "cmd.sh").write_text(script)
    proc = subprocess.Popen(["bash", str(VM / "run.sh"), "--timeout", str(timeout), *extra, str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM makes run.sh stop its QEMU (see its trap); SIGKILL if that does not end it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(autouse=True)
def _no_leaked_vms():
    yield
    while _started:
        stop(_started.pop())


def finish(proc: subprocess.Popen, job: Path, timeout: int) -> VmRun:
    try:
        proc.communicate(timeout=timeout + 180)
    except subprocess.TimeoutExpired:
        stop(proc)
    read = lambda name: (job / name).read_text(errors="replace") if (job / name).exists() else ""  # noqa: E731
    return VmRun(proc.returncode, job, read("output.log"), read("guest.log"))


def junit_summary(path: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """(totals, failed test names, skipped test names) of a pytest junit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        if case.find("skipped") is not None:
            skipped.append(name)
    return totals, failed, skipped


@pytest.fixture(scope="session")
def vm_image() -> Path:
    reason = vm_unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(VM / "build-image.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"building the rxe VM image failed:\n{proc.stderr[-4000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])
