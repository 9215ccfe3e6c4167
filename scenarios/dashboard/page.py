"""The page: one HTML file with its style, Chart.js and its own script inlined, and the view
embedded as JSON. The live dashboard serves it (and then streams views); the report writes it."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def script_safe(text: str) -> str:
    """Text that cannot end the <script> element it is inlined in."""
    return text.replace("</", "<\\/")


def embed_json(data: Any) -> str:
    # <, > and & escaped as \\u sequences: JSON inside <script> is then plain data, whatever it holds
    text = json.dumps(data, allow_nan=False, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(view: dict[str, Any], live: bool) -> str:
    """The page for ``view``: live (it follows /events) or a static report."""
    title = "nmoe " + ("live: " if live else "report: ") + str((view.get("run") or view.get("sweep") or {})
                                                               .get("name") or "")
    html = asset("dashboard.html")
    parts = {
        "TITLE": title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"),
        "MODE": "live" if live else "report",
        "STYLE": asset("dashboard.css"),
        "CHART_JS": script_safe(asset("chart.min.js")),
        "APP_JS": script_safe(asset("dashboard.js")),
        "VIEW_JSON": embed_json(view),
    }
    for key, value in parts.items():  # one pass per placeholder; no value holds another's marker
        html = html.replace("{{" + key + "}}", value)
    return html
