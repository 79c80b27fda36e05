"""The local catch-all SMTP sink of `sluice dev`: accepts everything, stores .eml files."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["start_sink"]


class EmlSink:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
        content = envelope.original_content or b""
        header = (
            f"X-Sluice-Sink-Mail-From: {envelope.mail_from}\r\n"
            f"X-Sluice-Sink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        (self.directory / name).write_bytes(header + content)
        return "250 2.0.0 OK stored"


async def start_sink(directory: Path, host: str, port: int) -> asyncio.Server:
    handler = EmlSink(directory)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(handler, hostname="sink.sluice.test", data_size_limit=50 * 1024 * 1024)

    return await loop.create_server(factory, host, port)
