"""API errors: one type rendered as google.rpc.Status over gRPC and as JSON over HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = ["ApiError", "bad_request"]

DOMAIN = "sluice.dev"

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class ApiError(Exception):
    """A request failed; `reason` is the UPPER_SNAKE ErrorInfo reason (AIP-193)."""

    code: grpc.StatusCode
    reason: str
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)
    # Set when HTTP needs a code the gRPC mapping does not give (413).
    http_override: int | None = None
    # Seconds after which a retry may succeed (Retry-After header, RetryInfo detail).
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    @property
    def http_status(self) -> int:
        return self.http_override or _HTTP.get(self.code, 500)

    def status(self) -> status_pb2.Status:
        """The google.rpc.Status with one ErrorInfo and, for bad input, a BadRequest."""
        details = []
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        details.append(info)
        if self.violations:
            br = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(br)
            details.append(packed)
        if self.retry_after is not None:
            retry = any_pb2.Any()
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after * 1000))
            retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(retry)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=details
        )


def bad_request(violations: list[tuple[str, str]]) -> ApiError:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        f"{first[0]}: {first[1]}{more}",
        violations,
    )
