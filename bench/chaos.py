"""Chaos soak: a networked run during which agents are killed and restarted, the broker is killed and
restarted, and garbage is injected, on a schedule.

    python bench/chaos.py [--quick] [--rounds N] [--out DIR]

It plays the operator of an external broker: it starts mosquitto itself (its own accounts, given to
the run with ``--broker-accounts``), runs a toy scenario with subprocess agents (``nmoe run
--broker ...``), and meanwhile, counting each as a fault:

- every ``--garbage-every`` seconds, malformed frames from an extra account (``client-9``) into the
  coordinator's and every client's inbox;
- in Stage 1 round 1, the run SIGKILLs ``client-2`` (``network.faults``); as soon as its status says
  offline, chaos starts a replacement ``nmoe agent --id client-2``, which rejoins;
- every ``--broker-every`` seconds after the clients joined, mosquitto is SIGKILLed and, a second
  later, started again on the same port with the same accounts.

``answers_lost`` counts answers of clients that were there (online) that never reached the
coordinator: failures recorded as ``missing`` (a killed agent's ``offline`` is the fault itself).
Faults are counted one per garbage frame, agent kill and broker restart. The last line printed
is ``faults=N answers_lost=M run_ok=0|1``; M must be 0 (the exit status is 1 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.codec import client_name  # noqa: E402
from broker.auth import Account, Role, make_accounts, new_password  # noqa: E402
from broker.lifetime import dying_with  # noqa: E402
from broker.mqtt import Connection, ConnectionOptions  # noqa: E402
from broker.server import MosquittoBroker  # noqa: E402
from broker.topics import Kind, Topics  # noqa: E402
from nmoe.errors import NmoeError  # noqa: E402
from scenarios.networked import run_networked  # noqa: E402
from scenarios.runner import set_threads  # noqa: E402
from scenarios.scenario import load_scenario  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN = "chaos"
INTRUDER = "client-9"
SCENARIO = """
name: chaos
seed: 3
clients: 3
threads: 1
data: {name: synthetic, synthetic_train: 2000}
partition: {kind: noniid, tau: 0.5, train_per_client: 96, test_per_client: 48}
model: {head_hidden: 16, gate_hidden: 8}
stage1: {method: fedce, rounds: ROUNDS, batch_size: 32, local_epochs: 4}
stage2: {epochs: 2}
stage3: {rounds: 2, local_epochs: 1}
network:
  join_timeout_s: 90
  round_timeout_s: 60
  inference_deadline_s: 5
  min_clients: 2
  agent_threads: 1
  faults: [{client: client-2, op: stage1_fit, round: 1, after_s: 0.3}]
"""
GARBAGE = [b"hello", b"NMOE\x01", b"NMOE" + b"\x00" * 60, b"", b"\xff" * 300]


class Chaos:
    def __init__(self, mosq: MosquittoBroker, out: Path, garbage_every_s: float, broker_every_s: float) -> None:
        self.mosq, self.out = mosq, out
        self.garbage_every_s, self.broker_every_s = garbage_every_s, broker_every_s
        self.topics = Topics(RUN)
        self.faults: dict[str, int] = {"garbage": 0, "agent_kill": 0, "broker_restart": 0}
        self.status: dict[str, str] = {}
        self.replacements: list[subprocess.Popen[bytes]] = []

    def _on_status(self, message: aiomqtt.Message) -> None:
        agent = message.topic.value.rsplit("/", 1)[1]
        payload = message.payload if isinstance(message.payload, bytes) else b""
        before, self.status[agent] = self.status.get(agent), payload.decode(errors="replace")
        if agent == "client-2" and before == "online" and self.status[agent] == "offline" and not self.replacements:
            self.faults["agent_kill"] += 1
            self._restart_agent("client-2")

    def _restart_agent(self, agent: str) -> None:
        addr = self.mosq.address_for(agent)
        cmd = [sys.executable, "-m", "scenarios.cli", "agent", "--id", agent, "--run-id", RUN,
               "--scenario", str(self.out / "scenario.yaml"), "--broker", addr.url()]
        log = open(self.out / f"{agent}-replacement.log", "wb")  # noqa: SIM115  # the child owns it
        self.replacements.append(subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=dying_with(os.getpid()),
            env={**os.environ, "NMOE_BROKER_PASSWORD": addr.password or ""}))

    async def run(self) -> None:
        watch = Connection(self.mosq.address_for("chaos"), ConnectionOptions(), who="chaos-watch",
                           subscriptions=[(self.topics.status_filter(), 1)], on_message=self._on_status)
        intruder = Connection(self.mosq.address_for(INTRUDER), ConnectionOptions(), who="chaos-intruder",
                              subscriptions=[], on_message=lambda m: None)
        async with watch, intruder:
            while not all(self.status.get(client_name(i)) == "online" for i in range(3)):
                await asyncio.sleep(0.1)
            await asyncio.gather(self._garbage(intruder), self._broker_restarts())

    async def _garbage(self, intruder: Connection) -> None:
        targets = ["coordinator", *(client_name(i) for i in range(3))]
        while True:
            await asyncio.sleep(self.garbage_every_s)
            if not intruder.connected:
                continue
            for dst in targets:
                for payload in GARBAGE:
                    try:
                        await intruder.client.publish(self.topics.rx(dst, INTRUDER, Kind.LATENT), payload, qos=1)
                    except aiomqtt.MqttError:
                        break  # the broker is being restarted: next time
                    self.faults["garbage"] += 1

    async def _broker_restarts(self) -> None:
        while True:
            await asyncio.sleep(self.broker_every_s)
            pid = self.mosq.pid
            if pid is None:
                continue
            os.kill(pid, signal.SIGKILL)  # as the issue did it: no clean shutdown
            await asyncio.sleep(1.0)
            self.mosq.restart()
            self.faults["broker_restart"] += 1

    def stop(self) -> None:
        for proc in self.replacements:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)


async def soak(args: argparse.Namespace, out: Path) -> tuple[int, int, bool]:
    ids = [client_name(i) for i in range(3)]
    accounts = make_accounts(ids, observers=("chaos",)) + [Account(INTRUDER, new_password(), Role.AGENT)]
    file = out / "accounts"
    file.write_text("".join(f"{a.username}:{a.password}\n" for a in accounts))
    file.chmod(0o600)
    (out / "scenario-in.yaml").write_text(SCENARIO.replace("ROUNDS", str(args.rounds)))
    scn = load_scenario(str(out / "scenario-in.yaml"))
    set_threads(scn.threads)
    console = Console(file=open(out / "run.log", "w"), width=120)  # noqa: SIM115
    with MosquittoBroker(RUN, accounts, persistence=True) as mosq:
        chaos = Chaos(mosq, out, args.garbage_every, args.broker_every)
        soaking = asyncio.create_task(chaos.run())
        ok = False
        try:
            summary, _ = await run_networked(scn, out, console, "subprocess", f"mqtt://coordinator@{mosq.host}:{mosq.port}",
                                             broker_accounts=file)  # fmt: skip
            ok = True
        except NmoeError as err:
            print(f"the run failed: {err}")
            summary = None
        finally:
            soaking.cancel()
            await asyncio.gather(soaking, return_exceptions=True)
            chaos.stop()
    lost = 0 if summary is None else sum(f == "missing" for r in summary.rounds for f in r.failures.values())
    if summary is not None:
        for r in summary.rounds:
            print(f"{r.stage:<16} round {r.round} {r.op.value:<15} answered {len(r.answered)} "
                  f"failures {dict(r.failures) or '-'}")
    print(f"faults: {chaos.faults}")
    return sum(chaos.faults.values()), lost, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 Stage 1 rounds, one broker restart (under 60 s)")
    ap.add_argument("--rounds", type=int, default=8, help="Stage 1 rounds")
    ap.add_argument("--garbage-every", type=float, default=1.0, help="seconds between garbage bursts")
    ap.add_argument("--broker-every", type=float, default=12.0, help="seconds between broker restarts")
    ap.add_argument("--out", help="output folder (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.broker_every = 3, 6.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chaos-out-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        faults, lost, ok = asyncio.run(soak(args, out))
    print(f"seconds={time.perf_counter() - started:.0f}")
    print(f"faults={faults} answers_lost={lost} run_ok={int(ok)}")
    return 0 if ok and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
