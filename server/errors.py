"""The one exception a request's path raises to answer with a status other than 200."""
from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be answered normally: its HTTP status, a message, and headers (Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers
