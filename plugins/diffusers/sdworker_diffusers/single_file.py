"""Write a saved SD 1.x pipeline as one original-layout (LDM) `.safetensors` checkpoint.

The layout is the one A1111 and civitai checkpoints use, which diffusers reads back with
`from_single_file(path, config=the model's folder)`: U-Net keys under `model.diffusion_model.`,
VAE keys under `first_stage_model.`, the CLIP text encoder under `cond_stage_model.transformer.`.
Each renaming below is the inverse of diffusers' own conversion (`single_file_utils`:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), for
any number of blocks and layers per block. It lets the tiny model exercise the single-file path:

    sdworker diffusers make-tiny models/tiny --single-file models/tiny.safetensors
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_LAYERS = {  # diffusers name → original name, outside the blocks
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {  # the current names, then those of folders saved by older diffusers
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def write_single_file(model: Path, path: Path) -> Path:
    """Write `model` (a `save_pretrained` SD 1.x folder with safetensors weights, unsharded, no
    variant) to `path` in the original layout."""
    from safetensors.torch import load_file, save_file

    unet_config = json.loads((model / "unet" / "config.json").read_text())
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    unet = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(model / "text_encoder" / "model.safetensors")
    checkpoint = {
        **{UNET_PREFIX + _unet_key(k, unet_config, unet): v for k, v in unet.items()},
        **{VAE_PREFIX + _vae_key(k, vae_config): _vae_weight(k, v) for k, v in vae.items()},
        **{CLIP_PREFIX + _clip_key(key): value for key, value in text.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, path)
    return path


def _unet_key(key: str, config: Mapping[str, Any], weights: Mapping[str, Any]) -> str:
    """The original name of a diffusers U-Net weight."""
    layer, _, leaf = key.rpartition(".")
    if layer in _UNET_LAYERS:
        return f"{_UNET_LAYERS[layer]}.{leaf}"
    parts = key.split(".")
    per_block = int(config["layers_per_block"])
    if parts[0] == "down_blocks":
        return _down_key(parts, per_block)
    if parts[0] == "up_blocks":
        return _up_key(parts, per_block, weights)
    if parts[0] == "mid_block":  # resnet, attention, resnet
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_renamed(parts[3:], _UNET_RESNET)}"
        return f"middle_block.1.{'.'.join(parts[3:])}"
    raise ValueError(f"no original name for U-Net weight {key!r}")


def _down_key(parts: list[str], per_block: int) -> str:
    block = int(parts[1])
    if parts[2] == "downsamplers":  # the block's last input block, after its layers
        return f"input_blocks.{(per_block + 1) * (block + 1)}.0.op.{parts[-1]}"
    index = (per_block + 1) * block + int(parts[3]) + 1
    return _member(f"input_blocks.{index}", parts[2], parts[4:])


def _up_key(parts: list[str], per_block: int, weights: Mapping[str, Any]) -> str:
    block = int(parts[1])
    last = (per_block + 1) * block + per_block  # up blocks have one layer more than down blocks
    if parts[2] == "upsamplers":  # after the block's attention, if it has one
        has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in weights)
        return f"output_blocks.{last}.{2 if has_attention else 1}.conv.{parts[-1]}"
    index = (per_block + 1) * block + int(parts[3])
    return _member(f"output_blocks.{index}", parts[2], parts[4:])


def _member(prefix: str, kind: str, rest: list[str]) -> str:
    """A block's resnet (`.0`, its layers renamed) or attention (`.1`, names kept)."""
    if kind == "resnets":
        return f"{prefix}.0.{_renamed(rest, _UNET_RESNET)}"
    return f"{prefix}.1.{'.'.join(rest)}"


def _renamed(rest: list[str], names: Mapping[str, str]) -> str:
    """`rest` joined, its leading layer name replaced by the original one when it has one."""
    for new, old in names.items():
        count = new.count(".") + 1
        if ".".join(rest[:count]) == new:
            return ".".join([old, *rest[count:]])
    return ".".join(rest)


def _clip_key(key: str) -> str:
    """Original checkpoints keep `text_model.`, which transformers 5 no longer writes."""
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


def _vae_key(key: str, config: Mapping[str, Any]) -> str:
    """The original name of a diffusers VAE weight (the encoder counts blocks up, the decoder
    down: up_blocks.0 is the original up.{n-1})."""
    parts = key.split(".")
    if parts[1] == "conv_norm_out":
        return f"{parts[0]}.norm_out.{parts[-1]}"
    if len(parts) < 4:
        return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    side, group = parts[0], parts[1]
    if group == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}.{_vae_resnet(parts[4:])}"
        renamed = _renamed(parts[4:], _VAE_ATTENTION)
        if renamed == ".".join(parts[4:]):
            raise ValueError(f"no original name for VAE attention weight {key!r}")
        return f"{side}.mid.attn_1.{renamed}"
    block = int(parts[2])
    if group == "up_blocks":
        block = len(config["up_block_types"]) - 1 - block
    name = "down" if group == "down_blocks" else "up"
    if parts[3] in ("downsamplers", "upsamplers"):
        sampler = "downsample" if name == "down" else "upsample"
        return f"{side}.{name}.{block}.{sampler}.conv.{parts[-1]}"
    return f"{side}.{name}.{block}.block.{parts[4]}.{_vae_resnet(parts[5:])}"


def _vae_resnet(rest: list[str]) -> str:
    return _renamed(rest, {"conv_shortcut": "nin_shortcut"})


def _vae_weight(key: str, value: Any) -> Any:
    """The VAE's attention projections are 1x1 convolutions in the original layout."""
    is_projection = any(f".{name}.weight" in key for name in _VAE_ATTENTION if name != "group_norm")
    if "mid_block.attentions" in key and is_projection and value.ndim == 2:
        return value[:, :, None, None]
    return value
