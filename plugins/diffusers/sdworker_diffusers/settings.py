"""Settings of the diffusers backend: the `SDWORKER_DIFFUSERS_*` variables."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from sdworker.plugin_settings import PluginSettings

TINY = "tiny"


class DiffusersSettings(PluginSettings):
    """Example: `SDWORKER_DIFFUSERS_MODEL=/models/sd15 SDWORKER_DIFFUSERS_DTYPE=float16`."""

    model_config = SettingsConfigDict(env_prefix="SDWORKER_DIFFUSERS_", extra="ignore", frozen=True)
    toml_table: ClassVar[str] = "diffusers"

    model: str = Field(TINY, description="Default model: a directory, a .safetensors file, or tiny")
    models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="More models by name: name=path,name=path"
    )
    model_config_dir: str | None = Field(None, description="Config for single-file checkpoints")
    cache_size: int = Field(2, ge=1, description="Loaded models kept (least recently used go)")
    isolation: Literal["process", "thread"] = Field(
        "process", description="Run the pipelines in a process of their own, or a thread"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = Field(False, description="torch.compile the U-Net (regional)")
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = Field(False, description="Model CPU offload, for small GPUs")
    attention_slicing: bool = False
    max_side: int = Field(2048, ge=64, description="Largest width or height accepted")
    max_batch: int = Field(8, ge=1, description="Largest batch_size accepted")
    max_steps: int = Field(150, ge=1)
    lora_dir: str | None = Field(None, description="Folder of LoRA .safetensors files by name")
    upscaler: str | None = Field(None, description="A saved x4 upscale pipeline for `upscale`")
    warmup: bool = Field(True, description="Run one tiny generation at start")
    cache_dir: str | None = Field(None, description="Where the built-in tiny model is written")

    @field_validator("models", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """Accept `sd15=/models/sd15,sdxl=/models/sdxl` as well as a TOML table."""
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("write it as name=path,name=path")
            return {name.strip(): path.strip() for name, path in pairs}
        return value


def load_diffusers_settings() -> DiffusersSettings:
    """The settings, or a one-line `ConfigError` naming the variable."""
    return DiffusersSettings.load()
