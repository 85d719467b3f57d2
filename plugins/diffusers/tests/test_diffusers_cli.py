"""`sdworker diffusers make-tiny`, and the original single-file layout it can write."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from typer.testing import CliRunner

from sdworker_diffusers.cli import diffusers_cli
from sdworker_diffusers.single_file import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    write_single_file,
)
from sdworker_diffusers.tiny import make_tiny_model


def test_make_tiny_writes_a_folder_and_an_original_layout_checkpoint(tmp_path: Path) -> None:
    """The folder loads with from_pretrained; the file has the original prefixes and says where."""
    folder, file = tmp_path / "tiny", tmp_path / "tiny.safetensors"
    # a one-command Typer app takes that command's arguments directly
    result = CliRunner().invoke(diffusers_cli, [str(folder), "--single-file", str(file)])
    assert result.exit_code == 0, result.output
    assert (folder / "model_index.json").is_file()
    assert f"single-file checkpoint at {file}" in result.output
    with safe_open(str(file), "pt") as opened:
        keys = list(opened.keys())
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert f"{UNET_PREFIX}input_blocks.0.0.weight" in keys
    assert f"{VAE_PREFIX}encoder.mid.attn_1.q.weight" in keys
    assert f"{CLIP_PREFIX}text_model.embeddings.position_embedding.weight" in keys


def test_the_original_layout_converts_back_exactly_for_an_sd15_shaped_model(
    tmp_path: Path,
) -> None:
    """SD 1.5's block layout (4 blocks of 2 layers, attention in 3, an upsampler without
    attention), with small channels: diffusers' own converters give back every weight."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
    )
    folder = make_tiny_model(tmp_path / "tiny")  # its text encoder, scheduler and tokenizer
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    checkpoint = load_file(write_single_file(folder, tmp_path / "sd15.safetensors"))
    for model, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = convert(checkpoint, dict(model.config))
        expected = model.state_dict()
        assert back.keys() == expected.keys()
        assert all(torch.equal(back[k].reshape(expected[k].shape), expected[k]) for k in back)
