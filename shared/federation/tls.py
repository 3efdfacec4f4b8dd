"""TLS certificates and SuperNode keys for the federated service, made offline with `cryptography`.

A `--tls-dir` holds `ca.pem` (the root every party trusts), and on the server also `ca.key`, `server.pem`,
`server.key`. The server makes what is missing; a client needs only `ca.pem` (copied from the server).
Node authentication uses ECDSA P-384 keys in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes and
Flower reads): the server registers every `*.pub` in its `--auth-keys` folder, a client signs with its private key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mos.shared.files import write_bytes

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
VALID_DAYS = 825


@dataclass(frozen=True)
class ServerTls:
    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Private keys are readable by their owner only, from the first byte on."""
    write_bytes(path, data, mode=None)  # atomic_path creates files 0600


def _write_public(path: Path, data: bytes) -> None:
    write_bytes(path, data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _make_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mos federated CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private(folder / "ca.key", _pem_key(key))
    _write_public(folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    return cert, key  # type: ignore[return-value]


def _make_server_cert(folder: Path, hosts: list[str]) -> None:
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(folder / "server.key", _pem_key(key))
    _write_public(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def cert_hosts(cert_file: Path) -> list[str]:
    """The names and addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def ensure_server_tls(folder: str | Path, hosts: list[str] | None = None) -> ServerTls:
    """Use the CA and server certificate in `folder`, making whatever is missing.

    A certificate that exists but does not name every host asked for is reissued from the same CA,
    so clients that already trust `ca.pem` keep working.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    want = list(dict.fromkeys([*DEFAULT_HOSTS, *(hosts or [])]))
    want = [h for h in want if h and h not in ("0.0.0.0", "::")]  # wildcard binds are no certificate name
    if not (folder / "ca.pem").is_file():
        if (folder / "server.pem").is_file():
            raise ValueError(f"{folder} has server.pem but no ca.pem: add the CA that signed it, or empty the folder")
        _make_ca(folder)
    have_cert = (folder / "server.pem").is_file() and (folder / "server.key").is_file()
    if not have_cert or not set(want) <= set(cert_hosts(folder / "server.pem")):
        if not (folder / "ca.key").is_file():
            raise ValueError(f"{folder}: server.pem/server.key are missing or do not name {want}, and there is no "
                             "ca.key to issue a new one")
        _make_server_cert(folder, want)
    return ServerTls(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def client_root_cert(folder: str | Path) -> Path:
    ca = Path(folder) / "ca.pem"
    if not ca.is_file():
        raise FileNotFoundError(f"no ca.pem in --tls-dir {folder}: copy the server's ca.pem there")
    return ca


def make_node_key(private_path: str | Path) -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format: PRIVATE (0600) and PRIVATE.pub."""
    private_path = Path(private_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    pub = private_path.with_name(private_path.name + ".pub")
    _write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, pub


def check_node_key(private_path: str | Path) -> Path:
    """Fail early, with a clear message, on a key Flower would refuse."""
    path = Path(private_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--auth-key {path}: no such file")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--auth-key {path}: not an unencrypted OpenSSH private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"--auth-key {path}: Flower needs an ECDSA key (ssh-keygen -t ecdsa -b 384)")
    return path.resolve()
