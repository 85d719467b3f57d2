"""Helpers for testing sdworker and its plugins: a fake backend, the backend contract suite,
and a fake EC2 instance-metadata server (IMDSv2, Spot notices).

`BackendContract` imports pytest; import `sdworker.testing.fake` alone where pytest is absent.
"""

from sdworker.testing.contract import BackendContract
from sdworker.testing.fake import FakeBackend, tiny_png
from sdworker.testing.imds import FakeInstanceMetadata

__all__ = ["BackendContract", "FakeBackend", "FakeInstanceMetadata", "tiny_png"]
