"""Who may connect and what each may read and write: accounts, ACL rules, broker addresses.

One account per agent (username = agent id) with a generated password, per run. The rules:

========== ============================================ ==========================================
role       write                                        read
========== ============================================ ==========================================
agent      ``tx/<id>/#``, ``held/+/<id>/#``,            ``rx/<id>/#``, ``rx/all/#``,
           ``status/<id>``, and in direct mode          ``held/<id>/#``, ``held/all/#``,
           ``rx/+/<id>/#``                              ``status/coordinator``
coordinator as agent                                    as agent, plus ``status/#``
channel    ``rx/#``, ``status/<id>``                    ``tx/#``
observer   nothing                                      ``status/#``
========== ============================================ ==========================================

Because rx topics carry the sender (``rx/<dst>/<src>/<kind>``) and the decoder insists that the
header's src matches the topic, the ACL is what authenticates senders. Held bodies
(``held/<dst>/<src>/<kind>``, broker/held.py) carry the sender the same way, and reach an
application only with a release on ``rx/``, which with an emulated channel only the channel writes.
Passwords never appear in reprs, logs or errors (``field(repr=False)``);
:meth:`BrokerAddress.redacted` is safe to print.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from broker.topics import Topics, check_agent_id
from nmoe.errors import BrokerError, WireError

ChannelMode = Literal["direct", "emulated"]
CHANNEL_MODES: tuple[str, ...] = ("direct", "emulated")
PASSWORD_ENV = "NMOE_BROKER_PASSWORD"
COORDINATOR_ID = "coordinator"  # agents may read its status (they give up when it is gone for good)
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's own default; the passwords are 192-bit random anyway


class Role(str, enum.Enum):
    AGENT = "agent"
    COORDINATOR = "coordinator"
    CHANNEL = "channel"
    OBSERVER = "observer"


@dataclass(frozen=True)
class Account:
    """One broker login. ``str()``/``repr()`` never show the password."""

    username: str
    password: str = field(repr=False)
    role: Role = Role.AGENT

    def __post_init__(self) -> None:
        check_agent_id(self.username, "username")
        object.__setattr__(self, "role", Role(self.role))
        if not self.password:
            raise ValueError(f"account {self.username} has an empty password")


def new_password() -> str:
    return secrets.token_urlsafe(24)


def make_accounts(
    client_ids: Iterable[str],
    *,
    coordinator: str | None = COORDINATOR_ID,
    channel: str | None = "channel",
    observers: Iterable[str] = (),
) -> list[Account]:
    """Fresh accounts with generated passwords for one run (coordinator and channel optional)."""
    accounts = [Account(cid, new_password(), Role.AGENT) for cid in client_ids]
    if coordinator is not None:
        accounts.append(Account(coordinator, new_password(), Role.COORDINATOR))
    if channel is not None:
        accounts.append(Account(channel, new_password(), Role.CHANNEL))
    accounts += [Account(name, new_password(), Role.OBSERVER) for name in observers]
    names = [a.username for a in accounts]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate account names in {names}")
    return accounts


def find_account(accounts: Sequence[Account], username: str) -> Account:
    for account in accounts:
        if account.username == username:
            return account
    raise BrokerError(f"no broker account for {username!r}")


def read_accounts_file(path: Path) -> dict[str, str]:
    """Per-agent passwords for an external broker: one ``username:password`` a line (``#`` comments).

    The file must be readable by its owner only (mode 0600 or stricter), like an SSH key: it holds
    every agent's secret in clear. Usernames are agent ids; each may appear once.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BrokerError(f"cannot read broker accounts file {path}: {err}") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BrokerError(f"broker accounts file {path} is mode {stat.S_IMODE(mode):o}: it holds passwords, "
                          f"make it readable by you only (chmod 600 {path})")
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        where = f"{path}, line {number}"
        if not sep or not password:
            raise BrokerError(f"{where}: expected username:password")
        try:
            check_agent_id(user, "username")
        except WireError as err:
            raise BrokerError(f"{where}: {err}") from err
        if user in out:
            raise BrokerError(f"{where}: {user} appears twice")
        out[user] = password
    return out


def accounts_with_passwords(accounts: Iterable[Account], passwords: dict[str, str], source: str) -> list[Account]:
    """The run's accounts with the passwords an external broker knows them by; every one is needed."""
    accounts = list(accounts)
    missing = [a.username for a in accounts if a.username not in passwords]
    if missing:
        raise BrokerError(f"{source} has no password for {', '.join(missing)} (one line per agent: "
                          f"{', '.join(a.username for a in accounts)})")
    return [Account(a.username, passwords[a.username], a.role) for a in accounts]


@dataclass(frozen=True)
class AclRules:
    """Topic filters one account may read (subscribe and receive) and write (publish)."""

    read: tuple[str, ...]
    write: tuple[str, ...]

    def may_write(self, topic: str) -> bool:
        return any(topic_matches(rule, topic) for rule in self.write)

    def may_receive(self, topic: str) -> bool:
        return any(topic_matches(rule, topic) for rule in self.read)

    def may_subscribe(self, topic_filter: str) -> bool:
        return any(filter_covers(rule, topic_filter) for rule in self.read)


def acl_rules(account: Account, topics: Topics, channel_mode: ChannelMode) -> AclRules:
    if channel_mode not in CHANNEL_MODES:
        raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}")
    me, p = account.username, topics.prefix
    if account.role is Role.OBSERVER:
        return AclRules(read=(topics.status_filter(),), write=())
    if account.role is Role.CHANNEL:
        return AclRules(read=(topics.tx_filter(),), write=(topics.rx_filter(), topics.status(me)))
    write = [f"{p}/tx/{me}/#", f"{p}/held/+/{me}/#", topics.status(me)]
    if channel_mode == "direct":
        write.append(f"{p}/rx/+/{me}/#")
    read = [*topics.inbox_filters(me), *topics.held_filters(me)]
    if account.role is Role.COORDINATOR:
        read.append(topics.status_filter())
    else:
        read.append(topics.status(COORDINATOR_ID))
    return AclRules(read=tuple(read), write=tuple(write))


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete topic against a filter with ``+`` and ``#``."""
    fl, tl = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(fl):
        if level == "#":
            return True
        if i >= len(tl) or (level != "+" and level != tl[i]):
            return False
    return len(fl) == len(tl)


def filter_covers(rule: str, topic_filter: str) -> bool:
    """True if every topic matched by ``topic_filter`` is also matched by ``rule``."""
    rl, fl = rule.split("/"), topic_filter.split("/")
    for i, level in enumerate(rl):
        if level == "#":
            return True
        if i >= len(fl) or fl[i] == "#" or (level != "+" and (fl[i] == "+" or level != fl[i])):
            return False
    return len(rl) == len(fl)


# -- mosquitto files ------------------------------------------------------------------------------
def password_hash(password: str, salt: bytes | None = None) -> str:
    """mosquitto's ``$7$`` format: PBKDF2-HMAC-SHA512, base64 salt and digest (2.0 and 2.1)."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except ValueError:
        return False


def render_password_file(accounts: Iterable[Account]) -> str:
    return "".join(f"{a.username}:{password_hash(a.password)}\n" for a in accounts)


def render_acl_file(accounts: Iterable[Account], topics: Topics, channel_mode: ChannelMode) -> str:
    lines = [f"# nmoe run {topics.run_id}, channel {channel_mode}: generated, do not edit"]
    for account in accounts:
        rules = acl_rules(account, topics, channel_mode)
        lines += ["", f"user {account.username}"]
        lines += [f"topic read {t}" for t in rules.read]
        lines += [f"topic write {t}" for t in rules.write]
    return "\n".join(lines) + "\n"


# -- addresses ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerAddress:
    """Where and as whom to connect. The password is kept out of repr and of :meth:`redacted`."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # TLS: trust only this CA certificate (PEM); None: the system's CAs

    def __post_init__(self) -> None:
        if not self.host:
            raise BrokerError("broker address has no host")
        if not 0 < self.port < 65536:
            raise BrokerError(f"broker port {self.port} is out of range")
        if self.ca_file is not None and not self.tls:
            raise BrokerError("a CA certificate (?ca=) only applies to mqtts:// addresses")

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt[s]://[user[:password]@]host[:port][?ca=PATH]``; the password may come from
        $NMOE_BROKER_PASSWORD; ``ca`` names the CA certificate an mqtts broker is verified with."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as err:
            raise BrokerError(f"cannot parse broker address {_redact_url(url)!r}") from err
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            shown = _redact_url(url)
            raise BrokerError(f"broker address must look like mqtt[s]://user@host:port, got {shown!r}")
        tls = parts.scheme == "mqtts"
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else os.environ.get(PASSWORD_ENV)
        query = parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"ca"} or len(query.get("ca", [])) > 1:
            raise BrokerError(f"broker address {_redact_url(url)!r}: the only query parameter is ?ca=PATH")
        ca_file = query["ca"][0] if "ca" in query else None
        return cls(parts.hostname, port or (8883 if tls else 1883), username, password or None, tls, ca_file)

    def redacted(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.redacted()

    def url(self) -> str:
        """The address for a command line: user but never the password, and the CA if any."""
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        ca = f"?ca={quote(self.ca_file)}" if self.ca_file is not None else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}{ca}"

    def with_account(self, account: Account) -> BrokerAddress:
        return BrokerAddress(self.host, self.port, account.username, account.password, self.tls, self.ca_file)


def _redact_url(url: str) -> str:
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, creds = head.partition("://")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}"
