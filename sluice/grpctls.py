"""TLS for Sluice's internal gRPC (deliverers and `sluice sites` → scheduler): credentials
from PEM files named in the config (docs/security.md). No file configured: plaintext."""

from __future__ import annotations

from pathlib import Path

import grpc

from sluice.config import ConfigError

__all__ = ["add_port", "channel_credentials", "server_credentials"]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path!r}: {exc.strerror}") from exc


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = "", section: str = "[scheduler]"
) -> grpc.ServerCredentials | None:
    """TLS server credentials, requiring client certificates signed by client_ca_file when it
    is set (mutual TLS); None when no certificate is configured."""
    if not (cert_file or key_file or client_ca_file):
        return None
    if not (cert_file and key_file):
        raise ConfigError(f"{section}: TLS needs both tls_cert_file and tls_key_file")
    pair = (_read(key_file, section), _read(cert_file, section))
    if client_ca_file:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(client_ca_file, section), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


def channel_credentials(
    ca_file: str, cert_file: str = "", key_file: str = "", section: str = "[deliverer]"
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials that trust ca_file (empty: the system's CAs) and present
    cert_file when set (mutual TLS); None when neither a CA nor a certificate is configured."""
    if not (ca_file or cert_file or key_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise ConfigError(f"{section}: a client certificate needs its key file, and a key its cert")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, section) if ca_file else None,
        private_key=_read(key_file, section) if key_file else None,
        certificate_chain=_read(cert_file, section) if cert_file else None,
    )


def add_port(server: grpc.aio.Server, listen: str, creds: grpc.ServerCredentials | None) -> int:
    """Listen on `listen`, over TLS when creds are given."""
    if creds is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, creds)
