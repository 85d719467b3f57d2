"""Imported once by the fork server that starts the pipeline processes (`process.py`): torch,
diffusers and this plugin's modules, quietly, so that each new process starts with them loaded."""

import torch  # noqa: F401  # loaded here, once, for every child

from sdworker_diffusers import process  # noqa: F401  # and the child's own code
from sdworker_diffusers.models import import_quietly

import_quietly()
