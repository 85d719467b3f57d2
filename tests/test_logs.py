"""Logging: JSON lines on stderr, bound job context, and secrets kept out of every line."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from sdworker.logs import configure_logging

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/results/j-1/0.png"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
    "&X-Amz-Expires=3600&X-Amz-Signature=deadbeef"
)


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    """Leave structlog and its context as they were for the next test."""
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Every line written to stderr so far, each parsed as one JSON object."""
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_json_format_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Each event is one JSON line on stderr with its level, timestamp and event."""
    configure_logging("json")
    log = structlog.get_logger("test")
    log.info("job started", job_id="j-1")
    log.warning("job slow")
    first, second = json_lines(capsys)
    assert first["event"] == "job started"
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert second["level"] == "warning"


class _Writes(io.StringIO):
    """A stream that keeps each `write()` apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_line_is_written_whole_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line and its newline go out in one write: the worker and a backend's child process
    share stderr, and a pipe keeps one write (up to 4 KB) from being split by another's."""
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json")
    log = structlog.get_logger("test")
    log.info("job started", job_id="j-1")
    log.info("job finished", job_id="j-1")
    assert [json.loads(call)["event"] for call in stream.calls] == ["job started", "job finished"]
    assert all(call.endswith("}\n") for call in stream.calls)


def test_nothing_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """Log lines stay off stdout, which commands keep for their own output."""
    configure_logging("json")
    structlog.get_logger("test").info("hello")
    assert capsys.readouterr().out == ""


def test_bound_job_id_appears_on_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A job id bound to the context is added to every line logged while it is bound."""
    configure_logging("json")
    structlog.contextvars.bind_contextvars(job_id="fox-1")
    log = structlog.get_logger("test")
    log.info("fetching inputs")
    log.info("running")
    assert [line["job_id"] for line in json_lines(capsys)] == ["fox-1", "fox-1"]


def test_lines_below_the_level_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    """At level warning, info lines are not written."""
    configure_logging("json", level="warning")
    log = structlog.get_logger("test")
    log.info("quiet")
    log.warning("loud")
    assert [line["event"] for line in json_lines(capsys)] == ["loud"]


def test_receipt_handle_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A receipt handle, which lets anyone delete the message, never reaches the log."""
    configure_logging("json")
    structlog.get_logger("test").info("received", receipt_handle="AQEBsecret")
    [line] = json_lines(capsys)
    assert line["receipt_handle"] == "[redacted]"


def test_presigned_url_loses_its_query_string(capsys: pytest.CaptureFixture[str]) -> None:
    """A presigned URL is logged without the signature and credential in its query."""
    configure_logging("json")
    structlog.get_logger("test").info("input", uri=PRESIGNED)
    [line] = json_lines(capsys)
    assert line["uri"] == "https://bucket.s3.amazonaws.com/results/j-1/0.png?[redacted]"


def test_presigned_url_inside_the_event_text_is_cut(capsys: pytest.CaptureFixture[str]) -> None:
    """A presigned URL inside a message sentence is cut too."""
    configure_logging("json")
    structlog.get_logger("test").info(f"could not fetch {PRESIGNED}")
    [line] = json_lines(capsys)
    assert "deadbeef" not in line["event"]
    assert "X-Amz-Credential" not in line["event"]


def test_ordinary_url_keeps_its_query_string(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL without a signature is logged as it is."""
    configure_logging("json")
    structlog.get_logger("test").info("input", uri="https://cdn.example/a.png?size=512")
    [line] = json_lines(capsys)
    assert line["uri"] == "https://cdn.example/a.png?size=512"


def test_console_format_renders_readable_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The console format writes a human-readable line with the event and its fields."""
    configure_logging("console")
    structlog.get_logger("test").info("job done", job_id="fox-1", receipt_handle="AQEBsecret")
    err = capsys.readouterr().err
    assert "job done" in err
    assert "fox-1" in err
    assert "AQEBsecret" not in err
