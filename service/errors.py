"""One error model: every refusal is a ServiceError rendered as {"error": {...}}."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a client may see; carries its HTTP status and a stable code."""

    status = 400
    code = "bad_request"
    # Extra response headers (Retry-After, say).
    headers: dict[str, str] = {}

    def __init__(self, message: str, details: Any = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details if details is not None else {}
        if code:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class NotFoundError(ServiceError):
    status = 404
    code = "not_found"


class ConflictError(ServiceError):
    status = 409
    code = "conflict"


class InvalidError(ServiceError):
    status = 422
    code = "invalid"


class MultipleHeadsError(InvalidError):
    code = "multiple_heads"


class NotAnApproverError(ServiceError):
    """A token that may not approve (or allow) a project's blocking lint findings."""

    status = 403
    code = "not_an_approver"


class UnauthorizedError(ServiceError):
    status = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    status = 403
    code = "forbidden"


class PayloadTooLargeError(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServiceError):
    status = 415
    code = "unsupported_media_type"


class BundleError(InvalidError):
    code = "invalid_bundle"


class JsonTooDeepError(InvalidError):
    code = "json_too_deep"


class BodyTimeoutError(ServiceError):
    """The client did not send its whole body within RETORT_BODY_TIMEOUT_S."""

    status = 408
    code = "body_timeout"


class TooManyRequestsError(ServiceError):
    """This token (or source address) holds as many requests of this API process as it may."""

    status = 429
    code = "too_many_requests"
    headers = {"Retry-After": "1"}


class TooManyStreamsError(TooManyRequestsError):
    """This token holds as many long polls and event streams of this API process as it may."""

    code = "too_many_streams"
    headers = {"Retry-After": "2"}


def invalid_from(exc: Any, prefix: tuple[str, ...] = ()) -> InvalidError:
    """A 422 from a pydantic ValidationError: each error's field (under `prefix`) and message;
    the first one in the message."""
    errors = [
        {
            "field": ".".join([*prefix, *(str(p) for p in err["loc"])]) or "(body)",
            "message": err["msg"],
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0]
    return InvalidError(
        f"{first['field']}: {first['message']}", {"errors": errors, "field": first["field"]}
    )
