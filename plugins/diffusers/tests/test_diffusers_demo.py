"""`sdworker demo` on the diffusers backend and the tiny model, end to end (a short version)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdworker.demo import run_demo


async def test_the_demo_runs_end_to_end_on_the_tiny_model(model_env: Path, tmp_path: Path) -> None:
    """Local AWS, the worker on diffusers, four jobs: three succeed, the invalid one fails."""
    seen: list[str] = []
    results = await run_demo(
        "diffusers",
        tmp_path,
        lambda body: seen.append(str(body["status"])),
        size={"width": 64, "height": 64, "steps": 3},
    )
    statuses = {result.job_id: result.body["status"] for result in results}
    assert statuses == {
        "demo-txt2img": "succeeded",
        "demo-batch": "succeeded",
        "demo-invalid": "failed",
        "demo-img2img": "succeeded",
    }
    assert next(result.files for result in results if result.job_id == "demo-batch") == [
        tmp_path / "demo-batch" / "0.png",
        tmp_path / "demo-batch" / "1.png",
    ]
    with Image.open(tmp_path / "demo-img2img" / "0.png") as image:
        assert image.size == (64, 64)
    assert "progress" in seen
