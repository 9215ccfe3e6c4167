"""Fixtures for broker and bus tests: a real mosquitto on a free port (stopped by its own PID),
the embedded amqtt broker, and run accounts. Pure wire tests need none of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
from rich.console import Console

from broker.auth import Account, BrokerAddress, make_accounts
from broker.server import MosquittoBroker, RunningBroker, find_mosquitto, launch_broker

RUN = "t1"
CLIENTS = ("client-0", "client-1", "client-2")

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@pytest.fixture(scope="session")
def _session_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(autouse=True)
def _own_stage_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _session_data_cache: Path) -> None:
    """Every test gets an empty stage cache of its own (never the user's ~/.cache/nmoe), and the
    session one folder for decompressed datasets (never the user's ~/.cache/nmoe-data)."""
    monkeypatch.setenv("NMOE_CACHE", str(tmp_path / "stage-cache"))
    monkeypatch.setenv("NMOE_DATA_CACHE", str(_session_data_cache))


@pytest.fixture
def accounts() -> list[Account]:
    return make_accounts(CLIENTS, observers=("observer",))


@pytest.fixture
def mosquitto(accounts: list[Account]) -> Iterator[MosquittoBroker]:
    """A mosquitto for run ``t1`` in direct mode; the test may stop() and start() it again."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(RUN, accounts) as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "amqtt"])
async def broker(request: pytest.FixtureRequest, accounts: list[Account]) -> AsyncIterator[RunningBroker]:
    """Each broker kind in turn, direct mode."""
    if request.param == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    async with launch_broker(RUN, accounts, prefer=request.param) as running:
        yield running


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``predicate()`` holds, checking every 20 ms; TimeoutError after ``timeout`` s."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def raw_client(address: BrokerAddress, name: str = "raw") -> aiomqtt.Client:
    """A plain aiomqtt client logged in with an account (to inject bytes or eavesdrop)."""
    return aiomqtt.Client(
        address.host, address.port, username=address.username, password=address.password,
        identifier=f"{name}-{address.username}",
    )  # fmt: skip


# -- scenarios at toy size (pipeline and networked tests) ----------------------------------------------
TOY = """
name: toy
seed: 3
clients: 3
threads: 1
data: {name: synthetic, synthetic_train: 2000}
partition: {kind: noniid, tau: 0.5, train_per_client: 96, test_per_client: 48}
model: {head_hidden: 16, gate_hidden: 8}
stage1: {method: fedsc, rounds: 2, batch_size: 32}
stage2: {epochs: 2}
stage3: {rounds: 2, local_epochs: 1}
network: {join_timeout_s: 90, round_timeout_s: 90, inference_deadline_s: 10, agent_threads: 1}
"""
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def toy_scenario(tmp_path: Path, overrides: list[str] | None = None, text: str = TOY):  # -> Scenario
    """A scenario file written to tmp_path and loaded the way `nmoe run` loads one."""
    from scenarios.scenario import load_scenario

    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return load_scenario(str(path), overrides or [])


def quiet() -> Console:
    """A console for runs whose display no one reads."""
    return Console(file=open("/dev/null", "w"), width=120)  # noqa: SIM115
