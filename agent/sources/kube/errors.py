"""The Kubernetes source's errors: each names where it came from (the server, the credentials)."""
from __future__ import annotations


class KubeError(Exception):
    """A configuration or API error, with a message that names its source."""


class Gone(KubeError):
    """410: the resourceVersion (or continue token) is older than the server's history: re-list."""


class ContinueExpired(Gone):
    """410 on a list's continue token: the snapshot the pages were read from is gone."""


class RetryAfter(KubeError):
    """429 (API Priority and Fairness) or a 5xx with Retry-After: wait at least `seconds` before retrying."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


class AuthError(KubeError):
    """401/403: the credentials were refused; the message names where they came from."""
