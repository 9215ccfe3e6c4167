"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium. A toy networked
run started with `nmoe run ... --dashboard PORT` (the real command, its own process), then its
report.html. Skipped, with the reason, where chromium, its driver or selenium is missing (.ci
installs them). Set NMOE_SCREENSHOTS=DIR to keep the screenshots there too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOY

from broker.ports import free_port
from broker.server import find_mosquitto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # the dev extra installs it
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"),
]
SLOW_TOY = TOY + "channel: {model: emulated, preset: wifi, time_scale: 0.5}\n"


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2000"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, proc: subprocess.Popen | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
        except WebDriverException:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None and proc.returncode != 0:
            pytest.fail(f"the run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def keep(path: Path) -> None:
    target = os.environ.get("NMOE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def severe(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_the_live_view_and_the_report_in_chromium(tmp_path, browser):
    scenario = tmp_path / "toy.yaml"
    scenario.write_text(SLOW_TOY)
    port = free_port()
    out = tmp_path / "out"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scenarios.cli", "run", str(scenario), "--out", str(out),
                                 "--dashboard", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def load() -> bool:
            browser.get(f"http://127.0.0.1:{port}/")
            return "nmoe" in browser.title

        wait_for("the page", load, 60, proc)

        def online() -> bool:
            rows = browser.find_elements(By.CSS_SELECTOR, "#fleet tr[data-client]")
            return len(rows) == 3 and all(r.get_attribute("data-online") == "true" for r in rows)

        wait_for("every client online", online, 120, proc)
        steps = int(browser.find_element(By.ID, "round-counter").get_attribute("data-steps"))
        wait_for("the round counter to advance",
                 lambda: int(browser.find_element(By.ID, "round-counter").get_attribute("data-steps")) > steps,
                 120, proc)
        shot = tmp_path / "dashboard-live.png"
        browser.save_screenshot(str(shot))
        keep(shot)
        wait_for("the routing matrix after evaluation",
                 lambda: len(browser.find_elements(By.CSS_SELECTOR, "#routing-matrix tr[data-client]")) == 3, 180, proc)
        shot = tmp_path / "dashboard-live-evaluated.png"
        browser.save_screenshot(str(shot))
        keep(shot)
        assert not severe(browser), severe(browser)
        assert proc.wait(timeout=180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    report = out / "report.html"
    browser.get_log("browser")  # drained: the live page's server has gone with its run
    browser.get(report.as_uri())
    charts = wait_for("the report's charts", lambda: browser.execute_script(
        "return typeof Chart === 'undefined' ? 0 : Object.keys(Chart.instances).length"), 30)
    assert charts >= 4  # loss, accuracy, traffic, links
    drawn = browser.execute_script(
        "var c = document.getElementById('chart-loss'); var d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; var n = 0;"
        "for (var i = 3; i < d.length; i += 4) { if (d[i]) n++; } return n;")
    assert drawn > 1000, "the loss chart has pixels on it"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#routing-matrix tr[data-client]")) == 3
    assert not severe(browser), severe(browser)
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    keep(shot)
