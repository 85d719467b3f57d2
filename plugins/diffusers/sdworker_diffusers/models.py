"""Loading models: directories, single-file checkpoints or the tiny model, kept in an LRU."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdworker.errors import ConfigError, InvalidJob
from sdworker.telemetry import backend_phase
from sdworker_diffusers.settings import TINY, DiffusersSettings
from sdworker_diffusers.tiny import is_model_dir, make_tiny_model, make_tiny_upscaler

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
UPSCALERS = frozenset({"StableDiffusionUpscalePipeline"})
TASK_PIPELINES = {
    "txt2img": "AutoPipelineForText2Image",
    "img2img": "AutoPipelineForImage2Image",
    "inpaint": "AutoPipelineForInpainting",
}
DEFAULT_NAME = "default"


@dataclass(frozen=True)
class Placement:
    """Where and how pipelines run: device, dtype and the memory/speed switches."""

    device: str
    dtype: Any
    settings: DiffusersSettings


@dataclass
class LoadedModel:
    """One loaded pipeline; task pipelines are made from it with `from_pipe` (shared weights)."""

    name: str
    family: str
    base: Any
    task_classes: dict[str, Any] = field(default_factory=dict)

    def for_task(self, task: str, scheduler: Any) -> Any:
        """A light pipeline for `task` sharing this model's components, with its own scheduler."""
        import diffusers

        auto = getattr(diffusers, TASK_PIPELINES[task])
        scheduler = scheduler or type(self.base.scheduler).from_config(self.base.scheduler.config)
        pipeline = auto.from_pipe(self.base, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


class ModelStore:
    """The configured models by name; loads on demand and keeps the most recently used."""

    def __init__(self, settings: DiffusersSettings, placement: Placement) -> None:
        self.settings = settings
        self.placement = placement
        self.paths = {DEFAULT_NAME: settings.model, **settings.models}
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._upscaler: Any = None

    def names(self) -> list[str]:
        """Every model a job may name in `params.model`."""
        return sorted(self.paths)

    def get(self, name: str | None) -> LoadedModel:
        """The model called `name` (None: the default), loading it and evicting the oldest."""
        key = self._resolve_name(name)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        with backend_phase("load model", model=key):
            model = self._load(key, self.paths[key])
        self._loaded[key] = model
        while len(self._loaded) > self.settings.cache_size:
            self._evict(next(iter(self._loaded)))
        return model

    def upscaler(self) -> Any:
        """The configured upscale pipeline, loaded on first use and kept."""
        if self._upscaler is None:
            assert self.settings.upscaler, "no upscaler configured"
            location = self._materialise(
                self.settings.upscaler, "tiny-upscaler", make_tiny_upscaler
            )
            pipeline = load_pipeline(location, self.settings, self.placement.dtype)
            if type(pipeline).__name__ not in UPSCALERS:
                raise ConfigError(
                    f"SDWORKER_DIFFUSERS_UPSCALER: {type(pipeline).__name__} is not an upscale "
                    "pipeline; use a StableDiffusionUpscalePipeline (x4)"
                )
            place(pipeline, self.placement)
            self._upscaler = pipeline
        return self._upscaler

    def _resolve_name(self, name: str | None) -> str:
        if not name:
            return DEFAULT_NAME
        if name in self.paths:
            return name
        by_path = {os.path.basename(path.rstrip("/")): key for key, path in self.paths.items()}
        if name in by_path:
            return by_path[name]
        raise InvalidJob(
            f"params.model: unknown model {name!r}; available: {', '.join(self.names())}"
        )

    def _evict(self, name: str) -> None:
        self._loaded.pop(name)
        if self.placement.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _load(self, name: str, location: str) -> LoadedModel:
        location = self._materialise(location, "tiny-sd", make_tiny_model)
        pipeline = load_pipeline(location, self.settings, self.placement.dtype)
        family = FAMILIES.get(type(pipeline).__name__)
        if family is None:
            raise ConfigError(
                f"model {name!r}: {type(pipeline).__name__} is not a Stable Diffusion 1.x/2.x "
                "or SDXL pipeline; sdworker's diffusers backend runs those families"
            )
        place(pipeline, self.placement)
        return LoadedModel(name=name, family=family, base=pipeline)

    def _materialise(self, location: str, name: str, make: Callable[[Path], Path]) -> str:
        """`tiny` means the built-in tiny pipeline, written once to the cache folder."""
        if location != TINY:
            return location
        folder = Path(self.settings.cache_dir or Path.home() / ".cache" / "sdworker") / name
        if not is_model_dir(folder):
            make(folder)
        return str(folder)


def load_pipeline(location: str, settings: DiffusersSettings, dtype: Any) -> Any:
    """A pipeline from a saved directory, a single-file checkpoint, or (if reachable) a hub id."""
    path = Path(location)
    if path.is_dir():
        return _from_directory(path, dtype)
    if path.suffix in (".safetensors", ".ckpt") and path.is_file():
        return _from_single_file(path, settings, dtype)
    if path.is_absolute() or location.startswith(".") or location.count("/") != 1:
        raise ConfigError(
            f"SDWORKER_DIFFUSERS_MODEL: no model at {location} (no such directory or file); "
            "give a save_pretrained directory, a .safetensors checkpoint or a hub id"
        )
    return _from_hub(location, dtype)


def _from_directory(path: Path, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    if not is_model_dir(path):
        raise ConfigError(f"SDWORKER_DIFFUSERS_MODEL: {path} has no model_index.json")
    class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    if class_name not in FAMILIES and class_name not in UPSCALERS:
        raise ConfigError(f"model at {path}: {class_name or 'unknown'} pipelines are not supported")
    return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)


def _from_single_file(path: Path, settings: DiffusersSettings, dtype: Any) -> Any:
    import diffusers

    config = settings.model_config_dir
    if not config or not is_model_dir(Path(config)):
        raise ConfigError(
            f"SDWORKER_DIFFUSERS_MODEL_CONFIG_DIR: {path.name} is a single-file checkpoint and "
            "needs a local config; point this at the model's config folder (its model_index.json)"
        )
    class_name = json.loads((Path(config) / "model_index.json").read_text())["_class_name"]
    pipeline_class = getattr(diffusers, class_name)
    return pipeline_class.from_single_file(
        str(path), config=config, dtype=dtype, local_files_only=True
    )


def _from_hub(model_id: str, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        raise ConfigError(
            f"SDWORKER_DIFFUSERS_MODEL: cannot load {model_id!r} from the hub ({error}); "
            "download it and give its directory instead"
        ) from None


def place(pipeline: Any, placement: Placement) -> None:
    """Move a pipeline to its device and dtype and apply the memory and speed switches."""
    settings = placement.settings
    if settings.cpu_offload and placement.device == "cuda":
        pipeline.enable_model_cpu_offload()
    else:
        pipeline.to(placement.device)
    if settings.vae_slicing:
        pipeline.vae.enable_slicing()
    if settings.vae_tiling:
        pipeline.vae.enable_tiling()
    if settings.attention_slicing:
        pipeline.enable_attention_slicing()
    if settings.compile:
        pipeline.unet.compile_repeated_blocks(fullgraph=True)
    pipeline.set_progress_bar_config(disable=True)


def import_quietly() -> None:
    """Import transformers and diffusers without their import-time warnings and bars."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before diffusers imports its processors
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()


def resolve_placement(settings: DiffusersSettings) -> Placement:
    """CUDA with fp16 when present (bf16 if asked), else CPU float32; settings can force either."""
    import torch

    import_quietly()

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("SDWORKER_DIFFUSERS_DEVICE=cuda but no CUDA device is visible")
    dtype_name = settings.dtype
    if dtype_name == "auto":
        dtype_name = "float16" if device == "cuda" else "float32"
    return Placement(device=device, dtype=getattr(torch, dtype_name), settings=settings)
