"""The a1111 backend's phases in a job's trace, against the fake Web UI on loopback."""

from __future__ import annotations

from a1111_support import fast

from sdworker.aws import AwsClients
from sdworker.local import LocalResources
from sdworker.settings import Settings
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeCheckpoint, FakeWebUI
from tests.aws_helpers import send
from tests.telemetry_helpers import generate_phases, traced_worker


async def test_a_job_trace_shows_model_switch_render_and_decoding_beneath_generate(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A job naming another model, with switches through /options: `switch model` (naming
    it), `render`, `decode outputs`, in order beneath `generate`."""
    params = {"prompt": "a cat", "model": "sdxl", "width": 64, "height": 64, "steps": 2}
    async with FakeWebUI(step_seconds=0.001, checkpoints=("sd15", "sdxl")) as webui:
        settings = Settings(backend_url=webui.url, dynamic_sd_model=True)
        backend = A1111Backend(settings, fast(model_switch="options"))
        async with traced_worker(resources, backend) as captured:
            await send(clients, resources, {"id": "a1111", "task": "txt2img", "params": params})
            phases = await generate_phases(captured, "a1111")
    assert [s.name for s in phases] == ["switch model", "render", "decode outputs"]
    assert (phases[0].attributes or {})["model"] == FakeCheckpoint("sdxl").title
    assert (phases[1].attributes or {})["endpoint"] == "txt2img"
