"""A tiny Stable Diffusion pipeline built from configs in code: real classes, seeded weights.

It loads through the same `from_pretrained` path as a real model, needs no network, and takes
about 6.5 MiB on disk. Its images are coloured noise (the weights are random), but they are
deterministic from the seed, which is what tests, the demo and benchmarks need.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHT_SEED = 0
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("o", "r")]


def make_tiny_model(path: Path) -> Path:
    """Write the tiny pipeline to `path` with `save_pretrained`; return `path`."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(WEIGHT_SEED)
    pipeline = StableDiffusionPipeline(
        unet=_unet(),
        vae=_vae(),
        text_encoder=_text_encoder(),
        tokenizer=_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    _match_real_scheduler_config(path)
    return path


def _match_real_scheduler_config(path: Path) -> None:
    """Real SD 1.x checkpoints set `clip_sample: false`; DDIM/DDPM built from it expect that."""
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["clip_sample"] = False
    config_file.write_text(json.dumps(config, indent=2))


def make_tiny_upscaler(path: Path) -> Path:
    """Write a tiny x4 `StableDiffusionUpscalePipeline` (seeded weights) to `path`."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    torch.manual_seed(WEIGHT_SEED)
    pipeline = StableDiffusionUpscalePipeline(
        vae=_vae(blocks=3, scaling_factor=0.08333),  # as the real x4 upscaler's
        text_encoder=_text_encoder(),
        tokenizer=_tokenizer(),
        unet=_upscale_unet(),
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def _upscale_unet() -> object:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )


def is_model_dir(path: Path) -> bool:
    """Whether `path` holds a saved pipeline (its `model_index.json`)."""
    return (path / "model_index.json").is_file()


def _unet() -> object:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _vae(blocks: int = 2, scaling_factor: float = 0.18215) -> object:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32, 64)[-blocks:],
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _text_encoder() -> object:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(_vocab()),
        max_position_embeddings=77,
    )
    return CLIPTextModel(config)


def _vocab() -> dict[str, int]:
    """Byte-level letters, their end-of-word forms, every merge result, and the special tokens."""
    tokens = ["<|startoftext|>", "<|pad|>", "<|endoftext|>"]
    tokens += [*_LETTERS, *(f"{letter}</w>" for letter in _LETTERS)]
    tokens += ["".join(pair) for pair in _MERGES]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def _tokenizer() -> object:
    from transformers import CLIPTokenizer

    vocab = _vocab()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(_MERGES),
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def _scheduler() -> object:
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def describe(path: Path) -> str:
    """One line about a saved tiny model, for the command line."""
    index = json.loads((path / "model_index.json").read_text())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{index['_class_name']} at {path} ({size / 2**20:.1f} MiB)"


def make_tiny_lora(model: Path, folder: Path, name: str = "tiny-style") -> Path:
    """Write a LoRA for the tiny model's U-Net (random, seeded), as `folder/name.safetensors`."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    torch.manual_seed(WEIGHT_SEED + 1)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipeline.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors"
    )
    return folder / f"{name}.safetensors"
