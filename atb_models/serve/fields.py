"""The checks every API body of the server shares: the error shape (OpenAI's), a body's fields, and the plain values
(a flag, an integer in range, a token id, the model's name). No I/O here and nothing of the engine."""

from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def is_token_id(value) -> bool:
    """An integer in JSON (true and false are not ids); its range is checked where the vocabulary is known."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(body, read: set, unsupported: dict) -> None:
    """A JSON object of only the fields `read`, or those `unsupported` at the value that asks for nothing."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, neutral in unsupported.items():
        if body.get(name) not in (None, neutral):
            raise bad_request(f"{name} is not supported by this server (got {body[name]!r})")
    unknown = sorted(set(body) - read - set(unsupported))
    if unknown:
        raise bad_request(f"{', '.join(map(repr, unknown))}: not a field this server knows; it reads "
                          f"{', '.join(sorted(read))}")


def model_field(body: dict) -> Optional[str]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string")
    return model


def integer_in(body: dict, name: str, low: int, high: int) -> Optional[int]:
    """An integer field within low..high, or None where it is absent or null."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise bad_request(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def flag(body: dict, name: str) -> bool:
    """A true-or-false field; null is its default, false (OpenAI's "boolean or null", as for the other fields)."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}")
    return value
