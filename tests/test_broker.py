"""Broker lifecycle, authentication and ACL against a real mosquitto and the embedded amqtt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
from conftest import RUN, needs_mosquitto, raw_client, until

import broker.server as server
from broker.auth import Account, BrokerAddress, make_accounts
from broker.mqtt import LoopClient
from broker.ports import port_open
from broker.server import MosquittoBroker, RunningBroker, launch_broker
from nmoe.errors import BrokerError


def loop_client(address: BrokerAddress, cls: type[LoopClient] = LoopClient, **kwargs: object) -> LoopClient:
    """A LoopClient (or subclass) logged in with an account, its client id the account's name."""
    return cls(address.host, address.port, username=address.username, password=address.password,
               identifier=address.username, **kwargs)  # type: ignore[arg-type]  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def collect(client: aiomqtt.Client, quiet_s: float = 0.4) -> list[tuple[str, bytes]]:
    """Everything the client receives until nothing arrives for ``quiet_s``."""
    got: list[tuple[str, bytes]] = []
    while True:
        try:
            message = await asyncio.wait_for(anext(aiter(client.messages)), quiet_s)
        except asyncio.TimeoutError:
            return got
        got.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]


# -- lifecycle -------------------------------------------------------------------------------------
@needs_mosquitto
def test_mosquitto_starts_and_stops_by_its_own_pid(accounts: list[Account]) -> None:
    broker = MosquittoBroker(RUN, accounts)
    with broker:
        pid = broker.pid
        assert pid is not None and alive(pid) and port_open(broker.host, broker.port)
        passwords = (broker.run_dir / "passwords").read_text()
        assert all(a.password not in passwords for a in accounts)  # hashes only
        assert "running" in broker.log_tail()
        broker.stop()
        assert not alive(pid) and not port_open(broker.host, broker.port)
        broker.start()  # same port, same files
        assert broker.pid != pid and port_open(broker.host, broker.port)
        pid = broker.pid
    assert not alive(pid) and not broker.run_dir.exists()


@needs_mosquitto
def test_mosquitto_start_failure_shows_its_log(tmp_path: Path, accounts: list[Account]) -> None:
    template = tmp_path / "bad.conf"
    template.write_text(server.TEMPLATE.read_text() + "\nno_such_option 1\n")
    broker = MosquittoBroker(RUN, accounts, template=template)
    with pytest.raises(BrokerError) as err, broker:
        pass
    assert "no_such_option" in str(err.value) and broker.pid is None


@needs_mosquitto
async def test_launch_broker_stops_mosquitto_on_error(accounts: list[Account]) -> None:
    pid = None
    with pytest.raises(RuntimeError):
        async with launch_broker(RUN, accounts, prefer="mosquitto") as running:
            pid = running.pid
            assert running.kind == "mosquitto" and pid is not None and alive(pid)
            raise RuntimeError("boom")
    assert pid is not None and not alive(pid)


async def test_launch_broker_falls_back_to_amqtt(monkeypatch, caplog, accounts: list[Account]) -> None:
    monkeypatch.setattr(server, "find_mosquitto", lambda: None)
    monkeypatch.setattr(server, "_fallback_logged", False)
    with pytest.raises(BrokerError):
        async with launch_broker(RUN, accounts, prefer="mosquitto"):
            pass
    with caplog.at_level(logging.WARNING, logger="broker.server"):
        for _ in range(2):
            async with launch_broker(RUN, accounts) as running:
                assert running.kind == "amqtt" and port_open(running.host, running.port)
            assert not port_open(running.host, running.port)
    assert caplog.text.count("embedded amqtt") == 1


async def test_external_broker_is_used_as_is(monkeypatch, accounts: list[Account]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be started for an external broker")

    monkeypatch.setattr(server, "MosquittoBroker", refuse)
    external = BrokerAddress.parse("mqtts://someone@broker.example:8884")
    async with launch_broker(RUN, accounts, external=external) as running:
        assert (running.kind, running.host, running.port) == ("external", "broker.example", 8884)
        assert running.tls and running.pid is None
        addr = running.address_for("client-1")
        assert addr.username == "client-1" and addr.tls and addr.password == accounts[1].password


# -- authentication --------------------------------------------------------------------------------
async def test_bad_credentials_are_refused(broker: RunningBroker, caplog) -> None:
    good = broker.address_for("client-0")
    for username, password in (("client-0", "wrong"), ("nobody", "x"), (None, None)):
        bad = BrokerAddress(good.host, good.port, username, password)
        with pytest.raises(aiomqtt.MqttError):
            async with raw_client(bad):
                pass
    async with raw_client(good):
        pass
    assert all(a.password not in caplog.text for a in broker.accounts)


# -- ACL -------------------------------------------------------------------------------------------
async def test_agents_cannot_spoof_or_eavesdrop(broker: RunningBroker) -> None:
    p = f"nmoe/{RUN}"
    async with (
        raw_client(broker.address_for("client-0")) as c0,
        raw_client(broker.address_for("client-1")) as c1,
        raw_client(broker.address_for("channel")) as channel,
        raw_client(broker.address_for("observer")) as observer,
        raw_client(broker.address_for("coordinator")) as coord,
    ):
        await c0.subscribe(f"{p}/rx/client-0/#", qos=1)
        with pytest.raises(aiomqtt.MqttError) if broker.kind == "amqtt" else _nothing():
            await _subscribe_or_refuse(c1, f"{p}/rx/client-0/#")  # another agent's inbox
        await channel.subscribe(f"{p}/tx/#", qos=1)
        await observer.subscribe(f"{p}/status/#", qos=1)

        await coord.publish(f"{p}/rx/client-0/coordinator/model", b"legit-coord", qos=1)
        await c1.publish(f"{p}/rx/client-0/client-1/latent", b"legit-c1", qos=1)
        await c1.publish(f"{p}/rx/client-0/client-2/latent", b"spoofed-src", qos=1)
        await c1.publish(f"{p}/rx/client-0/coordinator/model", b"spoofed-coord", qos=1)
        await c1.publish(f"{p}/tx/client-0/coordinator/update", b"foreign-tx", qos=1)
        await c1.publish(f"{p}/tx/client-1/coordinator/update", b"own-tx", qos=1)
        await c1.publish(f"{p}/status/client-0", b"offline", qos=1)
        await c1.publish(f"{p}/status/client-1", b"online", qos=1)

        assert sorted(b for _, b in await collect(c0)) == [b"legit-c1", b"legit-coord"]
        assert await collect(c1) == []
        assert await collect(channel) == [(f"{p}/tx/client-1/coordinator/update", b"own-tx")]
        assert await collect(observer) == [(f"{p}/status/client-1", b"online")]


async def _subscribe_or_refuse(client: aiomqtt.Client, topic_filter: str) -> None:
    granted = await client.subscribe(topic_filter, qos=1)
    if any(getattr(code, "value", code) >= 0x80 for code in granted):
        raise aiomqtt.MqttError(f"refused: {topic_filter}")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@needs_mosquitto
async def test_emulated_mode_only_the_channel_writes_inboxes() -> None:
    accounts = make_accounts(["client-0", "client-1"])
    p = f"nmoe/{RUN}"
    async with (
        launch_broker(RUN, accounts, channel_mode="emulated", prefer="mosquitto") as running,
        raw_client(running.address_for("client-0")) as c0,
        raw_client(running.address_for("client-1")) as c1,
        raw_client(running.address_for("channel")) as channel,
    ):
        await c1.subscribe(f"{p}/rx/client-1/#", qos=1)
        await c0.publish(f"{p}/rx/client-1/client-0/latent", b"direct", qos=1)
        await channel.publish(f"{p}/rx/client-1/client-0/latent", b"relayed", qos=1)
        assert [b for _, b in await collect(c1)] == [b"relayed"]


@needs_mosquitto
async def test_mosquitto_checks_the_will_topic(mosquitto: MosquittoBroker) -> None:
    """A will on another agent's status topic is dropped; one's own goes out (amqtt cannot check)."""
    p = f"nmoe/{RUN}"
    async with raw_client(mosquitto.address_for("observer")) as observer:
        await observer.subscribe(f"{p}/status/#", qos=1)
        for target in ("client-0", "client-1"):
            addr = mosquitto.address_for("client-1")
            will = aiomqtt.Will(f"{p}/status/{target}", f"will-{target}".encode(), qos=1, retain=False)
            client = aiomqtt.Client(addr.host, addr.port, username=addr.username, password=addr.password,
                                    will=will)  # fmt: skip
            await client.__aenter__()
            sock = client._client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)  # an abrupt loss, so the broker publishes the will
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
        assert await collect(observer) == [(f"{p}/status/client-1", b"will-client-1")]


# -- connection takeover ---------------------------------------------------------------------------
@needs_mosquitto
async def test_one_account_cannot_knock_another_off(mosquitto: MosquittoBroker) -> None:
    """With client-0's login, connecting under client-1's client id (the old predictable one, or its
    username) or as client-1 with a wrong password leaves client-1's session connected."""
    from agents.bus import BusConfig, BusSession
    from broker.topics import Kind

    fast = dict(reconnect_initial_s=0.05, reconnect_max_s=0.3, connect_timeout_s=5.0)
    c0 = mosquitto.address_for("client-0")
    async with (
        BusSession(BusConfig(RUN, "client-1", mosquitto.address_for("client-1"), **fast)) as victim,
        BusSession(BusConfig(RUN, "client-2", mosquitto.address_for("client-2"), **fast)) as peer,
    ):
        for identifier in ("client-1", f"nmoe-{RUN}-client-1") * 5:
            async with aiomqtt.Client(c0.host, c0.port, username="client-0", password=c0.password,
                                      identifier=identifier):  # fmt: skip
                await asyncio.sleep(0.05)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(c0.host, c0.port, username="client-1", password=c0.password,
                                      identifier="client-1"):  # fmt: skip
                pass
        await asyncio.sleep(0.3)
        assert victim.connected and victim.stats.reconnects == 0
        await peer.send("client-1", Kind.METRICS, meta={"still": 1})
        assert (await victim.receive(timeout=5)).src == "client-2"
    assert "use_username_as_clientid true" in mosquitto.conf_path.read_text()


def test_accounts_file_gives_each_agent_its_password(tmp_path: Path) -> None:
    from broker.auth import accounts_with_passwords, read_accounts_file

    path = tmp_path / "accounts"
    path.write_text("# operator's file\ncoordinator:pw-c\nchannel:pw-ch\nclient-0:pw:0\n\nclient-1:pw-1\n")
    path.chmod(0o600)
    accounts = accounts_with_passwords(make_accounts(["client-0", "client-1"]), read_accounts_file(path), "f")
    assert {a.username: a.password for a in accounts} == {
        "client-0": "pw:0", "client-1": "pw-1", "coordinator": "pw-c", "channel": "pw-ch"}
    with pytest.raises(BrokerError, match="no password for client-2"):
        accounts_with_passwords(make_accounts(["client-2"]), read_accounts_file(path), "f")
    path.chmod(0o640)
    with pytest.raises(BrokerError, match="chmod 600"):
        read_accounts_file(path)
    for bad, why in (("client-0\n", "username:password"), ("a b:x\n", "invalid username"),
                     ("client-0:x\nclient-0:y\n", "twice")):
        path.write_text(bad)
        path.chmod(0o600)
        with pytest.raises(BrokerError, match=why):
            read_accounts_file(path)


def test_cli_refuses_an_accounts_file_readable_by_others(tmp_path: Path) -> None:
    from scenarios.cli import check_external_broker

    path = tmp_path / "accounts"
    path.write_text("coordinator:a\nchannel:b\nclient-0:c\n")
    path.chmod(0o644)
    with pytest.raises(BrokerError, match="mode 644"):
        check_external_broker("mqtt://coordinator@localhost:1883", path, 1)
    path.chmod(0o600)
    check_external_broker("mqtt://coordinator@localhost:1883", path, 1)
    with pytest.raises(BrokerError, match="no password for client-1"):
        check_external_broker("mqtt://coordinator@localhost:1883", path, 2)


# -- the loop client's write path ------------------------------------------------------------------
@needs_mosquitto
async def test_loop_client_keeps_every_byte_in_order_when_the_socket_fills(mosquitto: MosquittoBroker) -> None:
    """broker.mqtt.LoopClient writes on the loop's next turn and watches the socket only when its
    buffer is full: a burst far bigger than the buffer still arrives whole and in order, and the
    full-buffer path was taken (more writes than turns it scheduled)."""
    calls = {"soon": 0, "write": 0}

    class Counting(LoopClient):
        def _write_soon(self, client, sock):  # type: ignore[no-untyped-def]
            calls["soon"] += 1
            super()._write_soon(client, sock)

        def _write(self, client):  # type: ignore[no-untyped-def]
            calls["write"] += 1
            super()._write(client)

    rng = np.random.default_rng(11)
    payloads = [rng.bytes(256 * 1024) for _ in range(40)]  # 10 MiB at once
    topic = f"nmoe/{RUN}/rx/client-1/client-0/latent"
    sender = loop_client(mosquitto.address_for("client-0"), Counting, max_inflight_messages=64)
    async with raw_client(mosquitto.address_for("client-1")) as rx, sender:
        await rx.subscribe(topic, qos=1)
        await asyncio.gather(*(sender.publish(topic, p, qos=1) for p in payloads))
        await sender.publish(topic, b"last", qos=1)  # and a publish after the burst, on a quiet socket
        got = [payload for _topic, payload in await collect(rx, quiet_s=1.0)]
    assert got == [*payloads, b"last"]
    assert calls["write"] > calls["soon"] >= 2


@needs_mosquitto
async def test_loop_client_publish_frames_returns_once_the_broker_has_every_frame(mosquitto: MosquittoBroker) -> None:
    """publish_frames (the bus's publish path) returns when every frame is acknowledged, not
    before; frames arrive whole and in order; a cancelled call leaves nothing in aiomqtt's table of
    pending publishes, and its frames still go out."""
    rng = np.random.default_rng(12)
    frames = [rng.bytes(64 * 1024) for _ in range(20)] + [b"tail"]
    topic = f"nmoe/{RUN}/rx/client-1/client-0/latent"
    sender = loop_client(mosquitto.address_for("client-0"), max_inflight_messages=8)
    async with raw_client(mosquitto.address_for("client-1")) as rx, sender:
        await rx.subscribe(topic, qos=1)
        assert await sender.publish_frames(topic, frames, 1) == [None] * len(frames)
        assert not sender._client._out_messages  # paho holds no unacknowledged message any more
        assert not sender._pending_publishes
        task = asyncio.create_task(sender.publish_frames(topic, [b"late-1", b"late-2"], 1))
        await asyncio.sleep(0)  # queued, not yet acknowledged
        assert len(sender._pending_publishes) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not sender._pending_publishes
        got = [payload for _topic, payload in await collect(rx, quiet_s=1.0)]
    assert got == [*frames, b"late-1", b"late-2"]


@needs_mosquitto
async def test_loop_client_delivers_in_order_and_a_raising_handler_costs_one_message(
    mosquitto: MosquittoBroker, caplog
) -> None:
    """With ``deliver``, messages reach the handler as they are read, in order, and never wait in
    aiomqtt's queue; a handler that raises loses that message (logged), not the connection."""
    got: list[bytes] = []

    def deliver(message: aiomqtt.Message) -> None:
        if message.payload == b"bad":
            raise ValueError("a bug in the handler")
        got.append(bytes(message.payload))  # type: ignore[arg-type]

    topic = f"nmoe/{RUN}/rx/client-1/client-0/latent"
    receiver = loop_client(mosquitto.address_for("client-1"), deliver=deliver)
    sent = [b"1", b"bad", b"2", *(str(i).encode() for i in range(3, 200))]
    async with receiver, raw_client(mosquitto.address_for("client-0")) as tx:
        await receiver.subscribe(topic, qos=1)
        for payload in sent:
            await tx.publish(topic, payload, qos=1)
        await until(lambda: len(got) >= len(sent) - 1, timeout=2.0)
        assert len(receiver.messages) == 0  # nothing went through aiomqtt's queue
        await receiver.publish(f"nmoe/{RUN}/status/client-1", b"online", qos=1)  # the connection is alive
    assert got == [p for p in sent if p != b"bad"]
    assert "the message is dropped" in caplog.text and "a bug in the handler" in caplog.text
