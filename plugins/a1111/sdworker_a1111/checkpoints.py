"""The Web UI's checkpoints: find one by any of its names, switch to it, check it was used.

A job names its model in `params.model` (the guidance's `sd_model_checkpoint` lands there too).
It is matched against every name the Web UI knows a checkpoint by — its title with or without the
hash, its file name with or without the extension, its model name, its short or full hash — in
`GET /sdapi/v1/sd-models`, refreshed once (`POST /sdapi/v1/refresh-checkpoints`) on a miss.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from sdworker._structlog import structlog
from sdworker.errors import BackendUnavailable, PermanentError

if TYPE_CHECKING:
    from sdworker.backend import JobRequest
    from sdworker_a1111.client import WebUIClient

log = structlog.get_logger("sdworker.a1111")

UNKNOWN_MODEL = "unknown_model"
MODEL_NOT_LOADED = "model_not_loaded"
_HASH_SUFFIX = re.compile(r"\s*\[[0-9A-Fa-f]+\]$")
_LISTED = 20


@dataclass(frozen=True)
class Checkpoint:
    """One entry of `GET /sdapi/v1/sd-models`."""

    title: str
    model_name: str = ""
    filename: str = ""
    hash: str | None = None
    sha256: str | None = None

    @classmethod
    def from_json(cls, entry: Any) -> Checkpoint | None:
        """The checkpoint an `sd-models` entry describes, or None when it has no title."""
        if not isinstance(entry, dict) or not isinstance(entry.get("title"), str):
            return None
        return cls(
            title=entry["title"],
            model_name=str(entry.get("model_name") or ""),
            filename=str(entry.get("filename") or ""),
            hash=entry.get("hash") if isinstance(entry.get("hash"), str) else None,
            sha256=entry.get("sha256") if isinstance(entry.get("sha256"), str) else None,
        )

    @property
    def names(self) -> frozenset[str]:
        """Every name a job may use for this checkpoint."""
        base = PurePosixPath(self.filename.replace("\\", "/")).name
        candidates = (
            self.title,
            _HASH_SUFFIX.sub("", self.title),
            base,
            PurePosixPath(base).stem,
            self.model_name,
            self.hash,
            self.sha256,
        )
        return frozenset(name for name in candidates if name)

    def made(self, info: Mapping[str, Any]) -> bool:
        """Whether a generation's `info` names this checkpoint (True when it names none)."""
        name, short_hash = info.get("sd_model_name"), info.get("sd_model_hash")
        if not name and not short_hash:
            return True
        return name in self.names or (bool(short_hash) and short_hash == self.hash)


class Checkpoints:
    """Finds, switches to and verifies the checkpoint a job asks for, on one Web UI."""

    def __init__(self, client: WebUIClient, *, dynamic: bool) -> None:
        self._client = client
        self._dynamic = dynamic
        self._known: list[Checkpoint] = []

    def remember(self, listing: Iterable[Any]) -> None:
        """Keep the checkpoints of an `sd-models` answer."""
        self._known = [cp for cp in map(Checkpoint.from_json, listing) if cp is not None]

    async def for_job(self, request: JobRequest) -> Checkpoint | None:
        """The checkpoint `request` asks for, when it names one.

        A native job's `params.model` is always applied; a guidance job's checkpoint only with
        DYNAMIC_SD_MODEL on, as in the guidance's own agent.
        """
        name = request.params.get("model")
        if not isinstance(name, str) or not name or request.task == "upscale":
            return None
        if request.source == "guidance" and not self._dynamic:
            log.info(
                "model switching is off for guidance jobs (DYNAMIC_SD_MODEL); the job's model "
                "is not applied",
                model=name,
            )
            return None
        return await self.find(name)

    async def find(self, name: str) -> Checkpoint:
        """The checkpoint called `name`, listing the checkpoints again once if it is unknown."""
        found = self._match(name)
        if found is None:
            log.info("unknown checkpoint; asking the Web UI to list them again", model=name)
            await self._client.post(
                "refresh-checkpoints", None, read_timeout=self._client.settings.switch_timeout
            )
            self.remember(await self._client.get("sd-models"))
            found = self._match(name)
        if found is None:
            raise PermanentError(
                f"model {name!r}: the Web UI has no such checkpoint; it has {self._listing()}",
                code=UNKNOWN_MODEL,
            )
        return found

    async def switch(self, checkpoint: Checkpoint) -> None:
        """Load `checkpoint` process-wide through `/sdapi/v1/options`, then check it is loaded."""
        if await self._loaded() in checkpoint.names:
            return
        log.info("switching model through options", model=checkpoint.title)
        await self._client.post(
            "options",
            {"sd_model_checkpoint": checkpoint.title},
            read_timeout=self._client.settings.switch_timeout,
        )
        loaded = await self._loaded()
        if loaded not in checkpoint.names:
            raise BackendUnavailable(
                f"model {checkpoint.title!r}: the Web UI still has {loaded!r} loaded after the "
                "switch; the checkpoint may fail to load (see the Web UI's log)",
                code=MODEL_NOT_LOADED,
            )

    def verify(self, checkpoint: Checkpoint | None, info: Mapping[str, Any]) -> None:
        """Raise when the generation `info` names another checkpoint than the one asked for."""
        if checkpoint is None or checkpoint.made(info):
            return
        raise BackendUnavailable(
            f"model {checkpoint.title!r}: the Web UI generated with {info.get('sd_model_name')!r} "
            "instead; the checkpoint may fail to load (see the Web UI's log)",
            code=MODEL_NOT_LOADED,
        )

    async def _loaded(self) -> str | None:
        """The checkpoint title the Web UI has loaded now."""
        options = await self._client.get("options")
        loaded = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        return loaded if isinstance(loaded, str) else None

    def _match(self, name: str) -> Checkpoint | None:
        """The known checkpoint with exactly this title, else the first known by this name."""
        exact = [cp for cp in self._known if cp.title == name]
        named = [cp for cp in self._known if name in cp.names]
        return next(iter(exact or named), None)

    def _listing(self) -> str:
        """The known titles, for an error message."""
        if not self._known:
            return "none"
        titles = sorted(cp.title for cp in self._known)
        more = len(titles) - _LISTED
        return ", ".join(titles[:_LISTED]) + (f" and {more} more" if more > 0 else "")
