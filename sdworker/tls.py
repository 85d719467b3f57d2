"""TLS for the worker's httpx clients: one verifying context, built once, and none at all for a
client that only ever speaks plain HTTP.

A context that verifies certificates holds its own parsed copy of the CA bundle (most of a
megabyte, docs/performance.md), and httpx builds one for every client it is not handed one.
The Web UI beside the worker and the instance metadata service are plain HTTP; image inputs may
be https.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def verifying_context() -> ssl.SSLContext:
    """httpx's default context (certifi's CA bundle; SSL_CERT_FILE/DIR are ignored, as by a client
    with `trust_env=False`), built on first use and shared by every client after it."""
    return httpx.create_ssl_context(trust_env=False)


def verify_for(base_url: str | httpx.URL) -> ssl.SSLContext | bool:
    """`verify=` for an httpx client whose requests all go below `base_url` and follow no
    redirects: the shared verifying context for https, nothing to load for plain http."""
    if httpx.URL(base_url).scheme == "http":
        return False  # no TLS is spoken, so there is no certificate to check
    return verifying_context()
