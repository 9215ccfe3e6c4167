"""The dashboard without a browser: a real networked run (real mosquitto, agents as tasks) serving
its view over HTTP, the token, a port in use, and the self-contained reports."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TOY, toy_scenario
from rich.console import Console

from broker.ports import free_port
from broker.server import find_mosquitto
from nmoe.errors import ConfigError
from scenarios.cli import main
from scenarios.dashboard.attach import FolderSource
from scenarios.dashboard.live import LiveRun
from scenarios.dashboard.report import write_report
from scenarios.dashboard.server import is_loopback, serving
from scenarios.dashboard.view import link_and_device
from scenarios.networked import run_networked_scenario
from scenarios.schema import to_dict

EMULATED = ["channel.model=emulated", "channel.preset=wifi", "channel.time_scale=0.25"]


async def read_events(response: aiohttp.ClientResponse, until: Any, limit: int = 500) -> list[dict[str, Any]]:
    """Views from a text/event-stream until ``until(view)`` holds (or the stream ends)."""
    views: list[dict[str, Any]] = []
    data = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            data += line[len("data: "):]
        elif line == "" and data:
            views.append(json.loads(data))
            data = ""
            if until(views[-1]) or len(views) >= limit:
                break
    return views


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
async def test_a_networked_run_streams_its_view_and_a_request_without_the_token_gets_401(tmp_path):
    scn = toy_scenario(tmp_path, EMULATED)
    port = free_port()
    out = tmp_path / "out"
    printed = io.StringIO()
    console = Console(file=printed, width=400)
    run = asyncio.create_task(asyncio.to_thread(
        run_networked_scenario, scn, out, console, "inprocess", None, "127.0.0.1", "mosquitto", None, None, port,
        dashboard_token=True))
    for _ in range(300):  # the console is the one place the token is shown
        if found := re.search(r"dashboard: (http://\S+\?token=\S+)", printed.getvalue()):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the console never showed the dashboard's address")
    login = found.group(1)
    base, token = login.split("?token=")
    views: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as anonymous:
        for path in ("", "events", "view.json?token=wrong"):
            async with anonymous.get(base + path, allow_redirects=False) as r:
                assert r.status == 401, path
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(login) as r:
            page = await r.text()
            assert r.status == 200 and str(r.url) == base  # the token left the address
        async with browser.get(base + "events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            views = await read_events(r, lambda v: v["run"]["status"] != "running")
    await run  # the run went on and finished, 401s and all
    assert views and views[-1]["run"]["status"] == "done"
    assert any(all(c["online"] for c in v["fleet"].values()) for v in views), "every client was seen online"
    open_rounds = [v["round"] for v in views if v.get("round")]
    assert open_rounds, "a round in progress was seen"
    assert all(r["deadline_s"] == pytest.approx(scn.network.round_timeout_s) for r in open_rounds
               if r["op"] in ("stage1_fit", "stage1_corr")), "the deadline in modeled seconds"
    steps = [len(v["rounds"]) for v in views]
    assert steps == sorted(steps) and steps[-1] > steps[0], "the round counter advanced"
    text = page + "\n".join(json.dumps(v) for v in views)
    assert token not in text and "password" not in text.lower() and "mqtt://" not in text
    view = json.loads((out / "live.json").read_text())
    assert view["run"]["status"] == "done" and view["rounds"] == views[-1]["rounds"]
    assert all(c["joined"] for c in view["fleet"].values())
    assert view["inference"]["has_matrix"]
    matrix = view["inference"]["matrix"]
    assert len(matrix) == scn.clients and all(abs(sum(row) - 1.0) < 0.01 for row in matrix)
    assert view["privacy"]["epsilon"] > 0
    assert {"model", "update", "corr"} <= set(view["traffic"]["per_kind"])
    assert view["traffic"]["links"], "the channel emulator's per-link stats reached the view"
    losses = [r["loss"] for r in view["rounds"] if r["op"] == "stage1_fit"]
    assert len(losses) == scn.stage1.rounds and all(isinstance(x, float) for x in losses)


async def test_nmoe_dashboard_follows_a_run_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    live = LiveRun(to_dict(toy_scenario(tmp_path)), "subprocess", out)  # writes live.json, as a run does
    source = FolderSource(out, poll_s=0.05)
    version, view = source.current()
    assert view["run"]["status"] == "running"
    live.event("client-1: missing in stage1 round 0 (stage1_fit)")
    live.update()
    await source.wait_change(version, timeout=5.0)
    version, view = source.current()
    assert view["events"][-1]["text"].startswith("client-1: missing")
    async with serving(source, "127.0.0.1", 0, "--port") as served, aiohttp.ClientSession() as s, \
            s.get(served.url + "view.json") as r:
        assert (await r.json())["events"] == view["events"]


async def test_the_token_sets_a_cookie_and_appears_on_no_page(tmp_path):
    live = LiveRun(to_dict(toy_scenario(tmp_path)), "inprocess", None)
    live.update()
    async with serving(live, "127.0.0.1", 0, require_token=True) as served:
        assert served.token and served.token in served.login_url and served.token not in served.url
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:  # unsafe: an IP host
            async with s.get(served.url) as r:
                assert r.status == 401
            async with s.get(served.login_url, allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/"
                assert "httponly" in r.headers["Set-Cookie"].lower()
            async with s.get(served.url) as r:  # the cookie from now on
                page = await r.text()
                assert r.status == 200 and "<canvas" in page
            async with s.get(served.url + "events") as r:
                first = (await read_events(r, lambda v: True))[0]
    assert served.token not in page and served.token not in json.dumps(first)
    assert first["run"]["name"] == "toy"


async def test_a_port_in_use_is_a_config_error_naming_it(tmp_path):
    live = LiveRun(to_dict(toy_scenario(tmp_path)), "inprocess", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--dashboard: port {port} on 127.0.0.1 is already in use"):
            async with serving(live, "127.0.0.1", port):
                pass


def test_nmoe_run_with_a_port_in_use_says_so_in_one_line(tmp_path, capsys):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["run", str(path), "--out", str(tmp_path / "out"), "--dashboard", str(port)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error")]
    assert rc == 2 and len(lines) == 1 and f"port {port}" in lines[0] and "already in use" in lines[0]
    assert main(["run", str(path), "--dashboard", "70000"]) == 2


def test_loopback_is_told_from_other_interfaces():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.7") and not is_loopback("example.org")


def test_the_fleet_shows_presets_and_devices_when_the_scenario_has_them():
    config = {"channel": {"model": "emulated", "preset": "wifi",
                          "clients": {"client-1": {"preset": "lte", "device": "pi4"}}}}
    assert link_and_device(config, "client-0") == ("wifi", None)
    assert link_and_device(config, "client-1") == ("lte", "pi4")
    assert link_and_device({"channel": {"model": "direct"}}, "client-0") == ("direct", None)


SUMMARY = """partition.tau,stage1.method,method,label,n_seeds,accuracy_mean,accuracy_ci95,f1_macro_mean,\
f1_macro_ci95,failed_seeds,error
0.1,fedce,nmoe,FedCE-NMoE (FedGate),2,0.61,0.05,0.58,0.04,0,
0.1,fedce,local,Local classifier,2,0.55,0.03,0.50,0.02,0,
0.5,fedce,nmoe,FedCE-NMoE (FedGate),1,0.71,,0.69,,1,boom
0.5,fedce,local,Local classifier,1,0.60,,0.57,,1,boom
"""


def self_contained(html: str) -> None:
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?(https?:)?//""", html), "nothing fetched"
    assert "Chart.js v3.9.1" in html and "Released under the MIT License" in html
    assert "</script" not in html.split('<script id="view"', 1)[1].split("</script>", 1)[0]


def test_the_report_of_a_sweep_holds_its_table_and_charts(tmp_path):
    (tmp_path / "summary.csv").write_text(SUMMARY)
    html = write_report(tmp_path).read_text()
    self_contained(html)
    view = json.loads(html.split('<script id="view" type="application/json">', 1)[1].split("</script>", 1)[0])
    sweep = view["sweep"]
    assert sweep["charts"]["accuracy"]["cells"] == ["0.1 · fedce", "0.5 · fedce"]
    assert sweep["charts"]["accuracy"]["axis"] == "partition.tau · stage1.method"
    assert sweep["charts"]["accuracy"]["methods"]["nmoe"] == [0.61, 0.71]
    assert len(sweep["rows"]) == 4 and sweep["runs"] == 4


def test_report_refuses_a_folder_that_is_neither_a_run_nor_a_sweep(tmp_path):
    with pytest.raises(ConfigError, match="neither results.json"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="not a run's results"):
        write_report(tmp_path)


def test_nmoe_run_writes_a_self_contained_report(tmp_path: Path):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    assert main(["run", str(path), "--inprocess", "--no-cache", "--out", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    self_contained(html)
    assert '"has_matrix": true' in html  # the routing matrix of the evaluation
    assert main(["report", str(tmp_path / "out")]) == 0
