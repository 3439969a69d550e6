"""What the service refuses, as domain errors; `http_errors.py` alone knows which HTTP status and OpenAI error type each
is.

The store's `PromptNotFoundError` and `DamagedPromptError` and the library's `ContextTooLongError` are domain errors
too, raised where they happen.
"""

from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
    """A request the service will not carry out; `param` names the request field at fault, if one is."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequestError(ServiceError):
    """A request that is well-formed but asks for something impossible or inconsistent."""


class RequestTooLargeError(ServiceError):
    """A request over one of the service's limits (tokens, shots, inputs)."""


class ModelNotFoundError(ServiceError):
    """A `model` that is neither the base model nor a stored prompt (`metal:<prompt_id>`)."""


class IncompatiblePromptError(ServiceError):
    """A stored prompt made for another base model: never served."""


class NoPGMError(ServiceError):
    """Prompt generation asked of a server that runs a plain LM."""


class TooManyStreamsError(ServiceError):
    """More streamed completions at once than the service allows."""


class TooManyJobsError(ServiceError):
    """More refinement jobs at once than the service runs; `retry_after` estimates the seconds until one ends."""

    def __init__(self, message: str, retry_after: int, param: Optional[str] = None) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class PromptNotReadyError(ServiceError):
    """A prompt that is being refined, or whose refinement failed or was cancelled: nothing to serve (yet)."""


class NotRefiningError(ServiceError):
    """A cancel of a prompt that is not being refined (ready, failed or cancelled already)."""
