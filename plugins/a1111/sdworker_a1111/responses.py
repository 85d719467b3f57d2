"""The Web UI's answers as a `BackendResult`: decoded images, their seeds, the parsed `info`.

`txt2img`/`img2img` answer `{"images": [base64...], "parameters", "info": "<JSON string>"}`;
image `n` (from `info.index_of_first_image`, past a grid) has seed `info.all_seeds[n]`; images a
script appends after them (ControlNet maps) have none. `extra-single-image` answers
`{"image", "html_info"}`, `extra-batch-images` `{"images", "html_info"}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from sdworker.backend import BackendResult, Output
from sdworker.errors import BackendUnavailable, PermanentError
from sdworker_a1111.failures import message_of

NO_IMAGES = "no_images"
_TYPES = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
}


def parse_result(payload: Any, call: str) -> BackendResult:
    """The outputs and info of the Web UI's answer to `call`; `PermanentError` without images."""
    if not isinstance(payload, dict):
        raise BackendUnavailable(f"the Web UI answered {call} with a JSON {type(payload).__name__}")
    encoded = _encoded_images(payload)
    if not encoded:
        reasons = {key: payload[key] for key in ("detail", "errors", "error") if payload.get(key)}
        raise PermanentError(
            f"the Web UI returned no images for {call}: {message_of(reasons)}", code=NO_IMAGES
        )
    info = _info(payload)
    first = _whole(info.get("index_of_first_image"))
    seeds = info.get("all_seeds")
    seeds = seeds if isinstance(seeds, list) else []
    outputs = [
        _output(text, seeds[n] if n < len(seeds) else None, n, call)
        for n, text in enumerate(encoded[first:] or encoded)
    ]
    return BackendResult(outputs, info=info)


def _encoded_images(payload: Mapping[str, Any]) -> list[str]:
    """The base64 images of an answer, whichever shape it has."""
    images = payload.get("images")
    if isinstance(images, list):
        return [image for image in images if isinstance(image, str) and image]
    image = payload.get("image")
    return [image] if isinstance(image, str) and image else []


def _info(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`info` parsed from its JSON string, or the extras' `html_info`."""
    info = payload.get("info")
    if isinstance(info, str) and info:
        try:
            info = json.loads(info)
        except json.JSONDecodeError:
            return {"text": info}
    if isinstance(info, dict):
        return info
    html = payload.get("html_info")
    return {"html_info": html} if isinstance(html, str) and html else {}


def _output(text: str, seed: Any, n: int, call: str) -> Output:
    """One decoded image with its type, size and seed."""
    data = _decode(text, n, call)
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format or "", image.size
    except (UnidentifiedImageError, OSError) as error:
        raise BackendUnavailable(f"image {n} of {call} is not a readable image ({error})") from None
    content_type, extension = _TYPES.get(kind, (Image.MIME.get(kind, "image/png"), kind.lower()))
    return Output(
        data,
        content_type=content_type,
        extension=extension or "png",
        width=width,
        height=height,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
    )


def _decode(text: str, n: int, call: str) -> bytes:
    """Base64 (optionally a `data:` URI) to bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BackendUnavailable(f"image {n} of {call} is not valid base64") from None


def _whole(value: Any) -> int:
    """A non-negative whole number, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
