"""One malicious client of four on the quickstart (Fashion-MNIST): its Stage 1 and Stage 3 updates
scaled by 1000 or sign-flipped, with the default aggregation (FedAvg + outlier screening) and with
screening off. Prints the honest clients' mean NMoE accuracy per case; the headline last.

    python bench/robust_aggregation.py            # the quickstart scenario (a few minutes)
    python bench/robust_aggregation.py --quick    # the toy synthetic scenario (under a minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import toy_scenario  # noqa: E402
from test_robust import Malicious, _flip, _scale, run  # noqa: E402

from agents.inprocess import InProcessFleet  # noqa: E402
from nmoe.errors import NmoeError  # noqa: E402
from scenarios.scenario import load_scenario  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        scn = toy_scenario(Path("/tmp"), ["clients=4", "stage1.method=fedce", "stage1.rounds=3", "eval.top_k=2"])
    else:
        scn = load_scenario("quickstart", ["baselines=[]", "privacy.reproducible_noise=true"])
    off = dataclasses.replace(scn, aggregation=dataclasses.replace(scn.aggregation, outlier_factor=0.0,
                                                                   reject_reversed=False))
    bad = scn.clients - 1
    honest = range(bad)
    figures: dict[str, float] = {}
    for name, cfg, attack in [("honest", scn, None), ("honest_unscreened", off, None),
                              ("x1000", scn, _scale), ("x1000_unscreened", off, _scale),
                              ("flip", scn, _flip), ("flip_unscreened", off, _flip)]:
        clock = time.perf_counter()
        fleet = InProcessFleet if attack is None else (lambda ls, a=attack: Malicious(ls, bad, a))
        try:
            acc, strategy = run(cfg, fleet)
            figures[name] = sum(acc[i] for i in honest) / len(honest)
            rejected = sum(why.startswith("rejected: outlier") for r in strategy.summary.rounds
                           for why in r.failures.values())
            print(f"{name:<20} honest clients' accuracy {figures[name]:.4f}, {rejected} updates rejected as "
                  f"outliers ({time.perf_counter() - clock:.0f}s)")
        except NmoeError as err:  # an unscreened attack can end the run: that is a result too
            figures[name] = float("nan")
            print(f"{name:<20} run failed: {str(err)[:160]}")
    print(" ".join(f"{k}={v:.4f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
