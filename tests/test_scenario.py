"""Scenario files: every shipped one validates; bad ones fail before any work, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from nmoe.errors import ConfigError
from scenarios.cli import main
from scenarios.scenario import PACKAGED, load_scenario

SHIPPED = sorted(PACKAGED.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenarios_validate(path):
    scn = load_scenario(str(path))
    assert scn.name == path.stem


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage1: {rounds: -1}", "stage1.rounds: must be in 0..10000 (got -1)"),
        ("stage1: {optim: {lr: 0}}", "stage1.optim.lr: must be a finite number > 0"),
        ("stage1: {methd: fedsc}", "stage1.methd: unknown key (did you mean 'method'?)"),
        ("stage1: {method: fedxx}", "stage1.method: 'fedxx' is not allowed; choose one of 'fedce', 'fedsc'"),
        ("partition: {tau: 1.5}", "partition.tau: must be in [0, 1]"),
        ("clients: three", "clients: expected an integer"),
        ("clients: 2\neval: {top_k: 3}", "eval.top_k: must be <= clients = 2"),
        ("baselines: [local, oracle]", "baselines[1]: 'oracle' is not allowed"),
        ("network: {min_clients: 20}\nclients: 4", "network.min_clients: must be <= clients = 4"),
        ("name: 'bad name!'", "name: must be 1-64 letters"),
        ("[1, 2]", "the top level must be a mapping"),
        ("stage1: {rounds: [1", "s.yaml:1:20: expected ',' or ']', but got '<stream end>'"),
        ("stage3: {train_top_k: 1}", "stage3.train_top_k: 1 gives the gate zero gradient"),
    ],
)
def test_bad_scenarios_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_scenario(_write(tmp_path, text))
    assert message in str(err.value)


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, "clients: 4")
    scn = load_scenario(path, ["stage1.rounds=7", "partition.tau=0.5", "baselines=[local]"])
    assert (scn.stage1.rounds, scn.partition.tau, scn.baselines) == (7, 0.5, ("local",))
    with pytest.raises(ConfigError, match="stage1.rounds: expected an integer"):
        load_scenario(path, ["stage1.rounds=many"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_scenario(path, ["stage1.rounds"])


def test_missing_scenario_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped scenarios: .*quickstart"):
        load_scenario("no-such-scenario")


def test_cli_validate_reports_ok_and_errors(tmp_path, capsys):
    assert main(["validate", "quickstart"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["validate", _write(tmp_path, "stage2: {epochs: -3}")]) == 2
    assert "stage2.epochs: must be in 0..10000" in capsys.readouterr().out


def test_the_command_exits_with_mains_status_and_all_its_output(tmp_path):
    """`nmoe` (scenarios.cli:entry, also ``python -m scenarios.cli``) freezes the heap before the
    interpreter's teardown, which then skips its last full collection: the exit status is still
    main()'s and the output is all there."""
    root = Path(__file__).resolve().parent.parent
    assert 'nmoe = "scenarios.cli:entry"' in (root / "pyproject.toml").read_text().splitlines()
    cmd = [sys.executable, "-m", "scenarios.cli", "validate"]
    ok = subprocess.run([*cmd, "quickstart"], cwd=root, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: quickstart") and ok.stderr == ""
    bad = subprocess.run([*cmd, _write(tmp_path, "stage2: {epochs: -3}")], cwd=root, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "stage2.epochs: must be in 0..10000" in bad.stdout
