"""Fixtures for broker and bus tests: a real mosquitto on a free port (stopped by its own PID),
the embedded amqtt broker, and run accounts. Pure wire tests need none of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiomqtt
import pytest

from broker.auth import Account, BrokerAddress, make_accounts
from broker.server import MosquittoBroker, RunningBroker, find_mosquitto, launch_broker

RUN = "t1"
CLIENTS = ("client-0", "client-1", "client-2")

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


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


def raw_client(address: BrokerAddress, name: str = "raw") -> aiomqtt.Client:
    """A plain aiomqtt client logged in with an account (to inject bytes or eavesdrop)."""
    return aiomqtt.Client(
        address.host, address.port, username=address.username, password=address.password,
        identifier=f"{name}-{address.username}",
    )  # fmt: skip
