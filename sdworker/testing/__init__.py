"""Helpers for testing sdworker and its plugins: a fake backend and the backend contract suite.

`BackendContract` imports pytest; import `sdworker.testing.fake` alone where pytest is absent.
"""

from sdworker.testing.contract import BackendContract
from sdworker.testing.fake import FakeBackend, tiny_png
from sdworker.testing.imds import FakeInstanceMetadata

__all__ = ["BackendContract", "FakeBackend", "FakeInstanceMetadata", "tiny_png"]
