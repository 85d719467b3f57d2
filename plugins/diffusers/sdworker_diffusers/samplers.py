"""A1111-style sampler names mapped onto diffusers schedulers, built per job from a config."""

from __future__ import annotations

import re
from typing import Any

from sdworker.errors import InvalidJob

# name → (scheduler class, config overrides)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def sampler_key(name: str) -> str:
    """`DPM++ 2M Karras` → `dpmpp_2m_karras`, `Euler a` → `euler_a`: A1111 names work too."""
    key = name.strip().lower().replace("++", "pp").replace("+", "p")
    return re.sub(r"[\s\-]+", "_", key)


def scheduler_for(name: str | None, base_config: Any) -> Any:
    """A fresh scheduler for one job (schedulers hold state); None keeps the model's own type."""
    import diffusers

    if not name:
        return None
    key = sampler_key(name)
    if key not in SAMPLERS:
        raise InvalidJob(
            f"params.sampler: unknown sampler {name!r}; use one of {', '.join(sorted(SAMPLERS))}"
        )
    class_name, overrides = SAMPLERS[key]
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(base_config, **overrides)
