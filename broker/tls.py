"""TLS for a run's own broker: a throwaway certificate authority and a server certificate.

With ``network.tls: true`` the run generates, per run and in the broker's private run directory,
a CA (never used for anything else, its key discarded once the server certificate is signed) and
a server certificate for the names the agents dial (localhost, 127.0.0.1, the listen address and
this machine's name). mosquitto then has only a TLS listener, so a plaintext client cannot connect
at all, and every agent verifies the server against exactly this CA (``ca.crt``, which is public:
external agents are given a copy), never the system's trust store.

Keys are ECDSA P-256 (fast to generate and to handshake on a Raspberry Pi); certificates are valid
from an hour ago (clock skew between boards) for 30 days, far longer than a run.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nmoe.errors import BrokerError

log = logging.getLogger(__name__)

VALIDITY = dt.timedelta(days=30)
SKEW = dt.timedelta(hours=1)


@dataclass(frozen=True)
class TlsFiles:
    """Where a run's TLS material lies: the CA certificate (for clients) and the server's pair."""

    ca: Path
    cert: Path
    key: Path


def server_names(host: str) -> list[str]:
    """The names a server certificate for a broker listening on ``host`` should carry."""
    names = ["localhost", "127.0.0.1", "::1"]
    if host in ("0.0.0.0", "::", ""):  # every interface: the machine's names and the addresses they resolve to
        hostname = socket.gethostname()
        names += [hostname, socket.getfqdn()]
        try:
            names += socket.gethostbyname_ex(hostname)[2]
        except OSError as err:  # no resolver entry for our own name: boards must dial the name
            log.warning("cannot resolve %s for the broker certificate (%s); agents must dial a name", hostname, err)
    else:
        names.append(host)
    return list(dict.fromkeys(n for n in names if n))


def make_tls_files(folder: Path, names: Iterable[str], run_id: str) -> TlsFiles:
    """Write ``ca.crt``, ``server.crt`` and ``server.key`` (0600) into ``folder``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as err:
        raise BrokerError("network.tls needs the cryptography package (pip install cryptography)") from err

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nmoe run {run_id} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nmoe run {run_id} broker")]))
        .issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.touch(mode=0o600)
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for path in (files.ca, files.cert):
        path.chmod(0o644)
    return files


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """What a client verifies the broker with: this CA only when given, else the system's CAs."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as err:
        raise BrokerError(f"cannot load the broker's CA certificate {ca_file}: {err}") from err
