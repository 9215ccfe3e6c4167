"""The wireless channel emulator of a networked run, as its own process (``python -m
broker.channel.emulator``): it relays every byte twice through the broker, so on two cores it must
not share the coordinator's interpreter. Its per-link stats come back as JSON when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents.codec import CHANNEL, COORDINATOR
from broker.auth import PASSWORD_ENV
from broker.lifetime import dying_with
from broker.server import RunningBroker
from nmoe.errors import ChannelError

from .scenario import Scenario

LIVE_STATS_S = 1.0  # how often the emulator rewrites its stats file while it runs (the live view reads it)


class ChannelProcess:
    """The wireless channel emulator between the agents, as its own process (it relays every byte
    twice through the broker: on two cores it must not share the coordinator's interpreter)."""

    def __init__(self, scn: Scenario, run_id: str, broker: RunningBroker, clients: list[str], out_dir: Path) -> None:
        self.config = out_dir / "channel.json"
        self.config.write_text(json.dumps(dataclasses.asdict(scn.channel)))
        self.stats_file = out_dir / "channel_stats.json"
        self.log_path = out_dir / "logs" / "channel.log"
        self.addr = broker.address_for(CHANNEL)
        self.cmd = [sys.executable, "-m", "broker.channel.emulator", "--run-id", run_id,
                    "--broker", self.addr.url(),
                    "--agents", ",".join([COORDINATOR, *clients]), "--wired", COORDINATOR,
                    "--config", str(self.config), "--seed", str(scn.seed), "--stats", str(self.stats_file),
                    "--stats-every", str(LIVE_STATS_S)]
        self.proc: asyncio.subprocess.Process | None = None
        self.stats: dict[str, Any] = {}  # per-link figures, once it has stopped
        self._live: tuple[int, dict[str, Any]] = (0, {})  # (mtime_ns, stats) of the file as last read

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, PASSWORD_ENV: self.addr.password or ""},
                preexec_fn=dying_with(os.getpid()))  # it dies with the run, even a SIGKILLed one
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
        except asyncio.TimeoutError:
            line = b""
        if line.strip() != b"ready":
            raise ChannelError(f"the channel emulator did not start; see {self.log_path}")

    def live_stats(self) -> dict[str, Any]:
        """The per-link figures so far (the emulator rewrites its stats file every LIVE_STATS_S)."""
        try:
            mtime = self.stats_file.stat().st_mtime_ns
            if mtime != self._live[0]:
                self._live = (mtime, json.loads(self.stats_file.read_text()))
        except FileNotFoundError:  # not written yet
            return {}
        return self._live[1]

    def check(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise ChannelError(f"the channel emulator exited ({self.proc.returncode}) in the middle of the run; "
                               f"see {self.log_path}")

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()  # it writes its stats and exits
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self.stats_file.exists():
            self.stats.update(json.loads(self.stats_file.read_text()))


@contextlib.asynccontextmanager
async def channel_running(scn: Scenario, run_id: str, broker: RunningBroker, clients: list[str],
                          out_dir: Path) -> AsyncIterator[ChannelProcess | None]:
    """The emulator when the scenario asks for one; stopped (by PID) whatever happens."""
    if scn.channel.model != "emulated":
        yield None
        return
    channel = ChannelProcess(scn, run_id, broker, clients, out_dir)
    try:
        await channel.start()
        yield channel
    finally:
        await channel.stop()
