"""The worker's httpx clients verify certificates over https and load no CA bundle for http."""

from __future__ import annotations

import ssl

import httpx
import pytest

from sdworker.tls import verify_for, verifying_context


@pytest.mark.parametrize("url", ["https://webui.example:7860", httpx.URL("HTTPS://webui.example")])
def test_https_gets_one_shared_context_that_checks_name_and_chain(url: str | httpx.URL) -> None:
    """Every https client shares one context, and it verifies like httpx's own default."""
    context = verify_for(url)
    assert context is verifying_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 50  # certifi's public CAs, not an empty store


def test_plain_http_loads_no_certificates() -> None:
    """A client of a plain-HTTP Web UI or the instance metadata service speaks no TLS."""
    assert verify_for("http://127.0.0.1:7860") is False
    assert verify_for("http://169.254.169.254") is False
