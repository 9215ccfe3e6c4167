"""``nmoe dashboard RUN_DIR``: the live view of a run started without ``--dashboard`` (or of a
finished one), served from its folder: every networked run keeps ``live.json`` there current
(``LiveRun``), and this reads it again whenever the file changes."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console

from nmoe.errors import ConfigError

from .server import serving
from .view import view_from_run

log = logging.getLogger(__name__)


class FolderSource:
    """The view of a run folder, read again when live.json or results.json changes."""

    def __init__(self, folder: Path, poll_s: float = 0.5) -> None:
        self.folder = folder
        self.poll_s = poll_s
        self.version = 0
        self._stamp: tuple[int, int] = (-1, -1)
        self._view: dict[str, Any] = {}
        self.refresh()

    def _mtimes(self) -> tuple[int, int]:
        def mtime(name: str) -> int:
            path = self.folder / name
            return path.stat().st_mtime_ns if path.is_file() else 0
        return mtime("live.json"), mtime("results.json")

    def refresh(self) -> None:
        stamp = self._mtimes()
        if stamp == self._stamp:
            return
        try:
            self._view = view_from_run(self.folder)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a file replaced under us: next poll
            log.warning("could not read the view of %s: %s", self.folder, err)
            return
        self._stamp = stamp
        self.version += 1

    def current(self) -> tuple[int, dict[str, Any]]:
        return self.version, self._view

    async def wait_change(self, version: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.version == version and loop.time() < end:
            await asyncio.sleep(self.poll_s)
            self.refresh()


def attach(folder: Path, host: str, port: int, console: Console) -> int:
    if not ((folder / "live.json").is_file() or (folder / "results.json").is_file()):
        raise ConfigError(f"dashboard: {folder} has no live.json or results.json (is it the folder of a "
                          f"networked run?)")
    try:
        json.loads((folder / ("live.json" if (folder / "live.json").is_file() else "results.json")).read_text())
    except ValueError as err:
        raise ConfigError(f"dashboard: {folder}: not a run's view ({err})") from err

    async def serve() -> None:
        source = FolderSource(folder)
        async with serving(source, host, port, "--port") as served:
            console.print(f"dashboard of {folder}: {served.login_url}  (Ctrl-C to stop)", highlight=False)
            await asyncio.Event().wait()  # until Ctrl-C

    asyncio.run(serve())
    return 0
