"""Reply classification: SMTP replies and connection failures into typed outcomes.

RFC 5321 basic codes decide the class (2xx delivered, 4xx deferred, 5xx bounced); RFC 3463
enhanced codes and known texts refine it (bounce category, throttling). One table, here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from sluice.v1 import messages_pb2

__all__ = ["Bounced", "Deferred", "Delivered", "Outcome", "Reply", "classify", "parse_reply"]


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    enhanced: str = ""

    def proto(self) -> messages_pb2.SmtpReply:
        """The reply as a message (made once: the event and the outcome report of each
        recipient of a transaction copy it; do not change it)."""
        return self._proto

    @cached_property
    def _proto(self) -> messages_pb2.SmtpReply:
        return messages_pb2.SmtpReply(code=self.code, enhanced_code=self.enhanced, text=self.text)


@dataclass(frozen=True)
class Delivered:
    reply: Reply


@dataclass(frozen=True)
class Deferred:
    reply: Reply | None
    reason: str
    # The site asked us to slow down (feeds the scheduler's adaptive limits).
    throttled: bool = False


@dataclass(frozen=True)
class Bounced:
    reply: Reply | None
    category: str


Outcome = Delivered | Deferred | Bounced

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")

# (enhanced-code prefix, category) for permanent failures, most specific first.
_BOUNCE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("5.1.1", "bad_mailbox"),
    ("5.1.2", "bad_domain"),
    ("5.1.10", "bad_mailbox"),
    ("5.1.", "bad_mailbox"),
    ("5.2.2", "mailbox_full"),
    ("5.2.3", "message_too_big"),
    ("5.3.4", "message_too_big"),
    ("5.2.", "mailbox_unavailable"),
    ("5.4.", "routing"),
    ("5.7.", "policy"),
    ("5.6.", "content"),
)

# Replies that mean "slow down" rather than "try later".
_THROTTLE_TEXT = re.compile(r"TSS04|4\.7\.28|rate.?limit|too many|throttl", re.IGNORECASE)


def parse_reply(code: int, message: str) -> Reply:
    text = message.strip()
    m = _ENHANCED.match(text)
    return Reply(code, text, m.group(0) if m else "")


def classify(reply: Reply, throttle: re.Pattern[str] | None = None) -> Outcome:
    """The outcome of a reply; `throttle` adds configured throttling patterns."""
    if 200 <= reply.code < 300:
        return Delivered(reply)
    if 400 <= reply.code < 500:
        throttled = (
            reply.code == 421
            or reply.enhanced.startswith("4.7.")
            or bool(_THROTTLE_TEXT.search(reply.text))
            or bool(throttle is not None and throttle.search(reply.text))
        )
        return Deferred(reply, "temporary failure", throttled)
    if 500 <= reply.code < 600:
        category = "other"
        for prefix, cat in _BOUNCE_CATEGORIES:
            if reply.enhanced.startswith(prefix):
                category = cat
                break
        else:
            if reply.code == 550 and re.search(
                r"user unknown|no such user|does not exist", reply.text, re.IGNORECASE
            ):
                category = "bad_mailbox"
        return Bounced(reply, category)
    return Deferred(reply, f"unexpected reply code {reply.code}")
