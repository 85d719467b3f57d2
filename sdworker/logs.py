"""structlog set-up: JSON in production, console in dev; secrets never reach a log line; a
job's lines carry its trace_id and span_id."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

from opentelemetry import trace

from sdworker._structlog import structlog

_SECRET_KEYS = frozenset({"receipt_handle", "ReceiptHandle", "aws_secret_access_key", "token"})
_PRESIGNED = re.compile(
    r"(https?://[^\s?\"']+)\?[^\s\"']*(X-Amz-Signature|Signature=|X-Amz-Credential)[^\s\"']*"
)


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret fields and cut the query string off presigned URLs."""
    for key in list(event):
        if key in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(event[key], str):
            event[key] = _PRESIGNED.sub(r"\1?[redacted]", event[key])
    return event


def add_trace_ids(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add the current `trace_id` and `span_id` (hex, as in W3C and OTLP), so logs join traces."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


_CURRENT = {"format": "json", "level": "info"}


def current_logging() -> tuple[str, str]:
    """The format and level last given to `configure_logging`, for a child process to log alike."""
    return _CURRENT["format"], _CURRENT["level"]


def configure_logging(log_format: str = "json", level: str = "info") -> None:
    """Route structlog (and the standard library's warnings and errors) to stderr."""
    _CURRENT.update(format=log_format, level=level)
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # A line and its newline in one write(): lines of the worker and of a backend's child
        # process on the same stderr never split each other, and a line costs one system call.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
