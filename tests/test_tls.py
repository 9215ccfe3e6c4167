"""TLS (issue 11, point 11): `network.tls: true` gives the run's mosquitto a TLS-only listener with a
CA made for the run; agents trust only that CA. Plaintext clients and clients trusting another CA
cannot connect; a TLS run completes."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
from conftest import RUN, needs_mosquitto, quiet, toy_scenario

from agents.bus import BusConfig, BusSession
from broker.auth import Account, BrokerAddress, make_accounts
from broker.server import MosquittoBroker, RunningBroker, find_mosquitto, launch_broker
from broker.tls import client_context, make_tls_files, server_names
from broker.topics import Kind
from nmoe.errors import BrokerError
from scenarios.agent_groups import external_instructions
from scenarios.networked import run_networked_scenario


@pytest.fixture
def tls_mosquitto(accounts: list[Account]) -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(RUN, accounts, tls=True) as broker:
        yield broker


def _client(address: BrokerAddress, tls_context: ssl.SSLContext | None, timeout: float = 3) -> aiomqtt.Client:
    return aiomqtt.Client(
        address.host, address.port, username=address.username, password=address.password,
        identifier=f"probe-{address.username}", tls_context=tls_context, timeout=timeout,
    )  # fmt: skip


def test_addresses_carry_the_ca_through_command_lines() -> None:
    addr = BrokerAddress("127.0.0.1", 8883, "client-0", "secret", tls=True, ca_file="/tmp/run dir/ca.crt")
    again = BrokerAddress.parse(addr.url())
    assert (again.host, again.port, again.username, again.tls, again.ca_file) == (
        "127.0.0.1", 8883, "client-0", True, "/tmp/run dir/ca.crt",
    )  # fmt: skip
    assert "secret" not in addr.url() and again.password is None


@pytest.mark.parametrize("url", ["mqtt://h:1883?ca=x.crt", "mqtts://h:8883?cafile=x", "mqtts://h?ca=a&ca=b"])
def test_bad_ca_queries_are_refused(url: str) -> None:
    with pytest.raises(BrokerError):
        BrokerAddress.parse(url)


def test_the_server_certificate_names_what_agents_dial(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path, server_names("127.0.0.1"), "r1")
    assert oct(files.key.stat().st_mode & 0o777) == "0o600"
    ctx = client_context(files.ca)  # loads, and is the verifying kind
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


@needs_mosquitto
async def test_a_tls_session_exchanges_messages(tls_mosquitto: MosquittoBroker) -> None:
    fast = dict(reconnect_initial_s=0.05, reconnect_max_s=0.3, connect_timeout_s=5.0)
    a, b = (tls_mosquitto.address_for(x) for x in ("client-0", "client-1"))
    assert a.tls and a.ca_file is not None
    async with (
        BusSession(BusConfig(RUN, "client-0", a, **fast)) as c0,
        BusSession(BusConfig(RUN, "client-1", b, **fast)) as c1,
    ):
        await c0.send("client-1", Kind.LATENT, {"h": np.ones((2, 3), np.float32)})
        msg = await c1.receive(timeout=5)
    assert np.array_equal(msg.tensors["h"], np.ones((2, 3), np.float32))


@needs_mosquitto
async def test_a_plaintext_client_is_refused(tls_mosquitto: MosquittoBroker) -> None:
    with pytest.raises(aiomqtt.MqttError):  # the broker resets it; paho then reports a timeout
        async with _client(tls_mosquitto.address_for("client-0"), None, timeout=1):
            pass
    assert "SSL routines" in tls_mosquitto.log_tail(), tls_mosquitto.log_tail()


@needs_mosquitto
async def test_a_client_trusting_another_ca_cannot_connect(tls_mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    other = make_tls_files(tmp_path, ["127.0.0.1"], "impostor")
    address = tls_mosquitto.address_for("client-0")
    for context in (client_context(other.ca), client_context(None)):  # another CA; the system's CAs
        with pytest.raises(aiomqtt.MqttError, match="(?i)certificate"):
            async with _client(address, context):
                pass
    async with _client(address, client_context(address.ca_file)):  # the run's own CA works
        pass


def test_external_agents_get_mqtts_command_lines_and_the_ca(tmp_path: Path) -> None:
    ca = make_tls_files(tmp_path, ["127.0.0.1"], "r1").ca
    scn = toy_scenario(tmp_path, ["network.tls=true"])
    broker = RunningBroker("mosquitto", "0.0.0.0", 8883, tuple(make_accounts(["client-0", "client-1", "client-2"])),
                           tls=True, ca_file=str(ca))  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    lines = external_instructions(scn, "toy", broker, tmp_path / "scenario.yaml", out).read_text()
    assert "--broker 'mqtts://client-2@<this-host>:8883?ca=ca.crt'" in lines
    assert (out / "ca.crt").read_bytes() == ca.read_bytes()


def test_listening_everywhere_names_this_machine() -> None:
    import socket

    names = server_names("0.0.0.0")
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= set(names)


@needs_mosquitto
def test_a_tls_run_completes(tmp_path: Path) -> None:
    scn = toy_scenario(tmp_path, ["network.tls=true", "stage1.rounds=1", "stage3.rounds=1"])
    result = run_networked_scenario(scn, tmp_path / "run", quiet(), "inprocess")
    traffic = result["traffic"]
    assert traffic["broker"] == "mosquitto" and traffic["joined"] == ["client-0", "client-1", "client-2"]
    assert sum(traffic["rejected"].values()) == 0
    assert 0.0 <= result["methods"]["nmoe"]["accuracy"] <= 1.0


def test_tls_needs_mosquitto_not_amqtt() -> None:
    async def start() -> None:
        async with launch_broker(RUN, make_accounts(["client-0"]), prefer="amqtt", tls=True):
            pass

    with pytest.raises(BrokerError, match="network.tls needs mosquitto"):
        asyncio.run(start())
