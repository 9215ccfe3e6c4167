"""The dashboard's cost: Stage 1 round time with the page open / without, side by side in one run.

One networked run (mosquitto, the coordinator with its dashboard, client agent processes) trains
Stage 1 FedCE rounds; between rounds the page is opened or closed in turn (open for even rounds,
closed for odd ones, round 0 dropped as the warm-up), so both halves share the same processes,
caches and machine load. "The page" is headless chromium (Debian's, via selenium) showing the live
view, as a user would; without chromium, an event-stream reader in a thread of this process
(which only makes the page look dearer: it shares the coordinator's interpreter). Each switch is a
navigation (to the page, or away to about:blank), so both halves pay for one at their start.
``--control`` runs the same alternation without ever opening the page (an A/A test: how far from 1
the noise of this machine puts the ratio). ``paired_median_ratio`` compares each open round with the
closed round just before it.

    python bench/dashboard.py [--quick] [--rounds R] [--clients N] [--samples S]

The last line printed is ``dashboard_ratio=<mean open / mean closed> ...`` (goal <= 1.02).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.ports import free_port  # noqa: E402
from scenarios.dashboard.live import LiveRun  # noqa: E402
from scenarios.networked import run_networked  # noqa: E402
from scenarios.runner import set_threads  # noqa: E402
from scenarios.scenario import load_scenario  # noqa: E402
from scenarios.schema import to_dict  # noqa: E402


class Chromium:
    """The live view in headless chromium: open() loads it, close() leaves it for about:blank."""

    def __init__(self, url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,2000"):
            options.add_argument(arg)
        options.binary_location = shutil.which("chromium") or "chromium"
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"),
                                       options=options)
        self.url = url
        self.kind = "headless chromium"

    def open(self) -> None:
        self.driver.get(self.url)

    def close(self) -> None:
        self.driver.get("about:blank")

    def quit(self) -> None:
        self.driver.quit()


class StreamReader:
    """Without chromium: read /events in a thread while open."""

    def __init__(self, url: str) -> None:
        self.url = url + "events"
        self.kind = "event-stream reader (thread)"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        with urllib.request.urlopen(self.url, timeout=30) as stream:
            while not self._stop.is_set() and stream.readline():
                pass

    def open(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()  # it ends at its next line (a view, or a keepalive within 15 s)

    def quit(self) -> None:
        self.close()


def scenario(args: argparse.Namespace, out: Path) -> Any:
    text = f"""
name: dashboard_bench
seed: 1
clients: {args.clients}
threads: 1
data: {{name: synthetic, synthetic_train: {max(2000, args.clients * args.samples)}}}
partition: {{kind: iid, train_per_client: {args.samples}, test_per_client: 48}}
stage1: {{method: fedce, rounds: {args.rounds}, local_epochs: 1, batch_size: 32}}
stage2: {{epochs: 0}}
stage3: {{rounds: 0}}
baselines: []
network: {{join_timeout_s: 120, round_timeout_s: 300, min_clients: 1, agent_threads: 1}}
"""
    path = out / "bench.yaml"
    path.write_text(text)
    return load_scenario(str(path))


async def measure(args: argparse.Namespace, out: Path, console: Console) -> tuple[dict[bool, list[float]], str]:
    scn = scenario(args, out)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    live = LiveRun(to_dict(scn), "subprocess", out)
    page: Chromium | StreamReader | None = None
    by_state: dict[bool, list[float]] = {True: [], False: []}
    in_order: list[tuple[int, bool, float]] = []  # (round, page open, seconds)
    state = {"open": False}

    async def toggle() -> None:
        nonlocal page
        seen = 0
        while True:
            fits = [r for r in live.rounds if r["op"] == "stage1_fit"]
            if len(fits) > seen:
                for r in fits[seen:]:
                    if r["round"] > 0:  # round 0 warms up
                        by_state[state["open"]].append(r["seconds"])
                        in_order.append((r["round"], state["open"], r["seconds"]))
                seen = len(fits)
                want = seen % 2 == 0  # the next round's index is `seen`: even rounds open
                if page is None:
                    page = Chromium(url) if not args.no_browser and shutil.which("chromium") else StreamReader(url)
                    if isinstance(page, Chromium):
                        await asyncio.to_thread(page.close)
                if want != state["open"]:
                    state["open"] = want
                    if not args.control:
                        await asyncio.to_thread(page.open if want else page.close)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(toggle())
    try:
        await run_networked(scn, out / "run", console, "subprocess", dashboard=port, live=live)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        if page is not None:
            page.quit()
    args.in_order = in_order
    return by_state, page.kind if page is not None else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 clients x 64 samples, 7 rounds (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--no-browser", action="store_true", help="use the event-stream reader even with chromium")
    parser.add_argument("--control", action="store_true",
                        help="an A/A control: the same alternation, but the page is never opened (ratio ~1 if "
                             "even and odd rounds cost the same)")
    args = parser.parse_args()
    args.rounds = args.rounds or (7 if args.quick else 21)
    args.clients = args.clients or 3
    args.samples = args.samples or (64 if args.quick else 300)
    console = Console()
    set_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nmoe-bench-dashboard-") as tmp:
        by_state, kind = asyncio.run(measure(args, Path(tmp), console))
    opened, closed = by_state[True], by_state[False]
    if not opened or not closed:
        raise SystemExit("too few rounds to compare (give --rounds 5 or more)")
    table = Table(title=f"Stage 1 round seconds, page open ({kind}) vs closed, one run")
    for col in ("page", "rounds", "mean s", "median s", "min s", "max s"):
        table.add_column(col, justify="right" if col != "page" else "left")
    for name, xs in (("open", opened), ("closed", closed)):
        table.add_row(name, str(len(xs)), f"{statistics.mean(xs):.3f}", f"{statistics.median(xs):.3f}",
                      f"{min(xs):.3f}", f"{max(xs):.3f}")
    console.print(table)
    console.print("rounds in order (round, page, s): " + ", ".join(
        f"{r}{'o' if o else 'c'} {x:.2f}" for r, o, x in args.in_order), highlight=False)
    console.print(f"{args.clients} clients x {args.samples} samples, {args.rounds} rounds, "
                  f"{time.perf_counter() - started:.0f} s in all")
    ratio = statistics.mean(opened) / statistics.mean(closed)
    median_ratio = statistics.median(opened) / statistics.median(closed)
    # each closed round against the open round just before it: slow drift in the machine's load cancels
    pairs = [b[2] / a[2] for a, b in zip(args.in_order, args.in_order[1:], strict=False) if b[1] and not a[1]]
    paired = statistics.median(pairs) if pairs else float("nan")
    print(f"dashboard_ratio={ratio:.3f} median_ratio={median_ratio:.3f} paired_median_ratio={paired:.3f} "
          f"rounds_open={len(opened)} rounds_closed={len(closed)}")


if __name__ == "__main__":
    main()
