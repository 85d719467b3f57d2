"""sdworker: an asyncio worker for asynchronous image generation on AWS."""

import sys as _sys

# structlog imports rich, and rich pygments, for pretty tracebacks: 3 MB in every worker process
# (docs/performance.md). sdworker's log chain formats exceptions itself (format_exc_info), so
# structlog never renders one and is imported with rich hidden; rich stays importable for the
# commands that print tables and progress bars.
if "structlog" not in _sys.modules and "rich" not in _sys.modules:
    _sys.modules["rich"] = None  # type: ignore[assignment]  # import rich -> ImportError
    try:
        import structlog  # noqa: F401
    except ImportError:  # the job API's Lambda zip packs sdworker.jobs without it
        pass
    finally:
        del _sys.modules["rich"]

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
