"""Every error sdworker raises on purpose, in one tree.

SdworkerError
├── ConfigError            a setting is missing or wrong; start-up stops
└── JobError               one job failed; the worker lives on
    ├── PermanentError     retrying cannot help: failed at once, message kept in the DLQ
    │   ├── InvalidJob         the message is not a valid job (names the field)
    │   ├── UnsupportedJob     no such backend here, or the backend lacks the task
    │   └── InputRefused       an input URI was refused or could not be read
    ├── RetryableError     may succeed later: released with backoff until max attempts
    │   └── BackendUnavailable the backend is down, busy or timed out
    └── JobInterrupted     stopped on purpose (shutdown, deadline): handed back
"""

from __future__ import annotations


class SdworkerError(Exception):
    """Base class of every error sdworker raises on purpose."""


class ConfigError(SdworkerError):
    """A setting is missing or wrong; the message names the setting and the fix."""


class JobError(SdworkerError):
    """One job failed; `code` is the machine-readable reason put in the notification."""

    code = "job_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable reason."""
        return str(self)


class PermanentError(JobError):
    """Retrying cannot help: bad input, unsupported task, request rejected by the backend."""

    code = "permanent"


class InvalidJob(PermanentError):
    """The message is not a valid job; the message names the field and the reason."""

    code = "invalid_job"

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class UnsupportedJob(PermanentError):
    """This worker has no such backend, or its backend does not run the task."""

    code = "unsupported"


class InputRefused(PermanentError):
    """An input URI was refused by the fetch guard or could not be read."""

    code = "input_refused"


class RetryableError(JobError):
    """May succeed on a later attempt: backend down, timeout, 5xx, throttling."""

    code = "retryable"
    retryable = True


class BackendUnavailable(RetryableError):
    """The backend did not answer, answered 5xx, or ran out of memory."""

    code = "backend_unavailable"


class JobInterrupted(JobError):
    """The job was stopped on purpose (shutdown, deadline) and is handed back to the queue."""

    code = "interrupted"
    retryable = True
