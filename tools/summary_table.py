"""A sweep's summary.csv as a Markdown table: one row per method, one column per value of a grid key.

    python tools/summary_table.py docs/reproduction/fig3_noniid/summary.csv --columns partition.tau \
        --where stage1.method=fedsc --metrics accuracy,f1_macro --methods nmoe,nmoe_fedavg_gate

Each cell reads ``mean ± ci95 / mean ± ci95 (n)`` for the metrics asked (``± ci`` left out with one
seed). Rows with the same method and column value from different cells (``--where`` not given for
a key that varies) are listed apart, named by their other grid values. Used to write
docs/REPRODUCTION.md and docs/STRESS.md from the committed summaries, not by hand.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

FIXED = ("method", "label", "n_seeds", "failed_seeds", "error")


def fmt(row: dict[str, str], metric: str) -> str:
    mean, ci = row.get(f"{metric}_mean", ""), row.get(f"{metric}_ci95", "")
    if mean == "":
        return "–"
    text = f"{float(mean):.3f}"
    return text + (f" ± {float(ci):.3f}" if ci not in ("", "0") and int(row["n_seeds"]) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path)
    parser.add_argument("--columns", required=True, help="the grid key whose values are the columns")
    parser.add_argument("--where", action="append", default=[], help="KEY=VALUE: keep only these rows")
    parser.add_argument("--metrics", default="accuracy,f1_macro")
    parser.add_argument("--methods", default="", help="keep only these methods (e.g. nmoe,nmoe_fedavg_gate)")
    args = parser.parse_args(argv)
    with open(args.summary) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        print(f"{args.summary}: no rows", file=sys.stderr)
        return 1
    keys = [k for k in rows[0] if k not in FIXED and not k.endswith(("_mean", "_ci95"))]
    if args.columns not in keys:
        print(f"--columns {args.columns}: not a grid key of {args.summary} (keys: {', '.join(keys)})", file=sys.stderr)
        return 2
    for cond in args.where:
        key, _, value = cond.partition("=")
        if key not in keys:
            print(f"--where {cond}: {key} is not a grid key (keys: {', '.join(keys)})", file=sys.stderr)
            return 2
        rows = [r for r in rows if r[key] == value]
    if args.methods:
        wanted = set(args.methods.split(","))
        rows = [r for r in rows if r["method"] in wanted]
    if not rows:
        print(f"{args.summary}: no rows left by --where/--methods", file=sys.stderr)
        return 1
    metrics = args.metrics.split(",")
    columns = sorted({r[args.columns] for r in rows}, key=lambda v: (-float(v)) if _number(v) else v)
    others = [k for k in keys if k != args.columns and len({r[k] for r in rows}) > 1]
    table: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        name = r["label"] + "".join(f", {k}={r[k]}" for k in others)
        table.setdefault((name,), {})[r[args.columns]] = " / ".join(fmt(r, m) for m in metrics) + f" ({r['n_seeds']})"
    print(f"| method ({' / '.join(metrics)}, seeds) | " + " | ".join(f"{args.columns} = {c}" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for (name,), cells in table.items():
        print(f"| {name} | " + " | ".join(cells.get(c, "–") for c in columns) + " |")
    return 0


def _number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
