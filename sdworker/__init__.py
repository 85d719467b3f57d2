"""sdworker: an asyncio worker for asynchronous image generation on AWS."""

from sdworker.backend import (
    Backend,
    BackendResult,
    BackendSpec,
    InputFile,
    JobRequest,
    Output,
    Progress,
    ProgressCallback,
)
from sdworker.errors import (
    BackendUnavailable,
    ConfigError,
    InputRefused,
    InvalidJob,
    JobError,
    JobInterrupted,
    PermanentError,
    RetryableError,
    SdworkerError,
    UnsupportedJob,
)
from sdworker.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendResult",
    "BackendSpec",
    "BackendUnavailable",
    "ConfigError",
    "InputFile",
    "InputRefused",
    "InvalidJob",
    "JobError",
    "JobInterrupted",
    "JobRequest",
    "Output",
    "PermanentError",
    "Progress",
    "ProgressCallback",
    "RetryableError",
    "SdworkerError",
    "UnsupportedJob",
    "__version__",
    "hookimpl",
    "hookspec",
]
