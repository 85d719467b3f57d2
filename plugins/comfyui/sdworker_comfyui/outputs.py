"""A finished prompt's files: which ones history lists, and how each is stored.

Every node output key (`images`, `gifs`, `videos`, `audio`, ...) that holds file entries counts,
except entries of `type: temp` (previews). Files are taken in node order, and the content type
follows the file name's extension (`.gif` → `image/gif`, `.mp4` → `video/mp4`, ...).
"""

from __future__ import annotations

import io
import mimetypes
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from sdworker.backend import Output
from sdworker_comfyui.client import FileRef

__all__ = ["make_output", "output_files"]

_CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "opus": "audio/opus",
    "m4a": "audio/mp4",
    "glb": "model/gltf-binary",
}
_SAFE_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
_GENERIC = "application/octet-stream"


def output_files(entry: Mapping[str, Any]) -> list[FileRef]:
    """The kept files of a history entry, in node order, each once."""
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        return []
    found: list[FileRef] = []
    for node in sorted(outputs, key=_node_order):
        node_output = outputs[node]
        for value in node_output.values() if isinstance(node_output, dict) else ():
            for ref in _refs(value):
                if ref not in found:
                    found.append(ref)
    return found


def _refs(value: Any) -> list[FileRef]:
    """The non-temporary file entries in one output value (other values hold no files)."""
    if not isinstance(value, list):
        return []
    return [
        FileRef(
            str(item["filename"]),
            str(item.get("subfolder") or ""),
            str(item.get("type") or "output"),
        )
        for item in value
        if isinstance(item, dict)
        and isinstance(item.get("filename"), str)
        and item.get("type", "output") != "temp"
    ]


def _node_order(node: str) -> tuple[int, str]:
    """Numeric node ids in number order, then the others by name."""
    return (int(node), "") if node.isdigit() else (2**63, node)


def make_output(ref: FileRef, data: bytes, announced: str, seed: int | None) -> Output:
    """One downloaded file as an `Output`, typed by its extension (else by the server)."""
    extension = PurePosixPath(ref.filename).suffix.lower().lstrip(".")
    content_type = _CONTENT_TYPES.get(extension) or mimetypes.guess_type(ref.filename)[0]
    content_type = content_type or (announced if announced and announced != _GENERIC else _GENERIC)
    if not _SAFE_EXTENSION.fullmatch(extension):
        extension = (mimetypes.guess_extension(content_type) or ".bin").lstrip(".")
    width, height = _size(data) if content_type.startswith("image/") else (None, None)
    return Output(
        data=data,
        content_type=content_type,
        extension=extension,
        width=width,
        height=height,
        seed=seed,
    )


def _size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height of an image file, from its header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width, image.height
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return None, None
