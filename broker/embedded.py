"""The embedded fallback broker: amqtt, in-process on the asyncio loop, with our accounts and ACL.

Used when no mosquitto binary is installed. Two plugins carry the same rules as mosquitto's
password and ACL files (broker/auth.py): :class:`NmoeAuthPlugin` checks the ``$7$`` password
hashes, :class:`NmoeTopicPlugin` checks every publish, subscribe and delivery.

What amqtt 0.12 cannot enforce, unlike mosquitto:

- The last-will topic is not checked against the ACL (amqtt publishes wills without the topic
  plugins), so a client could set a will on another agent's status topic.
- There is no packet size limit (no ``max_packet_size``): the bus's chunking keeps packets small,
  but a misbehaving client may send one huge publish.
- A subscription outside the ACL is refused in its SUBACK (0x80) rather than granted and filtered.
- Client ids are not tied to accounts (no ``use_username_as_clientid``): one account connecting
  under another agent's client id takes that agent's connection over (MQTT's session takeover).
  nmoe's own clients use their username as client id, so honest runs behave as with mosquitto;
  an authenticated but hostile client can knock another agent off. Use mosquitto where that matters.

amqtt 0.12 also sends every connecting client the retained messages of *all* clients'
subscriptions, without any ACL check; :class:`_Broker` closes that leak by sending retained
messages only for the session's own, permitted subscriptions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.errors import PluginError, PluginLoadError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.auth import Account, AclRules, ChannelMode, acl_rules, password_hash, verify_password
from broker.ports import free_port
from broker.topics import Topics
from nmoe.errors import BrokerError

log = logging.getLogger(__name__)


class NmoeAuthPlugin(BaseAuthPlugin):
    """Username/password check against mosquitto-format (``$7$``) hashes."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)  # username -> $7$ hash

    async def authenticate(self, *, session: Session) -> bool | None:
        hashed = self.config.users.get(session.username or "")
        return hashed is not None and verify_password(session.password or "", hashed)


class NmoeTopicPlugin(BaseTopicPlugin):
    """Per-user read and write topic filters, the same as mosquitto's ACL file."""

    @dataclass
    class Config:
        read: dict[str, list[str]] = field(default_factory=dict)
        write: dict[str, list[str]] = field(default_factory=dict)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        users = set(self.config.read) | set(self.config.write)
        cfg = self.config
        self._rules = {u: AclRules(tuple(cfg.read.get(u, ())), tuple(cfg.write.get(u, ()))) for u in users}

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        rules = self._rules.get(session.username or "") if session is not None else None
        if rules is None or not topic:
            return False
        if action == Action.PUBLISH:
            return rules.may_write(topic)
        if action == Action.SUBSCRIBE:
            return rules.may_subscribe(topic)
        return rules.may_receive(topic)


class _Broker(Broker):
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        mine = any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, []))
        if mine and await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class AmqttBroker:
    """An amqtt broker for one run, on a loopback port, stopped by ``stop()``."""

    def __init__(
        self,
        run_id: str,
        accounts: Sequence[Account],
        *,
        channel_mode: ChannelMode = "direct",
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.topics = Topics(run_id)
        self.accounts = tuple(accounts)
        self.host = host
        self.port = port if port is not None else free_port(host)
        rules = {a.username: acl_rules(a, self.topics, channel_mode) for a in self.accounts}
        hashes = {a.username: password_hash(a.password) for a in self.accounts}
        self._config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self.port}", "max_connections": 0}},
            "plugins": {
                f"{__name__}.NmoeAuthPlugin": {"users": hashes},
                f"{__name__}.NmoeTopicPlugin": {
                    "read": {u: list(r.read) for u, r in rules.items()},
                    "write": {u: list(r.write) for u, r in rules.items()},
                },
            },
        }
        self._broker: _Broker | None = None

    async def start(self) -> None:
        if self._broker is not None:
            return
        try:
            self._broker = _Broker(self._config)
            await self._broker.start()
        except (AmqttBrokerError, PluginError, PluginLoadError, OSError, ValueError) as err:
            self._broker = None
            where = f"{self.host}:{self.port}"
            raise BrokerError(f"embedded amqtt broker failed to start on {where}: {err}") from err
        log.info("embedded amqtt broker listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("embedded amqtt broker stopped")
