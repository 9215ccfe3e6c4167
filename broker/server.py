"""Broker lifecycle: mosquitto as a child process, the embedded amqtt fallback, or an external one.

mosquitto is started from the top-level ``mosquitto.conf`` (a template) on a free loopback port, in
its own temporary directory holding the generated config, password file, ACL file and log. It is
stopped by its own PID (terminate, wait, kill), and a finalizer kills it should its owner forget.
Without a mosquitto binary the embedded amqtt broker runs in-process on the asyncio loop, with the
same accounts and ACL (see :class:`broker.embedded.AmqttBroker` for what amqtt cannot enforce).
An external broker (``--broker mqtt[s]://...``) is used as is: nothing is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import resource
import shutil
import string
import subprocess
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker.auth import (
    Account,
    BrokerAddress,
    ChannelMode,
    find_account,
    render_acl_file,
    render_password_file,
)
from broker.lifetime import dying_with, make_run_dir, wait_exited
from broker.ports import free_port, port_open
from broker.tls import TlsFiles, make_tls_files, server_names
from broker.topics import Topics
from nmoe.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "amqtt", "external"]
Prefer = Literal["auto", "mosquitto", "amqtt"]
TEMPLATE = Path(__file__).resolve().parent.parent / "mosquitto.conf"
_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/snap/bin")
_fallback_logged = False


def ensure_open_files(needed: int, what: str) -> int:
    """Raise this process' soft limit of open files to ``needed`` (its children inherit it: mosquitto,
    the agents); a ConfigError naming ``clients`` when the hard limit is lower. Returns the soft
    limit now in force. A common soft limit is 1024: mosquitto with 1000 agents' connections, or
    one process holding 1000 agents' sessions, would run out of descriptors mid-join."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return int(soft)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"clients: {what} need about {needed} open files, but the hard limit is {hard} "
                          "(ulimit -Hn): raise it (LimitNOFILE= in systemd, nofile in /etc/security/limits.conf) "
                          "or use fewer clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH, then the usual sbin folders), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SEARCH_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop one child process we started: SIGTERM, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    deadline = time.monotonic() + timeout
    wait_exited(proc.pid, timeout)  # returns as it exits (Popen.wait alone polls)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _drop_user() -> str:
    """The user mosquitto drops to when started as root (it must be able to read the run dir)."""
    for name in ("mosquitto", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return "root"


class MosquittoBroker:
    """One mosquitto process for one run; usable as a (sync) context manager.

    ``stop()`` then ``start()`` restarts it on the same port with the same files (tests use this to
    simulate a broker outage).
    """

    def __init__(
        self,
        run_id: str,
        accounts: Sequence[Account],
        *,
        channel_mode: ChannelMode = "direct",
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        template: Path = TEMPLATE,
        persistence: bool = False,
        tls: bool = False,
    ) -> None:
        self.topics = Topics(run_id)
        self.accounts = tuple(accounts)
        self.channel_mode: ChannelMode = channel_mode
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto); or use prefer='amqtt'")
        self.template = template
        self.persistence = persistence
        self.tls = tls
        self.tls_files: TlsFiles | None = None  # once write_files() made them
        self.run_dir = make_run_dir(run_id)  # removed by close(), or by a later run if we are killed
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.run_dir, True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_finalizer: weakref.finalize[..., MosquittoBroker] | None = None

    @property
    def conf_path(self) -> Path:
        return self.run_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def write_files(self) -> None:
        """Render config, password file and ACL into the run directory."""
        pw = self.run_dir / "passwords"
        acl = self.run_dir / "acl"
        pw.write_text(render_password_file(self.accounts))
        acl.write_text(render_acl_file(self.accounts, self.topics, self.channel_mode))
        tls = "# plaintext listener (network.tls: false)"
        if self.tls:
            if self.tls_files is None:  # once per broker: a restart keeps the CA its clients trust
                self.tls_files = make_tls_files(self.run_dir, server_names(self.host), self.topics.run_id)
            f = self.tls_files
            tls = f"cafile {f.ca}\ncertfile {f.cert}\nkeyfile {f.key}\ntls_version tlsv1.2"
        try:
            text = string.Template(self.template.read_text()).substitute(
                port=self.port, host=self.host, password_file=pw, acl_file=acl, run_dir=self.run_dir,
                user=_drop_user(), persistence="true" if self.persistence else "false", tls=tls,
            )  # fmt: skip
        except (OSError, KeyError, ValueError) as err:
            raise BrokerError(
                f"cannot render mosquitto config from {self.template}: {err} (the template is the repository's "
                "top-level mosquitto.conf: install nmoe from a checkout with `pip install -e .`)"
            ) from err
        self.conf_path.write_text(text)
        for path in (pw, acl, self.conf_path):
            path.chmod(0o600)
        if os.geteuid() == 0:  # mosquitto reads the files after dropping to its own user
            entry = pwd.getpwnam(_drop_user())
            tls_paths = (self.tls_files.cert, self.tls_files.key) if self.tls_files is not None else ()
            for path in (self.run_dir, pw, acl, self.conf_path, *tls_paths):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        if not self.conf_path.exists():
            self.write_files()
        for attempt in range(3):
            try:
                self._spawn(timeout)
                return
            except BrokerError:
                if self._fixed_port or attempt == 2 or "in use" not in self.log_tail(5):
                    raise
                self.port = free_port(self.host)  # lost a race for the port: pick another one
                self.write_files()

    def _spawn(self, timeout: float) -> None:
        assert self.binary is not None
        # It dies with us even by SIGKILL (broker/lifetime.py). As root, it starts as its own user: the
        # kernel forgets the parent-death signal when a process drops privileges by itself.
        user = pwd.getpwnam(_drop_user()) if os.geteuid() == 0 else None
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                extra_groups=[] if user else None, preexec_fn=dying_with(os.getpid()),
            )  # fmt: skip
        self._proc = proc
        self._proc_finalizer = weakref.finalize(self, _terminate, proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with status {proc.returncode} at start; its log:\n{self.log_tail()}"
                )
            if port_open(self.host, self.port):
                log.info("mosquitto (pid %d) listening on %s:%d", proc.pid, self.host, self.port)
                return
            time.sleep(0.02)
        _terminate(proc)
        raise BrokerError(
            f"mosquitto did not accept connections within {timeout:.0f}s; its log:\n{self.log_tail()}"
        )

    def died(self) -> int | None:
        """The exit status of our mosquitto if it ended without stop() (a crash, a kill), else None."""
        if self._proc is None:
            return None
        return self._proc.poll()

    def restart(self, timeout: float = 10.0) -> None:
        """Start it again on the same port with the same files (accounts, ACL, CA, its database)."""
        self.stop()
        self._fixed_port = True  # agents know this port: a new one would strand them
        self.start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop our mosquitto by its own PID (the run directory stays until close())."""
        if self._proc is not None:
            _terminate(self._proc, timeout)
            log.info("mosquitto (pid %d) stopped", self._proc.pid)
        if self._proc_finalizer is not None:
            self._proc_finalizer.detach()
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._finalizer()

    def __enter__(self) -> MosquittoBroker:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ca_file(self) -> str | None:
        return str(self.tls_files.ca) if self.tls_files is not None else None

    def address_for(self, username: str) -> BrokerAddress:
        address = BrokerAddress(self.host, self.port, tls=self.tls, ca_file=self.ca_file)
        return address.with_account(find_account(self.accounts, username))


@dataclass(frozen=True)
class RunningBroker:
    """A broker the run can use; ``address_for(agent_id)`` gives that agent's credentials."""

    kind: BrokerKind
    host: str
    port: int
    accounts: tuple[Account, ...] = field(repr=False)
    tls: bool = False
    pid: int | None = None  # mosquitto only
    ca_file: str | None = None  # the CA a TLS broker is verified with (None: the system's)

    def address_for(self, username: str) -> BrokerAddress:
        address = BrokerAddress(self.host, self.port, tls=self.tls, ca_file=self.ca_file)
        return address.with_account(find_account(self.accounts, username))


async def keep_running(mosq: MosquittoBroker, poll_s: float = 0.2, attempts: int = 5) -> None:
    """Restart the run's mosquitto on its port whenever it dies, until cancelled.

    It runs on the event loop's thread on purpose: mosquitto dies with the thread that started it
    (PR_SET_PDEATHSIG), and a worker thread ends long before the run does.
    """
    while True:
        await asyncio.sleep(poll_s)
        status = mosq.died()
        if status is None:
            continue
        log.warning("mosquitto exited (status %s) during the run; restarting it on port %d", status, mosq.port)
        for attempt in range(1, attempts + 1):
            try:
                mosq.restart()
                log.warning("mosquitto restarted (pid %s) on port %d", mosq.pid, mosq.port)
                break
            except BrokerError as err:
                log.error("restarting mosquitto failed (attempt %d of %d): %s", attempt, attempts, err)
                await asyncio.sleep(1.0)
        else:
            raise BrokerError(f"mosquitto died and could not be restarted on port {mosq.port}; its log:\n"
                              f"{mosq.log_tail()}")


@contextlib.asynccontextmanager
async def launch_broker(
    run_id: str,
    accounts: Sequence[Account],
    *,
    channel_mode: ChannelMode = "direct",
    prefer: Prefer = "auto",
    external: BrokerAddress | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    tls: bool = False,
) -> AsyncIterator[RunningBroker]:
    """Start (or adopt) the run's broker and stop it on exit, whatever happens inside.

    With ``external`` nothing is started: its host/port/TLS are used with the given accounts, which
    that broker must already know (its operator configures them). ``host`` is the interface mosquitto
    listens on: loopback by default, "0.0.0.0" for agents on other machines. ``tls`` gives mosquitto
    a TLS listener only, with a CA and certificate made for this run (broker/tls.py).
    """
    global _fallback_logged
    if external is not None:
        if tls and not external.tls:
            raise BrokerError(f"network.tls is on but --broker {external.redacted()} is not mqtts://")
        yield RunningBroker("external", external.host, external.port, tuple(accounts), external.tls,
                            ca_file=external.ca_file)  # fmt: skip
        return
    ensure_open_files(len(accounts) + 256, f"a broker for {len(accounts)} accounts")  # a connection each
    binary = find_mosquitto() if prefer != "amqtt" else None
    if (prefer == "mosquitto" or tls) and binary is None:
        need = "network.tls needs mosquitto (amqtt has no TLS here)" if tls else "mosquitto was asked for"
        raise BrokerError(f"{need} but it is not installed (apt-get install mosquitto)")
    if binary is not None:
        mosq = MosquittoBroker(run_id, accounts, channel_mode=channel_mode, host=host, port=port, binary=binary,
                               tls=tls, persistence=True)  # fmt: skip
        supervisor: asyncio.Task[None] | None = None
        try:
            mosq.start()
            supervisor = asyncio.create_task(keep_running(mosq), name="mosquitto-supervisor")
            yield RunningBroker(
                "mosquitto", mosq.host, mosq.port, mosq.accounts, tls=tls, pid=mosq.pid, ca_file=mosq.ca_file
            )
        finally:
            if supervisor is not None:
                supervisor.cancel()
                for outcome in await asyncio.gather(supervisor, return_exceptions=True):
                    if isinstance(outcome, BrokerError):
                        log.error("%s", outcome)
            mosq.close()
        return
    from broker.embedded import AmqttBroker  # imported only when needed

    if prefer == "auto" and not _fallback_logged:
        log.warning("no mosquitto binary found; using the embedded amqtt broker")
        _fallback_logged = True
    embedded = AmqttBroker(run_id, accounts, channel_mode=channel_mode, host=host, port=port)
    try:
        await embedded.start()
        yield RunningBroker("amqtt", embedded.host, embedded.port, embedded.accounts)
    finally:
        await embedded.stop()
