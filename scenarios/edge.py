"""`nmoe agent`: one client agent by itself, on an edge board or as a child process of a run.

Apart from the rest of the CLI so that a run's agent processes (``agent_groups``) can start it
without importing the runner (no import cycle, and less to import in each agent).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from nmoe.errors import ConfigError, NmoeError

from .scenario import Scenario, load_scenario


def agent_args(agent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    agent.add_argument("--id", required=True, help="agent id, e.g. client-3")
    agent.add_argument("--broker", required=True, metavar="URL",
                       help="mqtt[s]://user[:pass]@host:port (password also from $NMOE_BROKER_PASSWORD)")
    agent.add_argument("--scenario", required=True, help="the run's scenario file")
    agent.add_argument("--run-id", help="the run's id (default: the scenario's name)")
    agent.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a field, as the coordinator's run did")
    agent.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return agent


def redirect_output(log_path: str) -> None:
    """This process' output (fds 1 and 2, ``sys.stdout``/``sys.stderr``, log handlers) to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # a copy of the run (the agent host) inherits its Python-level streams and log handlers too
    # (under pytest: capture buffers): point both at the log file again
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)


def stop_on_sigterm() -> None:
    """`kill PID` stops a run like Ctrl-C does: every process it started is stopped by its PID."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


_WARM: dict[tuple[str, tuple[str, ...]], Scenario | None] = {}  # None: it did not load (tried once)


def warm(argv: Sequence[str]) -> None:
    """Do once, in the agent host, the start-up work every agent of a run repeats (load the scenario,
    size the bus from the model, map the dataset and cut the partition tables): agents forked
    afterwards find it done, in pages they share. A scenario that does not load is left for the
    agent itself to report (in its log, with exit status 2)."""
    import torch

    from nmoe_models.partition import load_client_data

    from .bus_sizing import largest_message_bytes

    args = agent_args(argparse.ArgumentParser(prog="nmoe agent")).parse_args(argv)
    key = (args.scenario, tuple(args.overrides))
    if key in _WARM:
        return
    # one thread: the host must start none (a fork copies only the calling thread), and torch's
    # pool starts with the first parallel operation (agents set their own count)
    torch.set_num_threads(1)
    try:
        scn = load_scenario(args.scenario, args.overrides)
        largest_message_bytes(scn)
        load_client_data(scn, 0)
    except NmoeError as err:
        print(f"agent host: not warming {args.scenario}: {err}", file=sys.stderr)
        _WARM[key] = None
        return
    _WARM[key] = scn


def run_agent(args: argparse.Namespace) -> int:
    """One client agent by itself: load the scenario, connect, serve until the coordinator is done."""
    import asyncio
    import logging

    import torch

    from agents.client import ClientAgent
    from agents.codec import client_index
    from broker.auth import BrokerAddress

    from .bus_sizing import bus_config
    from .devices import agent_extras

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scn = _WARM.get((args.scenario, tuple(args.overrides))) or load_scenario(args.scenario, args.overrides)
    index = client_index(args.id)
    if index is None or index >= scn.clients:
        raise ConfigError(f"--id {args.id!r}: expected client-0 .. client-{scn.clients - 1} for this scenario")
    address = BrokerAddress.parse(args.broker)
    torch.set_num_threads(scn.network.agent_threads)
    cfg = bus_config(scn, args.run_id or scn.name, args.id, address)
    x = agent_extras(scn, index)
    asyncio.run(ClientAgent(scn, scn.network, index, cfg, scn.channel.time_scale, x.device, x.radio, x.predictor).run())
    return 0


def main(argv: Sequence[str]) -> int:
    """``nmoe agent ARGV`` in a process of its own: the same arguments, errors as one line (exit 2)."""
    args = agent_args(argparse.ArgumentParser(prog="nmoe agent")).parse_args(argv)
    stop_on_sigterm()
    try:
        return run_agent(args)
    except NmoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
