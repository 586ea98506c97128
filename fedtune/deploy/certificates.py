"""TLS certificates for the SuperLink and SuperNode authentication keys (private keys mode 0600)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import ipaddress
import os
import secrets
from pathlib import Path

__all__ = ["generate_certificates", "generate_node_keys", "write_secret"]


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key so that no other user can ever read it, and never through a symlink.

    The key goes to a fresh temporary name beside ``path``, created with ``O_EXCL | O_NOFOLLOW``
    and mode 0600 (``fchmod`` on the open descriptor too, whatever the umask), is flushed to disk,
    then renamed over ``path`` (``os.replace``: atomic, and it replaces a file, never writes
    through one). A symlink at ``path`` is refused rather than silently replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise OSError(errno.ELOOP, "refusing to write a private key over a symlink", str(path))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def generate_certificates(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "superlink"),
                          days: int = 365, keep_ca_key: bool = True) -> dict[str, Path]:
    """A CA and a SuperLink server certificate signed by it (``ca.crt``, ``server.pem``, ``server.key``).

    ``ca.key`` (to sign more certificates later) is written only with ``keep_ca_key``; a
    throw-away deployment passes False, so the CA's key never outlives the signing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    nopass = serialization.NoEncryption()
    write_secret(paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    if keep_ca_key:
        paths["ca_key"] = out / "ca.key"
        write_secret(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    return paths


def generate_node_keys(out: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """One SuperNode authentication key pair per name: OpenSSH P-384 (``NAME``, ``NAME.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / name, out / f"{name}.pub"
        write_secret(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
        keys[name] = (private, public)
    return keys
