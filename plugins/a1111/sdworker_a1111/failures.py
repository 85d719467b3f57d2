"""How the Web UI's error answers become sdworker errors.

- 422 (validation): `PermanentError` naming each offending field from `detail`;
- any other 4xx: `PermanentError` with the Web UI's message;
- 5xx whose text says "out of memory": `BackendUnavailable` (retryable, code `out_of_memory`);
- any other 5xx: `BackendUnavailable` with the Web UI's message.

The Web UI answers errors as `{"detail": [{"loc", "msg", "type"}]}` (validation) or
`{"error", "detail", "body", "errors"}` (everything else).
"""

from __future__ import annotations

from typing import Any

import httpx

from sdworker.errors import BackendUnavailable, JobError, PermanentError

REJECTED = "backend_rejected"
OUT_OF_MEMORY = "out_of_memory"
_LIMIT = 500


def error_for(response: httpx.Response, call: str) -> JobError:
    """The error for a 4xx/5xx `response` to `call` (such as `POST txt2img`)."""
    status = response.status_code
    payload = _payload(response)
    if status == 422:
        return PermanentError(
            f"the Web UI rejected {call} (422): {_fields(payload)}; fix those fields",
            code=REJECTED,
        )
    if status < 500:
        return PermanentError(
            f"the Web UI refused {call} ({status}): {message_of(payload)}", code=REJECTED
        )
    if "out of memory" in response.text.lower():
        return BackendUnavailable(
            f"the Web UI ran out of memory on {call} ({status}): {message_of(payload)}",
            code=OUT_OF_MEMORY,
        )
    return BackendUnavailable(f"the Web UI failed on {call} ({status}): {message_of(payload)}")


def message_of(payload: Any) -> str:
    """The most telling text of an error body: its `detail`, `errors` or `error`, shortened."""
    if isinstance(payload, dict):
        for key in ("detail", "errors", "error"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                return _short(value)
    return _short(str(payload)) if payload else "no error message"


def _fields(payload: Any) -> str:
    """`field: reason` for every entry of a validation error's `detail`."""
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if not isinstance(detail, list) or not detail:
        return message_of(payload)
    return _short("; ".join(_field(entry) for entry in detail))


def _field(entry: Any) -> str:
    """One validation error as `dotted.place: reason` (the leading `body` dropped)."""
    if not isinstance(entry, dict):
        return str(entry)
    place = [str(part) for part in entry.get("loc", []) if part != "body"]
    return f"{'.'.join(place) or 'body'}: {entry.get('msg', 'invalid')}"


def _payload(response: httpx.Response) -> Any:
    """The parsed JSON body, or its text when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return response.text


def _short(text: str) -> str:
    """`text` cut to a length fit for a notification."""
    return text if len(text) <= _LIMIT else text[: _LIMIT - 3] + "..."
