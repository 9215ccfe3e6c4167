"""Malformed scenario files (issue 11, point 10): each refused by `nmoe validate` and `nmoe run`
before any work, with exit status 2 and one line naming the key path (or file:line:column)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scenarios.cli import main
from scenarios.scenario import load_scenario


def _bomb(levels: int) -> str:
    """The billion laughs in YAML: each level is nine aliases of the one before (9**levels values)."""
    rows = ['l0: &l0 ["x","x","x","x","x","x","x","x","x"]']
    rows += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(rows) + "\n"


CASES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "the file is empty"),
    "comments only": (b"# nothing here\n", "the file is empty"),
    "duplicate key": (b"clients: 3\nseed: 1\nclients: 4\n", ":3:1: duplicate key 'clients' (first at line 1)"),
    "nested duplicate": (b"stage1:\n  rounds: 2\n  rounds: 3\n", ":3:3: duplicate key 'rounds'"),
    "not utf-8": ("description: caf\u00e9\n".encode("latin-1"), ":1:17: byte 0xe9 is not UTF-8"),
    "deep": (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more than 32 levels deep"),
    "deep block": ("".join(f"{'  ' * i}k{i}:\n" for i in range(40)).encode(), "nested more than 32 levels"),
    "lr .inf": (b"stage1:\n  optim: {lr: .inf}\n", "stage1.optim.lr: must be a finite number > 0 (got inf)"),
    "lr .nan": (b"stage2:\n  optim: {lr: .nan}\n", "stage2.optim.lr: expected a number, got .nan"),
    "weight decay -.inf": (b"stage3: {weight_decay: -.inf}\n", "stage3.weight_decay: must be a finite number >= 0"),
    "timeout .inf": (b"network: {round_timeout_s: .inf}\n", "network.round_timeout_s: must be a finite number > 0"),
    "rounds": (b"stage1: {rounds: 1000000000000}\n", "stage1.rounds: must be in 0..10000 (got 1000000000000)"),
    "synthetic_train": (
        b"data: {name: synthetic, synthetic_train: 1000000000000}\n",
        "data.synthetic_train: must be in 10..200000",
    ),
    "samples": (b"partition: {train_per_client: 10000000}\n", "partition.train_per_client: must be in 1..100000"),
    "hidden": (b"model: {head_hidden: 100000000}\n", "model.head_hidden: must be in 1..8192"),
    "time_scale": (b"channel: {model: emulated, time_scale: 1.0e-300}\n", "channel.time_scale: must be in 0.001..1000"),
    "alias bomb": (_bomb(9).encode(), "aliases expand to more than 20000 values"),
    "alias bomb deeper": (_bomb(12).encode(), "aliases expand to more than 20000 values"),
    "recursive alias": (b"a: &a [1, *a]\n", "an alias refers to a value that contains it"),
    "syntax": (b"clients: 3\nstage1: {rounds: 2\nseed: [1\n", ":3:5: expected ',' or '}', but got ':'"),
    "tab": (b"clients: 3\n\tseed: 1\n", ":2:1: found character '\\t' that cannot start any token"),
    "not a mapping": (b"- 1\n- 2\n", "the top level must be a mapping of keys, got list"),
    "too big": (b"# " + b"x" * 300_000 + b"\n", "bytes is over 262144"),
}


def _one_error_line(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("error: "), out
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_validate_refuses_in_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = CASES[case]
    path = tmp_path / "scenario.yaml"
    path.write_bytes(content)
    started = time.perf_counter()
    code = main(["validate", str(path)])
    elapsed = time.perf_counter() - started
    line = _one_error_line(capsys.readouterr().out)
    assert code == 2
    assert expected in line and str(path) in line, line
    assert elapsed < 2.0, f"{case} took {elapsed:.1f}s before it was refused"


@pytest.mark.parametrize("case", ["empty", "lr .inf", "rounds", "alias bomb"])
def test_run_refuses_before_any_work(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = CASES[case]
    path, out = tmp_path / "scenario.yaml", tmp_path / "out"
    path.write_bytes(content)
    assert main(["run", "--inprocess", "--out", str(out), str(path)]) == 2
    assert expected in _one_error_line(capsys.readouterr().out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stage3.lr=1.0e+400", "stage3.lr: must be a finite number > 0 (got inf)"),  # YAML reads inf
        ("stage1=" + "[" * 100, "--set stage1:1:33: nested more than 32 levels deep"),
        ("stage1={rounds: 1, rounds: 2}", "--set stage1:1:13: duplicate key 'rounds'"),
    ],
)
def test_overrides_are_held_to_the_same_rules(
    override: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text("clients: 2\n")
    assert main(["validate", str(path), "--set", override]) == 2
    assert expected in _one_error_line(capsys.readouterr().out)


def test_broker_without_password_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NMOE_BROKER_PASSWORD", raising=False)
    path, out = tmp_path / "scenario.yaml", tmp_path / "out"
    path.write_text("clients: 2\n")
    assert main(["run", str(path), "--broker", "mqtt://127.0.0.1:1883", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().out)
    assert "--broker mqtt://127.0.0.1:1883: no password" in line and "NMOE_BROKER_PASSWORD" in line
    assert not out.exists()


def test_what_stays_allowed(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(
        "clients: 4\n"
        "stage1:\n  optim: &opt {name: adamw, lr: 0.002}\n"
        "stage2:\n  optim:\n    <<: *opt\n    lr: 0.001\n"  # a merged key may be overridden
        "channel: {model: emulated, link: {uplink: {outage_timeout_s: .inf}}}\n"  # .inf: never
    )
    scn = load_scenario(str(path))
    assert (scn.stage1.optim.lr, scn.stage2.optim.name, scn.stage2.optim.lr) == (0.002, "adamw", 0.001)
    empty_mapping = tmp_path / "defaults.yaml"
    empty_mapping.write_text("{}\n")
    assert load_scenario(str(empty_mapping)).clients == 10
