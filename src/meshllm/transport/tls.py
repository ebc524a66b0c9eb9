"""Mutual TLS for every gRPC link: the one place that makes server and channel credentials.

A `TlsFiles` holds one device's PEM material: the cluster CA, the device's certificate (signed by that
CA, naming the device's host) and its private key. The same certificate serves both sides: a worker
presents it to whoever dials it and to the next stage it dials; a server asks every caller for a
certificate signed by the cluster CA, so a peer without one is refused at the handshake, before any
call (the cluster token is still checked on every call on top). A client checks that the server's
certificate names the host it dialled (its SAN: IP address or DNS name).

`None` in place of a `TlsFiles` means plaintext: only for links on loopback, or where the user asked for
it (`insecure = true`, `--insecure`).
"""

from __future__ import annotations

import functools
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from meshllm.errors import ConfigError

FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


@dataclass(frozen=True)
class TlsFiles:
    """One device's PEM bytes: the cluster CA certificate, its own certificate and private key."""

    ca: bytes
    cert: bytes
    key: bytes
    source: str = ""  # where they were read from, for messages

    @classmethod
    def read(
        cls, ca: str | Path, cert: str | Path, key: str | Path, labels: tuple[str, str, str] = FLAGS
    ) -> TlsFiles:
        """Read the three PEM files; a ConfigError names the file and its label (its flag or key)."""
        contents = []
        for label, given in zip(labels, (ca, cert, key), strict=True):
            path = Path(os.path.expanduser(str(given)))
            try:
                data = path.read_bytes()
            except OSError as error:
                raise ConfigError(f"{label} {str(path)!r}: {error.strerror}") from None
            if b"-----BEGIN " not in data:
                raise ConfigError(f"{label} {str(path)!r}: not a PEM file (no '-----BEGIN' line)")
            contents.append(data)
        return cls(contents[0], contents[1], contents[2], source=str(Path(os.path.expanduser(str(cert)))))

    @classmethod
    def from_options(cls, ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
        """The files named by the three flags (--tls-ca, --tls-cert, --tls-key): all three, or none."""
        values = (ca, cert, key)
        given = [flag for flag, value in zip(FLAGS, values, strict=True) if value]
        if not given:
            return None
        missing = [flag for flag, value in zip(FLAGS, values, strict=True) if not value]
        if missing:
            raise ConfigError(
                f"{', '.join(given)} given without {', '.join(missing)}: mutual TLS needs the cluster CA, "
                "this device's certificate and its key"
            )
        assert ca and cert and key
        return cls.read(ca, cert, key)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Present this device's certificate; accept only callers with a certificate the cluster CA signed."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Trust only the cluster CA, and present this device's certificate to the server."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )


@functools.cache
def ssl_context(tls: TlsFiles, server_side: bool) -> ssl.SSLContext:
    """The same mutual TLS for a plain socket (the step links): a server asks every caller for a
    certificate the cluster CA signed; a client trusts only that CA, checks that the server's certificate
    names the host it dialled, and presents this device's certificate."""
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose, cadata=tls.ca.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if server_side:
        context.verify_mode = ssl.CERT_REQUIRED
    # ssl reads a certificate chain from files only: a private folder, gone once they are read.
    with tempfile.TemporaryDirectory(prefix="meshllm-tls-") as folder:
        chain = Path(folder) / "device.pem"
        chain.touch(mode=0o600)
        chain.write_bytes(tls.cert + b"\n" + tls.key)
        context.load_cert_chain(chain)
    return context


def aio_channel(address: str, tls: TlsFiles | None, options: list[tuple[str, int]]) -> grpc.aio.Channel:
    """An asyncio channel to `address`: mutual TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)


def blocking_channel(address: str, tls: TlsFiles | None, options: list[tuple[str, int]]) -> grpc.Channel:
    """A blocking (thread-based) channel to `address`: mutual TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    """Listen on `address` (TLS with `tls`); the port bound. OSError saying why when it cannot be bound
    (gRPC says so by raising or by answering 0, depending on the case)."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as error:
        raise OSError(str(error)) from None
    if port == 0:
        raise OSError("bind failed")
    return port
