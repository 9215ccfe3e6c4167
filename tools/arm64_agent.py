"""An arm64 board, emulated: `nmoe agent` from an arm64 Debian userland joins a run on this host.

The README says the agents run on Raspberry Pi boards (aarch64). This tool checks it without a board,
as a user would set one up, on an x86_64 Debian host as root:

1. installs Debian's ``debootstrap``, ``qemu-user-static`` and ``binfmt-support`` if missing, mounts
   ``binfmt_misc`` if needed and enables the ``qemu-aarch64`` handler (the kernel then runs arm64
   binaries through qemu, also inside a chroot: the handler has the F flag);
2. debootstraps an arm64 Debian of this host's suite (``/etc/os-release``) with python3 into
   ``CACHE/rootfs`` (default ``/var/cache/nmoe-arm64``; reused on later runs);
3. in it, creates a venv and ``pip install``s the Makefile's aarch64 torch pins from PyPI and this
   repository (a copy of its tracked and untracked, not ignored files, in ``/opt/nmoe``, installed
   editable; reinstalled when ``pyproject.toml`` or the pins change, the copy refreshed every run);
4. starts a toy run on this host (``nmoe run toy.yaml --agents external``: mosquitto and the
   coordinator, x86_64) and runs ``nmoe agent`` in the arm64 chroot (emulated) for the first
   ``--arm64-clients`` clients, natively for the others, and checks that the run finishes with every
   client's results and that every agent exited 0.

The chroot's mounts (/proc, /dev, /sys) live in a private mount namespace (``unshare --mount``) and vanish
with the process. The chroot shares this host's network, so the agents reach the broker on loopback.

    sudo .venv/bin/python tools/arm64_agent.py [--cache DIR] [--arm64-clients N] [--clients N] [--keep RUN_DIR]

Prints what it does and, last, ``key=value`` figures: ``arm64_agent_ok=1 uname_m=aarch64 torch=...``
with the seconds each step took. Exit status 0 only when everything passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
NMOE = [sys.executable, "-m", "scenarios.cli"]
VENV = "/opt/nmoe-venv"  # inside the chroot
SRC = "/opt/nmoe"  # inside the chroot
SCENARIO = """\
name: arm64
seed: 5
clients: {clients}
threads: 1
data: {{name: synthetic, synthetic_train: 1000}}
partition: {{kind: noniid, tau: 0.5, train_per_client: 48, test_per_client: 24}}
model: {{head_hidden: 16, gate_hidden: 8}}
stage1: {{method: fedce, rounds: 1, batch_size: 16}}
stage2: {{epochs: 1}}
stage3: {{rounds: 1, local_epochs: 1}}
baselines: []
network: {{join_timeout_s: 900, round_timeout_s: 900, stage2_timeout_s: 900, eval_timeout_s: 900,
          inference_deadline_s: 120, coordinator_grace_s: 120}}
"""


class Failed(Exception):
    """A step that cannot go on, with what to do about it."""


def say(msg: str) -> None:
    print(f"[arm64] {msg}", flush=True)


def run(cmd: list[str], *, timeout: float, log: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; its output goes to ``log`` (appended) or is captured; a failure names the command."""
    try:
        if log is not None:
            with log.open("a") as fh:
                fh.write(f"\n$ {shlex.join(cmd)}\n")
                fh.flush()
                proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise Failed(f"`{shlex.join(cmd)}` took over {timeout:.0f} s" + (f" (see {log})" if log else "")) from err
    if check and proc.returncode != 0:
        where = f"see {log}" if log else (proc.stdout + proc.stderr).strip()[-2000:]
        raise Failed(f"`{shlex.join(cmd)}` exited {proc.returncode}: {where}")
    return proc


def os_release() -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value.strip().strip('"')
    return fields


def torch_pins() -> list[str]:
    """The Makefile's aarch64 pins (the one place they are written)."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"ifeq \(\$\(ARCH\),aarch64\)\s*\nTORCH_PINS\s*=\s*(.+)\n", text)
    if m is None:
        raise Failed("Makefile: no `TORCH_PINS = ...` under `ifeq ($(ARCH),aarch64)`")
    return m.group(1).split()


# -- 1. the emulator -------------------------------------------------------------------------------

def ensure_tools(log: Path) -> None:
    missing = [pkg for pkg, exe in (("debootstrap", "debootstrap"), ("qemu-user-static", "qemu-aarch64-static"),
                                    ("binfmt-support", "update-binfmts")) if shutil.which(exe) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise Failed(f"missing {', '.join(missing)} and no apt-get to install them")
    say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "install", "-y", "-q", *missing], timeout=900, log=log, env=env)


def ensure_binfmt(log: Path) -> str:
    """Make the kernel run aarch64 ELF files through qemu; returns the handler's flags."""
    if platform.machine() == "aarch64":
        return "native"
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        say("mounting binfmt_misc")
        proc = run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(misc)], timeout=30, log=log, check=False)
        if proc.returncode != 0:
            raise Failed("cannot mount binfmt_misc here (a container without CAP_SYS_ADMIN?). Without it the "
                         "kernel cannot run arm64 binaries: debootstrap's second stage and every program pip and "
                         "python start inside the chroot are exec'd by the kernel, which qemu-aarch64-static run "
                         "by hand does not intercept. Run this on a host (or VM) where binfmt_misc can be mounted.")
    handler = misc / "qemu-aarch64"
    if not handler.exists() or "enabled" not in handler.read_text():
        say("enabling the qemu-aarch64 binfmt handler")
        run(["update-binfmts", "--enable", "qemu-aarch64"], timeout=30, log=log)
    if not handler.exists():
        raise Failed(f"{handler} is missing after `update-binfmts --enable qemu-aarch64`")
    text = handler.read_text()
    flags = re.search(r"^flags: *(\S*)", text, re.MULTILINE)
    if "enabled" not in text or flags is None or "F" not in flags.group(1):
        raise Failed(f"{handler}: want an enabled handler with the F flag (to work in a chroot), got:\n{text}")
    return flags.group(1)


# -- 2. the arm64 userland -------------------------------------------------------------------------

def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace (/proc/self/mounts, octal escapes)."""
    root = os.path.realpath(path)
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
        if point == root or point.startswith(root + "/"):
            points.append(point)
    return points


def ensure_rootfs(cache: Path, suite: str, mirror: str, log: Path) -> tuple[Path, float]:
    """Debootstrap once into ``cache/rootfs`` (built aside and renamed, so a half-built one is never used)."""
    rootfs = cache / "rootfs"
    if (rootfs / ".nmoe-rootfs-ok").is_file():
        return rootfs, 0.0
    building = cache / "rootfs.tmp"
    if building.exists():
        left = mounts_under(building)  # a killed debootstrap can leave /proc, /sys or a bind of /dev mounted there
        if left:
            raise Failed(f"{building} (an interrupted debootstrap) still has mounts: {', '.join(left)}; "
                         "unmount them (umount -R) and run again")
        say(f"removing {building}, left by an interrupted debootstrap")
        shutil.rmtree(building)
    say(f"debootstrap --arch=arm64 {suite} into {rootfs} (emulated second stage: many minutes; log {log})")
    t0 = time.monotonic()
    run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,python3-pip,"
         "ca-certificates", suite, str(building), mirror], timeout=7200, log=log)
    (building / ".nmoe-rootfs-ok").write_text(f"{suite} {mirror}\n")
    building.rename(rootfs)
    return rootfs, time.monotonic() - t0


def chroot_cmd(rootfs: Path, argv: list[str]) -> list[str]:
    """``argv`` inside the chroot, with /proc, /dev and /sys mounted in a private mount namespace (torch's
    cpuinfo reads /sys/devices/system/cpu). Run it with ``chroot_env``."""
    r = shlex.quote(str(rootfs))
    setup = (f"mount -t proc proc {r}/proc && mount --bind /dev {r}/dev && mount --bind /sys {r}/sys && "
             f"cp -L /etc/resolv.conf {r}/etc/resolv.conf && exec chroot {r} \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup, "sh", *argv]


def chroot_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a command in the chroot (nothing of this host's; secrets such as the
    broker password travel here, not on a command line other users can read in /proc)."""
    path = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the chroot's, and the host's
    return {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", **(extra or {})}


def copy_source(rootfs: Path) -> None:
    """This repository's tracked and untracked, not ignored files into the chroot's /opt/nmoe."""
    listed = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], timeout=60)
    dest = rootfs / SRC.lstrip("/")
    if dest.exists():
        shutil.rmtree(dest)
    for rel in filter(None, listed.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip is told to trust (``$PIP_CERT``, ``$REQUESTS_CA_BUNDLE``,
    ``$SSL_CERT_FILE``), if any: a network behind a TLS-inspecting proxy needs it inside the chroot too,
    where pip otherwise trusts only its own certifi bundle."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return None


def ensure_venv(rootfs: Path, pins: list[str], ca_bundle: Path | None, log: Path) -> tuple[float, bool]:
    """A venv with the pins and the project (editable); returns (seconds, whether it was reused)."""
    want = hashlib.sha256(((ROOT / "pyproject.toml").read_text() + " ".join(pins)).encode()).hexdigest()
    stamp = rootfs / VENV.lstrip("/") / ".nmoe-installed"
    copy_source(rootfs)
    if stamp.is_file() and stamp.read_text().strip() == want:
        return 0.0, True
    t0 = time.monotonic()
    say(f"pip install {' '.join(pins)} and the project in the arm64 venv (emulated; log {log})")
    if not (rootfs / VENV.lstrip("/") / "bin" / "python").exists():
        run(chroot_cmd(rootfs, ["/usr/bin/python3", "-m", "venv", VENV]), timeout=600, log=log, env=chroot_env())
    env = chroot_env()
    if ca_bundle is not None:
        shutil.copy(ca_bundle, rootfs / "etc" / "ssl" / "nmoe-host-ca.pem")
        env["PIP_CERT"] = "/etc/ssl/nmoe-host-ca.pem"
    pip = ["python", "-m", "pip", "install", "--progress-bar", "off"]
    run(chroot_cmd(rootfs, [*pip, "--upgrade", "pip"]), timeout=1800, log=log, env=env)
    run(chroot_cmd(rootfs, [*pip, *pins]), timeout=3600, log=log, env=env)
    run(chroot_cmd(rootfs, [*pip, "-e", SRC]), timeout=3600, log=log, env=env)
    stamp.write_text(want + "\n")
    return time.monotonic() - t0, False


def probe(rootfs: Path) -> dict[str, str]:
    """What the chroot is: machine, python, torch and torchvision versions (imported there)."""
    code = ("import json, platform, torch, torchvision, agents; print(json.dumps({'uname_m': platform.machine(), "
            "'python': platform.python_version(), 'torch': torch.__version__, 'torchvision': torchvision.__version__, "
            "'agents': agents.__file__}))")
    out = run(chroot_cmd(rootfs, ["python", "-c", code]), timeout=900, env=chroot_env()).stdout.strip().splitlines()[-1]
    info: dict[str, str] = json.loads(out)
    info["uname_m_kernel"] = run(chroot_cmd(rootfs, ["uname", "-m"]), timeout=120, env=chroot_env()).stdout.strip()
    return info


# -- 3. the run ------------------------------------------------------------------------------------

def tails(agents: list[tuple[str, subprocess.Popen[bytes], Path]], chars: int = 1500) -> str:
    """The end of every agent's log, for an error message."""
    return "".join(f"\n--- {log} (end) ---\n{log.read_text(errors='replace')[-chars:]}" for _, _, log in agents)


def toy_run(rootfs: Path, out: Path, clients: int, arm64_clients: int, timeout: float) -> tuple[float, float]:
    """A run on this host with external agents, ``arm64_clients`` of them in the chroot: (seconds, accuracy)."""
    scenario = out.parent / "arm64.yaml"
    scenario.write_text(SCENARIO.format(clients=clients))
    coordinator = subprocess.Popen([*NMOE, "run", str(scenario), "--agents", "external", "--out", str(out)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agents: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    t0 = time.monotonic()
    try:
        while not (out / "agents.txt").is_file():
            if coordinator.poll() is not None:
                raise Failed(f"the coordinator exited {coordinator.returncode} before writing agents.txt:\n"
                             f"{coordinator.stdout.read() if coordinator.stdout else ''}")
            if time.monotonic() - t0 > 300:
                raise Failed("the coordinator wrote no agents.txt within 300 s")
            time.sleep(0.2)
        lines = [x for x in (out / "agents.txt").read_text().splitlines() if x.startswith("NMOE_BROKER_PASSWORD")]
        if len(lines) != clients:
            raise Failed(f"agents.txt has {len(lines)} agent lines, expected {clients}")
        logs = out / "arm64-logs"
        logs.mkdir()
        (rootfs / "tmp" / "nmoe-run").mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "scenario.yaml", rootfs / "tmp" / "nmoe-run" / "scenario.yaml")
        for i, line in enumerate(lines):
            m = re.match(r"NMOE_BROKER_PASSWORD='([^']*)' .*--id (\S+) --run-id (\S+) .*--broker "
                         r"'mqtt://[^@]+@<this-host>:(\d+)'", line)
            if m is None:
                raise Failed(f"agents.txt: unexpected line {line.split(' ', 1)[1]!r}")
            password, agent, run_id, port = m.groups()
            arm = i < arm64_clients
            args = ["agent", "--id", agent, "--run-id", run_id, "--broker", f"mqtt://{agent}@127.0.0.1:{port}"]
            if arm:
                cmd = chroot_cmd(rootfs, ["nmoe", *args, "--scenario", "/tmp/nmoe-run/scenario.yaml"])
                env = chroot_env({"NMOE_BROKER_PASSWORD": password})
            else:
                cmd = [*NMOE, *args, "--scenario", str(out / "scenario.yaml")]
                env = {**os.environ, "NMOE_BROKER_PASSWORD": password}
            log = logs / f"{agent}-{'aarch64' if arm else platform.machine()}.log"
            with log.open("wb") as fh:
                agents.append((agent, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT),
                               log))
            say(f"{agent}: {'arm64 chroot (emulated)' if arm else 'native'}, log {log}")
        try:
            output, _ = coordinator.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise Failed(f"the run did not finish within {timeout:.0f} s (agent logs in {logs})") from err
        run_s = time.monotonic() - t0
        if coordinator.returncode != 0:
            raise Failed(f"the coordinator exited {coordinator.returncode}:\n{output[-3000:]}{tails(agents)}")
        codes = {}
        for agent, proc, log in agents:
            try:
                codes[agent] = proc.wait(120)  # they leave when the coordinator says shutdown
            except subprocess.TimeoutExpired as err:
                raise Failed(f"{agent} did not exit after the run ended (log {log})") from err
        expected = list(codes)
        bad = {a: c for a, c in codes.items() if c != 0}
        if bad:
            raise Failed(f"agents exited non-zero: {bad}{tails(agents)}")
        results = json.loads((out / "results.json").read_text())
        nmoe = results["methods"]["nmoe"]
        scored = sorted(nmoe["per_client"], key=int)  # client indices, as strings
        if scored != [str(i) for i in range(clients)]:
            raise Failed(f"results.json: nmoe has results of clients {scored}, expected 0..{clients - 1}")
        for step in results["rounds"]:  # every step of every stage answered by every client
            if sorted(step["answered"]) != sorted(expected) or step["failures"]:
                raise Failed(f"results.json: {step['stage']} round {step['round']} ({step['op']}): answered "
                             f"{step['answered']}, failures {step['failures']}")
        return run_s, float(nmoe["accuracy"])
    finally:
        for _, proc, _ in agents:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        if coordinator.poll() is None:
            coordinator.terminate()  # it stops its broker by PID
            try:
                coordinator.wait(60)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("NMOE_ARM64_CACHE", "/var/cache/nmoe-arm64")),
                    help="where the arm64 rootfs lives (reused; default /var/cache/nmoe-arm64 or $NMOE_ARM64_CACHE)")
    ap.add_argument("--suite", help="Debian suite (default: this host's VERSION_CODENAME)")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    ap.add_argument("--ca-bundle", type=Path, help="CA bundle pip trusts in the chroot (default: this host's "
                    "$PIP_CERT, $REQUESTS_CA_BUNDLE or $SSL_CERT_FILE, if set; else pip's own)")
    ap.add_argument("--clients", type=int, default=2, help="clients in the toy run (default 2)")
    ap.add_argument("--arm64-clients", type=int, default=1, help="of them, how many run in the arm64 chroot (1)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds the toy run may take (default 3600)")
    ap.add_argument("--keep", type=Path, help="write the run folder here (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if not 1 <= args.arm64_clients <= args.clients <= 10:
        ap.error("want 1 <= --arm64-clients <= --clients <= 10")
    t_start = time.monotonic()
    try:
        if sys.platform != "linux" or os.geteuid() != 0:
            raise Failed("needs root on Linux (apt-get, binfmt_misc, debootstrap, chroot)")
        release = os_release()
        if release.get("ID") != "debian" and not args.suite:
            raise Failed(f"this host is {release.get('PRETTY_NAME')}, not Debian: pass --suite (e.g. bookworm)")
        suite = args.suite or release["VERSION_CODENAME"]
        args.cache.mkdir(parents=True, exist_ok=True)
        log = args.cache / "setup.log"
        pins = torch_pins()
        ensure_tools(log)
        flags = ensure_binfmt(log)
        rootfs, debootstrap_s = ensure_rootfs(args.cache, suite, args.mirror, log)
        ca_bundle = args.ca_bundle if args.ca_bundle is not None else host_ca_bundle()
        pip_s, reused = ensure_venv(rootfs, pins, ca_bundle, log)
        t_probe = time.monotonic()
        info = probe(rootfs)
        probe_s = time.monotonic() - t_probe
        say(f"chroot: {info['uname_m']} python {info['python']} torch {info['torch']} "
            f"torchvision {info['torchvision']} (nmoe from {info['agents']})")
        if info["uname_m"] != "aarch64" or info["uname_m_kernel"] != "aarch64":
            raise Failed(f"the chroot is not aarch64: {info}")
        with tempfile.TemporaryDirectory(prefix="nmoe-arm64-") as tmp:
            out = args.keep or Path(tmp) / "run"
            out.parent.mkdir(parents=True, exist_ok=True)
            say(f"toy run: {args.clients} clients, {args.arm64_clients} of them arm64, in {out}")
            run_s, accuracy = toy_run(rootfs, out, args.clients, args.arm64_clients, args.timeout)
    except Failed as err:
        print(f"error: {err}", file=sys.stderr)
        print(f"arm64_agent_ok=0 wall_s={time.monotonic() - t_start:.0f}")
        return 1
    table = Table(title="arm64 agent", title_justify="left")
    for col in ("step", "seconds", ""):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    table.add_row("debootstrap", f"{debootstrap_s:.0f}", "reused" if debootstrap_s == 0 else f"arm64 {suite}")
    table.add_row("pip install", f"{pip_s:.0f}", "reused" if reused else " ".join(pins) + " + nmoe")
    table.add_row("import torch", f"{probe_s:.0f}",
                  f"{info['uname_m']}, python {info['python']}, torch {info['torch']}")
    table.add_row("toy run", f"{run_s:.0f}", f"{args.arm64_clients} of {args.clients} clients in the chroot")
    Console().print(table)
    print(f"arm64_agent_ok=1 uname_m={info['uname_m']} python={info['python']} torch={info['torch']} "
          f"torchvision={info['torchvision']} suite={suite} binfmt_flags={flags} arm64_clients={args.arm64_clients} "
          f"clients={args.clients} debootstrap_s={debootstrap_s:.0f} pip_s={pip_s:.0f} venv_reused={int(reused)} "
          f"probe_s={probe_s:.0f} "
          f"run_s={run_s:.0f} accuracy={accuracy:.3f} "
          f"wall_s={time.monotonic() - t_start:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
