"""structlog, imported without rich: every sdworker module takes it from here.

structlog imports rich, and rich pygments, for pretty tracebacks: 3 MB in every worker process
(docs/performance.md). sdworker's log chain formats exceptions itself (`format_exc_info`), so
structlog never renders one; rich stays importable for the commands that print tables and
progress bars.
"""

import sys

if "structlog" not in sys.modules and "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]  # import rich -> ImportError
    try:
        import structlog
    finally:
        del sys.modules["rich"]

import structlog

__all__ = ["structlog"]
