"""An arm64 board, emulated: `tools/arm64_agent.py` builds (or reuses) an arm64 Debian chroot with
qemu-user-static, pip installs the README's aarch64 torch pins and the project in it, and runs
`nmoe agent` there in a toy run on this host's broker. Opt-in (NMOE_ARM64=1, root, Debian; slow:
the first run debootstraps and pip installs under emulation, tens of minutes; later runs reuse the
chroot, minutes)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import needs_mosquitto

ROOT = Path(__file__).resolve().parents[1]


def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("arm64_agent", ROOT / "tools" / "arm64_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_aarch64_pins_are_read_from_the_makefile():
    pins = tool().torch_pins()
    assert [p.split("==")[0] for p in pins] == ["torch", "torchvision"]
    assert all(p.split("==")[1][0].isdigit() for p in pins)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/mounts")
def test_mounts_under_finds_mount_points_below_a_path_and_nothing_in_a_plain_folder(tmp_path):
    assert "/proc" in tool().mounts_under(Path("/proc"))
    assert tool().mounts_under(tmp_path) == []


def _why_not() -> str | None:
    if os.environ.get("NMOE_ARM64") != "1":
        return "opt-in: set NMOE_ARM64=1 (debootstraps an arm64 Debian under qemu, tens of minutes the first time)"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (binfmt_misc, debootstrap, chroot)"
    tools = ("debootstrap", "qemu-aarch64-static", "update-binfmts")
    if platform.machine() != "aarch64" and any(shutil.which(t) is None for t in tools) and not shutil.which("apt-get"):
        return "needs debootstrap, qemu-user-static and binfmt-support, or apt-get to install them"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
@needs_mosquitto
def test_an_arm64_agent_joins_a_run_and_finishes(tmp_path):
    why = _why_not()
    if why:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "arm64_agent.py"), "--keep", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=3 * 3600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    figures = dict(kv.split("=", 1) for kv in proc.stdout.strip().splitlines()[-1].split())
    assert figures["arm64_agent_ok"] == "1", output[-4000:]
    assert figures["uname_m"] == "aarch64"
    pins = dict(p.split("==") for p in tool().torch_pins())  # the Makefile's aarch64 pins
    assert figures["torch"].split("+")[0] == pins["torch"]
    assert figures["torchvision"].split("+")[0] == pins["torchvision"]
    log = (tmp_path / "run" / "arm64-logs" / "client-0-aarch64.log").read_text()
    assert "Traceback" not in log, log[-3000:]
