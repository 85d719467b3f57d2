"""HTTP to the Web UI: JSON calls whose failures are sdworker errors, and its readiness.

Refused connections, dropped connections and timeouts raise `BackendUnavailable`; error answers
are mapped by `sdworker_a1111.failures`. A lost connection marks the client not `ready` and
starts probing `GET /sdapi/v1/sd-models` with backoff until the Web UI answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

from sdworker._structlog import structlog
from sdworker.errors import BackendUnavailable, ConfigError
from sdworker.tls import verify_for
from sdworker_a1111.failures import error_for
from sdworker_a1111.settings import A1111Settings

log = structlog.get_logger("sdworker.a1111")

PROBE = "sd-models"


class WebUIClient:
    """The Web UI's API below `root` (which ends in `/sdapi/v1/`)."""

    def __init__(self, root: str, settings: A1111Settings) -> None:
        self.where = str(httpx.URL(root).copy_with(username=None, password=None))
        self.settings = settings
        self.ready = False
        self._http = httpx.AsyncClient(base_url=root, trust_env=False, verify=verify_for(root))
        self._recovery: asyncio.Task[list[Any]] | None = None

    async def get(self, path: str) -> Any:
        """`GET path` within the read timeout; the parsed JSON answer."""
        return await self._send("GET", path, None, self.settings.read_timeout)

    async def post(self, path: str, body: Any, *, read_timeout: float | None) -> Any:
        """`POST path` with a JSON body; `read_timeout` None waits as long as it takes."""
        return await self._send("POST", path, body, read_timeout)

    async def wait_ready(self, timeout_s: float = 0.0) -> list[Any]:
        """Probe until the Web UI answers (forever when `timeout_s` is 0); its checkpoint list."""
        started, delay, attempt = time.monotonic(), self.settings.probe_interval, 0
        while True:
            models, reason = await self._probe()
            if models is not None:
                self.ready = True
                return models
            attempt += 1
            if timeout_s and time.monotonic() - started + delay > timeout_s:
                raise self._never_answered(timeout_s, reason)
            log.info(
                "waiting for the Web UI",
                url=self.where,
                probe=f"GET {PROBE}",
                answer=reason,
                attempt=attempt,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.probe_max_interval)

    async def aclose(self) -> None:
        """Stop probing and close the connections; safe to call twice."""
        self.ready = False
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: Any, read_timeout: float | None) -> Any:
        """One call; failures raised as sdworker errors, readiness updated."""
        call = f"{method} {path}"
        timeout = httpx.Timeout(read_timeout, connect=self.settings.connect_timeout)
        try:
            response = await self._http.request(method, path, json=body, timeout=timeout)
        except httpx.TimeoutException as error:
            if isinstance(error, httpx.ConnectTimeout):
                self._lost()
            raise BackendUnavailable(
                f"the Web UI at {self.where} did not answer {call} in time ({error!r})"
            ) from None
        except httpx.TransportError as error:
            self._lost()
            raise BackendUnavailable(
                f"cannot reach the Web UI at {self.where} for {call} ({error!r}); "
                "is it running with --api?"
            ) from None
        self.ready = True
        if response.is_error:
            raise error_for(response, call)
        return _json(response, call)

    async def _probe(self) -> tuple[list[Any] | None, str]:
        """The checkpoint list when the Web UI answers the probe, else None and what happened."""
        timeout = httpx.Timeout(self.settings.read_timeout, connect=self.settings.connect_timeout)
        try:
            response = await self._http.get(PROBE, timeout=timeout)
        except httpx.TransportError as error:
            return None, repr(error)
        if response.status_code != 200:
            return None, f"HTTP {response.status_code} (is it started with --api?)"
        try:
            models = response.json()
        except ValueError:
            return None, "an answer that is not JSON"
        return (models, "ok") if isinstance(models, list) else (None, "not a checkpoint list")

    def _lost(self) -> None:
        """Mark the Web UI as gone and probe in the background until it is back."""
        self.ready = False
        if self._recovery is None or self._recovery.done():
            log.warning("the Web UI stopped answering", url=self.where)
            self._recovery = asyncio.create_task(self.wait_ready(), name="a1111-recovery")

    def _never_answered(self, timeout_s: float, reason: str) -> ConfigError:
        """The start-up error when the Web UI did not answer within `timeout_s`."""
        return ConfigError(
            f"SDWORKER_BACKEND_URL: no Web UI answered GET {self.where}{PROBE} within "
            f"{timeout_s:g} s (SDWORKER_A1111_START_TIMEOUT; last answer: {reason}); start it "
            "with --api, or fix the URL"
        )


def _json(response: httpx.Response, call: str) -> Any:
    """The JSON answer, or `BackendUnavailable` when the Web UI sent something else."""
    try:
        return response.json()
    except ValueError:
        raise BackendUnavailable(
            f"the Web UI answered {call} with something that is not JSON: {response.text[:200]!r}"
        ) from None
