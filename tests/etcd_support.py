"""A real etcd on free loopback ports for tests, optionally with TLS client certificates.

The server is Debian's etcd-server (3.4); under CI=true a missing binary fails the test.
Certificates are made here with `cryptography`: a CA, a server certificate for
127.0.0.1 and a client certificate, so `--client-cert-auth` can be tested for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aetcd

from coordinator.registry.etcd import ETCD_ERRORS, EtcdClient, EtcdTls
from coordinator.registry.target import parse_etcd_target
from tests.conftest import require_service
from tests.support import free_port


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def client_tls(self) -> EtcdTls:
        return EtcdTls(str(self.ca), str(self.client_cert), str(self.client_key))


def make_certs(directory: Path) -> Certs:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[x509.Certificate,
                                                             ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert, key

    certs = Certs(*(directory / n for n in (
        "ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")))
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server, server_key = leaf("etcd", ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH)
    certs.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    certs.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, certs.server_key)
    write_key(client_key, certs.client_key)
    return certs


class EtcdServer:
    """`etcd` as a child process on free loopback ports; stop/start keep the ports."""

    def __init__(self, base: Path, certs: Certs | None = None) -> None:
        self.base = base
        self.certs = certs
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def target(self, key: str) -> str:
        return f"etcd://{self.endpoint}/{key}"

    def client(self, key: str = "x") -> EtcdClient:
        tls = self.certs.client_tls if self.certs else None
        return EtcdClient(parse_etcd_target(self.target(key)), tls)

    async def start(self, fresh: bool = False) -> EtcdServer:
        """Start etcd; `fresh` throws its data away first (a member that lost its disk)."""
        if fresh:
            self.generation += 1
        data = self.base / f"data{self.generation}"
        scheme = "https" if self.certs else "http"
        cmd = [
            "etcd", "--name", "test", "--data-dir", str(data),
            "--listen-client-urls", f"{scheme}://{self.endpoint}",
            "--advertise-client-urls", f"{scheme}://{self.endpoint}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
        ]
        if self.certs:
            cmd += ["--cert-file", str(self.certs.server_cert),
                    "--key-file", str(self.certs.server_key),
                    "--trusted-ca-file", str(self.certs.ca), "--client-cert-auth"]
        log = (self.base / "etcd.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = self.client()
        try:
            for _ in range(200):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"etcd exited: {self.log_tail()}")
                try:
                    await asyncio.wait_for(client.get(b"ping"), 2)
                    return self
                except (*ETCD_ERRORS, aetcd.ClientError):
                    await client.close_quietly()
                    await asyncio.sleep(0.05)
        finally:
            await client.close_quietly()
        raise RuntimeError(f"etcd did not answer: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        return "\n".join((self.base / "etcd.log").read_text(errors="replace").splitlines()[-20:])


def require_etcd() -> None:
    if shutil.which("etcd") is None:
        require_service("etcd", "no etcd binary on PATH (Debian package etcd-server)")


@contextlib.asynccontextmanager
async def etcd_server(tls: bool = False) -> AsyncIterator[EtcdServer]:
    require_etcd()
    with tempfile.TemporaryDirectory(prefix="etcd-test-") as tmp:
        base = Path(tmp)
        server = EtcdServer(base, make_certs(base) if tls else None)
        await server.start()
        try:
            yield server
        finally:
            server.stop()
