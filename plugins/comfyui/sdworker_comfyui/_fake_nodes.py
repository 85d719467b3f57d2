"""The node classes of the fake ComfyUI: real schemas, tiny weight-free implementations.

Images are lists of PIL images (a batch); a "model" is the checkpoint's name; a latent is a dict
with the size, the batch and, after sampling, the seed and prompt that colour the decoded image.
Samplers take `step_seconds` per step and can be interrupted between steps, as on a real server.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image, ImageOps

__all__ = ["NODES", "SAMPLERS", "SCHEDULERS", "FakeNode", "NodeContext"]

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"]
VIDEO_FORMATS = ["image/gif", "image/webp", "video/h264-mp4", "video/webm"]
_MAX = 0xFFFFFFFFFFFFFFFF


class NodeContext(Protocol):
    """What a running node may ask of the fake server."""

    async def step(self, value: int, total: int) -> None:
        """Report one sampler step (and stop here if interrupted)."""

    def read_input(self, name: str) -> bytes:
        """The bytes of an uploaded input file (`subfolder/name` or `name`)."""

    def save(self, kind: str, prefix: str, extension: str, data: bytes) -> dict[str, Any]:
        """Store a file as `output` or `temp`; return its history entry."""


Run = Callable[[NodeContext, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class FakeNode:
    """One node class: its inputs (as `/object_info` lists them), outputs and behaviour.

    `run` returns a tuple of outputs, or for an output node the `ui` dict history records.
    """

    run: Run
    required: Mapping[str, Any]
    outputs: tuple[str, ...] = ()
    output_node: bool = False
    optional: Mapping[str, Any] = field(default_factory=dict)
    validates: tuple[str, ...] = ()
    """Inputs checked by the node itself (`VALIDATE_INPUTS`), not against the option list."""

    def schema(self, name: str, options: Mapping[str, list[str]]) -> dict[str, Any]:
        """The `/object_info` entry of this class, option lists filled from `options`."""
        return {
            "input": {
                "required": {k: _spec(v, options) for k, v in self.required.items()},
                "optional": {k: _spec(v, options) for k, v in self.optional.items()},
            },
            "input_order": {"required": list(self.required), "optional": list(self.optional)},
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.outputs),
            "name": name,
            "display_name": name,
            "description": "",
            "python_module": "nodes",
            "category": "fake",
            "output_node": self.output_node,
        }


def _spec(value: Any, options: Mapping[str, list[str]]) -> Any:
    """An input spec, with `("@name", {...})` standing for the live option list `name`."""
    kind, extra = value
    if isinstance(kind, str) and kind.startswith("@"):
        return [list(options.get(kind[1:], [])), dict(extra)]
    return [kind, dict(extra)]


def _int(default: int, low: int = 0, high: int = _MAX) -> tuple[str, dict[str, Any]]:
    return "INT", {"default": default, "min": low, "max": high}


def _float(default: float, low: float = 0.0, high: float = 100.0) -> tuple[str, dict[str, Any]]:
    return "FLOAT", {"default": default, "min": low, "max": high}


def _string(default: str = "") -> tuple[str, dict[str, Any]]:
    return "STRING", {"default": default}


def _link(kind: str) -> tuple[str, dict[str, Any]]:
    return kind, {}


def _choice(name: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return f"@{name}", extra


def _colour(*parts: Any) -> tuple[int, int, int]:
    """A colour that depends on every part."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return digest[0], digest[1], digest[2]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _checkpoint(ctx: NodeContext, i: dict[str, Any]) -> Any:
    return i["ckpt_name"], i["ckpt_name"], i["ckpt_name"]


async def _encode_text(ctx: NodeContext, i: dict[str, Any]) -> Any:
    return (f"{i['clip']}:{i['text']}",)


async def _empty_latent(ctx: NodeContext, i: dict[str, Any]) -> Any:
    return ({"size": (i["width"], i["height"]), "batch": i["batch_size"], "images": None},)


async def _sample(ctx: NodeContext, i: dict[str, Any]) -> Any:
    for step in range(1, i["steps"] + 1):
        await ctx.step(step, i["steps"])
    noise = (i["seed"], i["positive"], i["cfg"], i["sampler_name"])
    return ({**i["latent_image"], "noise": noise, "denoise": i["denoise"]},)


async def _decode(ctx: NodeContext, i: dict[str, Any]) -> Any:
    latent = i["samples"]
    bases = latent["images"] or [None]
    return ([_paint(latent, n, bases[n % len(bases)]) for n in range(latent["batch"])],)


def _paint(latent: dict[str, Any], n: int, base: Image.Image | None) -> Image.Image:
    """Image `n` of a sampled latent: a colour from its noise, over `base` by `denoise`."""
    painted = Image.new(
        "RGB", base.size if base else latent["size"], _colour(latent.get("noise"), n)
    )
    if base is None:
        return painted
    blended = Image.blend(base, painted, float(latent.get("denoise", 1.0)))
    mask = latent.get("mask")
    return blended if mask is None else Image.composite(blended, base, mask.resize(base.size))


async def _encode_image(ctx: NodeContext, i: dict[str, Any]) -> Any:
    images = i["pixels"]
    return ({"size": images[0].size, "batch": len(images), "images": images},)


async def _noise_mask(ctx: NodeContext, i: dict[str, Any]) -> Any:
    return ({**i["samples"], "mask": i["mask"][0]},)


async def _repeat(ctx: NodeContext, i: dict[str, Any]) -> Any:
    latent = i["samples"]
    images = latent["images"] * i["amount"] if latent["images"] else None
    return ({**latent, "batch": latent["batch"] * i["amount"], "images": images},)


async def _load_image(ctx: NodeContext, i: dict[str, Any]) -> Any:
    with Image.open(io.BytesIO(ctx.read_input(i["image"]))) as image:
        rgba = image.convert("RGBA")
    mask = ImageOps.invert(rgba.getchannel("A"))
    return [rgba.convert("RGB")], [mask]


async def _load_mask(ctx: NodeContext, i: dict[str, Any]) -> Any:
    with Image.open(io.BytesIO(ctx.read_input(i["image"]))) as image:
        rgba = image.convert("RGBA")
    channel = rgba.getchannel({"alpha": "A", "red": "R", "green": "G", "blue": "B"}[i["channel"]])
    return ([ImageOps.invert(channel) if i["channel"] == "alpha" else channel],)


async def _empty_image(ctx: NodeContext, i: dict[str, Any]) -> Any:
    colour = i["color"]
    rgb = ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255)
    return ([Image.new("RGB", (i["width"], i["height"]), rgb) for _ in range(i["batch_size"])],)


async def _invert(ctx: NodeContext, i: dict[str, Any]) -> Any:
    return ([ImageOps.invert(image) for image in i["image"]],)


async def _save_image(ctx: NodeContext, i: dict[str, Any]) -> Any:
    saved = [ctx.save("output", i["filename_prefix"], "png", _png(im)) for im in i["images"]]
    return {"images": saved}


async def _preview_image(ctx: NodeContext, i: dict[str, Any]) -> Any:
    return {"images": [ctx.save("temp", "ComfyUI_temp", "png", _png(im)) for im in i["images"]]}


async def _save_webp(ctx: NodeContext, i: dict[str, Any]) -> Any:
    buffer = io.BytesIO()
    first, *rest = i["images"]
    first.save(buffer, format="WEBP", save_all=True, append_images=rest, duration=100)
    entry = ctx.save("output", i["filename_prefix"], "webp", buffer.getvalue())
    return {"images": [entry], "animated": [True]}


async def _video_combine(ctx: NodeContext, i: dict[str, Any]) -> Any:
    kind = "output" if i.get("save_output", True) else "temp"
    extension, data = _video(i["images"], i["format"], i["frame_rate"])
    entry = ctx.save(kind, i["filename_prefix"], extension, data)
    entry |= {"format": i["format"], "frame_rate": i["frame_rate"]}
    return {"gifs": [entry]}


def _video(images: list[Image.Image], kind: str, rate: float) -> tuple[str, bytes]:
    """A real GIF or animated WebP; for mp4/webm, a file with the right signature only."""
    buffer = io.BytesIO()
    if kind in ("image/gif", "image/webp"):
        first, *rest = images
        fmt = kind.rpartition("/")[2].upper()
        first.save(buffer, format=fmt, save_all=True, append_images=rest, duration=1000 / rate)
        return fmt.lower(), buffer.getvalue()
    if kind == "video/webm":
        return "webm", b"\x1a\x45\xdf\xa3" + b"\x00" * 28
    return "mp4", struct.pack(">I4s4sI", 24, b"ftyp", b"isom", 512) + b"isommp41"


async def _tone(ctx: NodeContext, i: dict[str, Any]) -> Any:
    rate = 8000
    count = int(rate * i["seconds"])
    samples = (int(12000 * math.sin(2 * math.pi * i["frequency"] * n / rate)) for n in range(count))
    return ({"rate": rate, "frames": b"".join(struct.pack("<h", s) for s in samples)},)


async def _save_audio(ctx: NodeContext, i: dict[str, Any]) -> Any:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(i["audio"]["rate"])
        out.writeframes(i["audio"]["frames"])
    return {"audio": [ctx.save("output", i["filename_prefix"], "wav", buffer.getvalue())]}


_LATENT, _IMAGE = ("LATENT",), ("IMAGE",)
_TEXT = _link("CONDITIONING")

NODES: dict[str, FakeNode] = {
    "CheckpointLoaderSimple": FakeNode(
        _checkpoint, {"ckpt_name": _choice("checkpoints")}, ("MODEL", "CLIP", "VAE")
    ),
    "CLIPTextEncode": FakeNode(
        _encode_text, {"text": _string(), "clip": _link("CLIP")}, ("CONDITIONING",)
    ),
    "EmptyLatentImage": FakeNode(
        _empty_latent,
        {"width": _int(512, 16, 16384), "height": _int(512, 16, 16384), "batch_size": _int(1, 1)},
        _LATENT,
    ),
    "KSampler": FakeNode(
        _sample,
        {
            "model": _link("MODEL"),
            "seed": _int(0),
            "steps": _int(20, 1, 10000),
            "cfg": _float(8.0),
            "sampler_name": _choice("samplers"),
            "scheduler": _choice("schedulers"),
            "positive": _TEXT,
            "negative": _TEXT,
            "latent_image": _link("LATENT"),
            "denoise": _float(1.0, 0.0, 1.0),
        },
        _LATENT,
    ),
    "VAEDecode": FakeNode(_decode, {"samples": _link("LATENT"), "vae": _link("VAE")}, _IMAGE),
    "VAEEncode": FakeNode(_encode_image, {"pixels": _link("IMAGE"), "vae": _link("VAE")}, _LATENT),
    "SetLatentNoiseMask": FakeNode(
        _noise_mask, {"samples": _link("LATENT"), "mask": _link("MASK")}, _LATENT
    ),
    "RepeatLatentBatch": FakeNode(
        _repeat, {"samples": _link("LATENT"), "amount": _int(1, 1, 64)}, _LATENT
    ),
    "LoadImage": FakeNode(
        _load_image,
        {"image": _choice("inputs", image_upload=True)},
        ("IMAGE", "MASK"),
        validates=("image",),
    ),
    "LoadImageMask": FakeNode(
        _load_mask,
        {"image": _choice("inputs", image_upload=True), "channel": _choice("channels")},
        ("MASK",),
        validates=("image",),
    ),
    "EmptyImage": FakeNode(
        _empty_image,
        {
            "width": _int(512, 1, 16384),
            "height": _int(512, 1, 16384),
            "batch_size": _int(1, 1, 4096),
            "color": _int(0, 0, 0xFFFFFF),
        },
        _IMAGE,
    ),
    "ImageInvert": FakeNode(_invert, {"image": _link("IMAGE")}, _IMAGE),
    "SaveImage": FakeNode(
        _save_image,
        {"images": _link("IMAGE"), "filename_prefix": _string("ComfyUI")},
        output_node=True,
    ),
    "PreviewImage": FakeNode(_preview_image, {"images": _link("IMAGE")}, output_node=True),
    "SaveAnimatedWEBP": FakeNode(
        _save_webp,
        {"images": _link("IMAGE"), "filename_prefix": _string("ComfyUI"), "fps": _float(6.0)},
        output_node=True,
    ),
    "VHS_VideoCombine": FakeNode(
        _video_combine,
        {
            "images": _link("IMAGE"),
            "frame_rate": _float(8.0, 1.0, 120.0),
            "format": _choice("video_formats"),
            "filename_prefix": _string("AnimateDiff"),
        },
        output_node=True,
        optional={"save_output": ("BOOLEAN", {"default": True})},
    ),
    "FakeTone": FakeNode(
        _tone,
        {"seconds": _float(0.1, 0.01, 10.0), "frequency": _float(440.0, 20.0, 4000.0)},
        ("AUDIO",),
    ),
    "SaveAudio": FakeNode(
        _save_audio,
        {"audio": _link("AUDIO"), "filename_prefix": _string("audio/ComfyUI")},
        output_node=True,
    ),
}
"""Every node class the fake server has, by name."""
