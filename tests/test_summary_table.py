"""tools/summary_table.py: a sweep's summary.csv as the Markdown table docs/REPRODUCTION.md quotes."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("summary_table", ROOT / "tools" / "summary_table.py")
assert _spec is not None and _spec.loader is not None
summary_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary_table)

FIELDS = ["partition.tau", "stage1.method", "method", "label", "n_seeds", "accuracy_mean", "accuracy_ci95",
          "f1_macro_mean", "f1_macro_ci95", "failed_seeds", "error"]


def write(tmp_path: Path) -> Path:
    rows = [
        ("0.9", "fedce", "nmoe", "FedCE-NMoE", "2", "0.74", "0.09", "0.73", "0.11"),
        ("0.2", "fedce", "nmoe", "FedCE-NMoE", "1", "0.86", "", "0.40", ""),
        ("0.9", "fedce", "local", "Local classifier", "2", "0.62", "0.17", "0.60", "0.21"),
        ("0.9", "fedsc", "nmoe", "FedSC-NMoE", "2", "0.45", "0.20", "0.43", "0.24"),
    ]
    path = tmp_path / "summary.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        for r in rows:
            w.writerow([*r, "0", ""])
    return path


def test_one_row_per_method_one_column_per_value(tmp_path, capsys):
    assert summary_table.main([str(write(tmp_path)), "--columns", "partition.tau", "--where", "stage1.method=fedce",
                               "--methods", "nmoe"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| method (accuracy / f1_macro, seeds) | partition.tau = 0.9 | partition.tau = 0.2 |"
    assert lines[2] == "| FedCE-NMoE | 0.740 ± 0.090 / 0.730 ± 0.110 (2) | 0.860 / 0.400 (1) |"
    assert len(lines) == 3  # the local classifier and the FedSC cell are filtered out


def test_a_key_that_varies_names_the_rows_and_bad_keys_are_refused(tmp_path, capsys):
    path = write(tmp_path)
    assert summary_table.main([str(path), "--columns", "partition.tau", "--methods", "nmoe"]) == 0
    out = capsys.readouterr().out
    assert "FedCE-NMoE, stage1.method=fedce" in out and "FedSC-NMoE, stage1.method=fedsc" in out
    assert summary_table.main([str(path), "--columns", "stage2.epochs"]) == 2
    assert "not a grid key" in capsys.readouterr().err
    assert summary_table.main([str(path), "--columns", "partition.tau", "--methods", "centralized"]) == 1
