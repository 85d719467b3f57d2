"""moto in a process of its own, for the benchmarks: the AWS side then has its own interpreter
lock, as AWS has its own machines, and the process that runs the proxy and the producer does not
compete with it for one.

    python bench/moto_process.py    # prints {"endpoint": "http://127.0.0.1:PORT"}, serves until
                                    # its standard input closes or SIGTERM
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from sdworker.local import LocalAws


def main() -> None:
    """Start moto on a free loopback port, say where, serve until told to stop."""
    server = LocalAws()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_until_eof, args=(stop,), daemon=True).start()
    print(json.dumps({"endpoint": server.endpoint}), flush=True)
    stop.wait()
    server.stop()


def _until_eof(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()


if __name__ == "__main__":
    main()
