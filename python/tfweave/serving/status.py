"""Errors as TF Serving reports them: a canonical gRPC code plus a message.

The REST layer turns the code into the HTTP status TF Serving's own ``http_server.cc`` uses
(``ToHTTPStatusCode``) and the message into ``{"error": "..."}``; the gRPC layer aborts the call
with the same code and message, so a client sees the same failure on either protocol.
"""

from __future__ import annotations

# TF Serving's mapping from canonical code to HTTP status (model_servers/http_server.cc).
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request failed with a canonical status ``code`` (e.g. ``"INVALID_ARGUMENT"``).

    ``http_status`` overrides the code's usual HTTP status where the issue asks for a different
    one (a full batching queue answers 503 on REST while its gRPC code is RESOURCE_EXHAUSTED).
    """

    def __init__(self, code: str, message: str, *, http_status: int | None = None):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown status code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status if http_status is not None else HTTP_STATUS[code]

    def __repr__(self) -> str:
        return f"ServingError({self.code}, {self.message!r})"


def invalid_argument(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    return ServingError("NOT_FOUND", message)


def unimplemented(message: str) -> ServingError:
    return ServingError("UNIMPLEMENTED", message)


def internal(message: str) -> ServingError:
    return ServingError("INTERNAL", message)


def unavailable(message: str) -> ServingError:
    return ServingError("UNAVAILABLE", message)


def queue_full(model: str) -> ServingError:
    # TF Serving's batch scheduler words; code and HTTP status as issue #6 asks.
    return ServingError(
        "RESOURCE_EXHAUSTED",
        f"The batch scheduling queue to which this task was submitted is full (model {model}); "
        "retry later or raise max_enqueued_batches in the batching parameters",
        http_status=503)
