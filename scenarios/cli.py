"""The `nmoe` command: run, sweep and validate scenarios, run one agent on an edge board."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.markup import escape

from nmoe.errors import ConfigError, NmoeError

from .agent_host import AgentHost
from .edge import agent_args, run_agent, stop_on_sigterm
from .scenario import PACKAGED, Scenario, load_scenario

if TYPE_CHECKING:
    from .runner import Checkpoint

DASHBOARD_PORT = 8765


def _scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="a scenario YAML file, or the name of a shipped one (e.g. quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field, e.g. --set stage1.rounds=5 (repeatable)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nmoe", description="Networked Mixture-of-Experts over MQTT")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario (networked by default)")
    run.add_argument("scenario", nargs="?",
                     help="a scenario YAML file, or the name of a shipped one (e.g. quickstart)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a field, e.g. --set stage1.rounds=5 (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a run that stopped (a crash, a kill) from its latest checkpoint, in its folder, "
                          "with its own scenario.yaml; no completed Stage 1 round is redone")
    run.add_argument("--inprocess", action="store_true", help="run every client in this process, no network")
    run.add_argument("--agents", choices=["subprocess", "inprocess", "external"], default="subprocess",
                     help="networked runs: client agents as subprocesses (default), as tasks in this process, "
                          "or started by hand (e.g. on edge boards) with `nmoe agent`")
    run.add_argument("--broker", metavar="URL", help="use this broker, mqtt[s]://user:pass@host:port, "
                                                      "instead of starting one")
    run.add_argument("--broker-accounts", metavar="FILE",
                     help="with --broker: one username:password per line for coordinator, channel and every "
                          "client-N (mode 0600), so each agent logs in as itself")
    run.add_argument("--broker-kind", choices=["auto", "mosquitto", "amqtt"], default="auto",
                     help="the broker to start: mosquitto when installed, else the embedded amqtt (auto)")
    run.add_argument("--listen", default="127.0.0.1", metavar="HOST",
                     help="interface the started broker listens on (0.0.0.0 for agents on other machines)")
    run.add_argument("--out", help="output folder (default runs/<scenario>/<timestamp>)")
    run.add_argument("--dashboard", nargs="?", type=int, const=DASHBOARD_PORT, default=None, metavar="PORT",
                     help=f"networked runs: serve a live view of the run on http://127.0.0.1:PORT/ (default "
                          f"{DASHBOARD_PORT}; 0: a free port), on --listen's interface; off loopback it needs the "
                          "token printed on the console")
    run.add_argument("--no-cache", action="store_true",
                     help="compute every stage, ignoring the stage cache ($NMOE_CACHE, else ~/.cache/nmoe; "
                          "networked runs always compute the federated stages, and take only the baselines from it)")
    agent_args(sub.add_parser("agent", help="run one client agent by itself (e.g. on a Raspberry Pi)"))
    sweep = sub.add_parser("sweep", help="run a grid of scenario settings x seeds (resumable), then summarize")
    sweep.add_argument("file", help="a sweep YAML file: base, grid, set, seeds")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a field in every run, e.g. --set data.name=cifar10 (repeatable)")
    sweep.add_argument("--out", help="output folder (default sweeps/<sweep name>)")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="runs in parallel, each in its own process with cores/N torch threads (default 1)")
    mode = sweep.add_mutually_exclusive_group()
    mode.add_argument("--inprocess", action="store_true", help="run each cell in process (the default)")
    mode.add_argument("--networked", action="store_true",
                      help="run each cell networked: broker, coordinator, agents (one run at a time)")
    sweep.add_argument("--no-cache", action="store_true",
                       help="compute every stage of every run, ignoring the stage cache ($NMOE_CACHE, else "
                            "~/.cache/nmoe)")
    sweep.add_argument("--report", action="store_true",
                       help="run nothing: redraw summary.csv, the table and the charts from the runs on disk")
    report = sub.add_parser("report", help="write FOLDER/report.html (self-contained) for a run or a sweep folder")
    report.add_argument("folder", metavar="FOLDER", help="a run folder (results.json) or a sweep folder (summary.csv)")
    dash = sub.add_parser("dashboard", help="serve the live view of a run folder (one going on, or finished)")
    dash.add_argument("folder", metavar="RUN_DIR", help="the run's folder (it keeps live.json current while it runs)")
    dash.add_argument("--port", type=int, default=DASHBOARD_PORT,
                      help=f"port (default {DASHBOARD_PORT}; 0: a free one)")
    dash.add_argument("--listen", default="127.0.0.1", metavar="HOST",
                      help="interface (off loopback the page needs the token printed on the console)")
    val = sub.add_parser("validate", help="check a scenario file and print its resolved settings")
    _scenario_args(val)
    sub.add_parser("scenarios", help="list the shipped scenarios")
    return ap


def entry() -> NoReturn:
    """The `nmoe` command (and ``python -m scenarios.cli``): :func:`main`, then an exit without the
    interpreter's last full garbage collection.

    By then everything the command does is done, written and closed (outputs, broker, agents).
    That collection would only walk every object torch and the run made, to free memory the
    process is about to hand back whole: 0.6-0.7 s after a networked run on two cores, measured
    (py-spy: ``gc_collect_main`` under ``Py_FinalizeEx``). Frozen (:func:`gc.freeze`), those
    objects are left out of it; atexit handlers still run, modules are still torn down and
    objects freed by reference counting, and only unreachable cycles go back with the process.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    if args.command in ("run", "agent"):
        stop_on_sigterm()
    try:
        return _dispatch(args, console)
    except NmoeError as err:
        # escaped: key paths like network.faults[0] are not rich markup; soft_wrap: one line
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "scenarios":
        for path in sorted(PACKAGED.glob("*.yaml")):
            scn = load_scenario(str(path))
            console.print(f"[bold]{path.stem:<24}[/bold] {scn.description}")
        return 0
    if args.command == "agent":
        return run_agent(args)
    if args.command == "sweep":
        return run_sweep_command(args, console)
    if args.command == "report":
        from .dashboard.report import write_report

        console.print(f"report: {write_report(Path(args.folder))}", highlight=False)
        return 0
    if args.command == "dashboard":
        from .dashboard.attach import attach

        check_port(args.port, "--port")
        return attach(Path(args.folder), args.listen, args.port, console)
    checkpoint = None
    if args.command == "run" and args.resume:
        from .runner import Checkpoint

        if args.scenario or args.overrides or args.out:
            raise ConfigError("--resume RUN_DIR takes the run's own scenario.yaml and folder: give no scenario, "
                              "--set or --out with it")
        run_dir = Path(args.resume)
        if not (run_dir / "scenario.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no scenario.yaml there (is it a run folder?)")
        checkpoint = Checkpoint.load(run_dir)
        args.scenario, args.out = str(run_dir / "scenario.yaml"), str(run_dir)
    if args.scenario is None:
        raise ConfigError("run: give a scenario (a file or a shipped name), or --resume RUN_DIR")
    scn = load_scenario(args.scenario, args.overrides)
    if args.command == "validate":
        console.print(f"[green]ok[/green]: {scn.name}: {scn.clients} clients, {scn.data.name}, "
                      f"{scn.partition.kind} partition, Stage 1 {scn.stage1.method} x {scn.stage1.rounds} rounds, "
                      f"Stage 3 {scn.stage3.method} x {scn.stage3.rounds} rounds, top-{scn.eval.top_k}, "
                      f"baselines: {', '.join(scn.baselines) or 'none'}")
        return 0
    if args.broker_accounts and not args.broker:
        raise ConfigError("--broker-accounts needs --broker (a run's own broker makes its own accounts)")
    accounts_file = Path(args.broker_accounts) if args.broker_accounts else None
    if args.broker and not args.inprocess:
        check_external_broker(args.broker, accounts_file, scn.clients)
    if args.dashboard is not None:
        if args.inprocess:
            raise ConfigError("--dashboard: networked runs only (an --inprocess run has no fleet to watch; "
                              "`nmoe report` draws its results)")
        check_port(args.dashboard, "--dashboard")
    # the agent host now, before the rest of the run's imports: its own (the agent code, 0.1 s)
    # then overlap them instead of following them
    host = None if args.inprocess else AgentHost.fork_for(args.agents)
    try:
        return _run(args, console, scn, accounts_file, checkpoint, host)
    finally:
        if host is not None:
            host.close()


def _run(args: argparse.Namespace, console: Console, scn: Scenario, accounts_file: Path | None,
         checkpoint: Checkpoint | None, host: AgentHost | None) -> int:
    from .dashboard.report import write_report
    from .runner import output_dir, run_inprocess

    out = output_dir(scn, args.out)
    if scn.description:
        console.print(f"[bold]{scn.name}[/bold]: {scn.description}")

    if args.inprocess:
        from .cache import StageCache, default_root

        run_inprocess(scn, out, console, None if args.no_cache else StageCache(default_root()), checkpoint)
    else:
        from .cache import StageCache, default_root
        from .networked import run_networked_scenario

        run_networked_scenario(scn, out, console, args.agents, args.broker, args.listen, args.broker_kind,
                               accounts_file, checkpoint, args.dashboard,
                               cache=None if args.no_cache else StageCache(default_root()), host=host)
    console.print(f"report: {write_report(out)}", highlight=False)
    return 0


def check_port(port: int, flag: str) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag}: a port is 0..65535 (got {port})")


def check_external_broker(url: str, accounts_file: Path | None = None, clients: int = 0) -> None:
    """Refuse, before any work, an external broker URL without a password (or accounts file), or an
    accounts file that is unreadable, readable by others, or lacks an agent.

    Supporting a broker without authentication was considered and refused: the run's security
    rests on each agent's login (the ACL proves who sent a message, see broker/auth.py), and an open
    broker would let anyone on its network answer for any client. Giving the password is one step.
    """
    from agents.codec import client_name
    from broker.auth import PASSWORD_ENV, BrokerAddress, accounts_with_passwords, make_accounts, read_accounts_file

    address = BrokerAddress.parse(url)
    if accounts_file is not None:
        needed = make_accounts([client_name(i) for i in range(clients)])
        accounts_with_passwords(needed, read_accounts_file(accounts_file), str(accounts_file))
        return
    if address.password is None:
        raise ConfigError(
            f"--broker {address.redacted()}: no password; give mqtt[s]://user:password@host:port or set "
            f"${PASSWORD_ENV} (nmoe needs a broker with authentication: its ACL proves who sent a message)"
        )


def run_sweep_command(args: argparse.Namespace, console: Console) -> int:
    """`nmoe sweep FILE`: validate everything, run what is missing, summarize from disk."""
    from .runner import available_cpus
    from .sweep import load_sweep, run_sweep
    from .sweep_report import write_summary

    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1 (got {args.jobs})")
    if args.networked and args.jobs > 1:
        raise ConfigError("--jobs: networked sweeps run one cell at a time (each starts a broker and its agents)")
    cores = available_cpus()
    jobs = min(args.jobs, cores)
    sweep = load_sweep(args.file, args.out, args.overrides, threads=max(1, cores // jobs))
    cells = len({r.cell for r in sweep.runs})
    console.print(f"[bold]sweep {sweep.name}[/bold]: base {sweep.base}, {cells} cell(s) x {len(sweep.seeds)} "
                  f"seed(s) = {len(sweep.runs)} run(s) in {sweep.out}" + (f"; {sweep.description}" if sweep.description
                                                                         else ""), highlight=False)
    failed = 0
    if not args.report:
        if jobs < args.jobs:
            console.print(f"--jobs {args.jobs} capped to {jobs}: this machine has {cores} core(s)")
        from .cache import default_root

        cache_root = None if args.no_cache or args.networked else str(default_root())
        outcomes = run_sweep(sweep, console, jobs, args.networked, cache_root)
        failed = sum(not o.ok for o in outcomes)
    from .dashboard.report import write_report

    paths = [*write_summary(sweep, console), write_report(sweep.out)]
    console.print("outputs: " + ", ".join(str(p) for p in paths))
    if failed:
        console.print(f"[red]{failed} run(s) failed[/red]: see error.txt in their folders; run the sweep again "
                      "to retry them")
    return 1 if failed else 0


if __name__ == "__main__":
    entry()
