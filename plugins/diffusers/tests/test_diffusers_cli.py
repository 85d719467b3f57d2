"""`sdworker diffusers make-tiny`: the tiny model as a folder, and as one checkpoint file."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from typer.testing import CliRunner

from sdworker_diffusers.cli import diffusers_cli
from sdworker_diffusers.single_file import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX


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
