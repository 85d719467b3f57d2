"""Input fetching: schemes, the SSRF guard, redirects, the size cap and the image check."""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from sdworker.aws import AwsClients, aws_clients
from sdworker.errors import InputRefused, RetryableError
from sdworker.inputs import MAX_REDIRECTS, InputFetcher
from sdworker.local import LocalAws, LocalResources
from sdworker.settings import Settings

CAP = 4096
SECRET = "X-Amz-Signature=5ecre7&X-Amz-Credential=AKIAEXAMPLE"
HTML = b"<!doctype html><html><body>not an image</body></html>"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
MakeFetcher = Callable[..., InputFetcher]


async def _endless(request: web.Request) -> web.StreamResponse:
    """A chunked body with no length that goes on far past the cap."""
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write(PNG)
        for _ in range(1024):
            await response.write(bytes(8192))
        await response.write_eof()
    return response


# path -> (status, body, content type, Location)
_PAGES: dict[str, tuple[int, bytes, str, str | None]] = {
    "/image.png": (200, PNG, "image/png", None),
    "/page.html": (200, HTML, "text/html", None),
    "/fake.png": (200, HTML, "image/png", None),
    "/huge.png": (200, PNG + bytes(16 * CAP), "image/png", None),
    "/missing": (404, b"no such thing", "text/plain", None),
    "/busy": (503, b"try later", "text/plain", None),
    "/to-image": (302, b"", "text/plain", "/image.png"),
    "/to-metadata": (302, b"", "text/plain", "http://169.254.169.254/latest/meta-data"),
    "/to-file": (302, b"", "text/plain", "file:///etc/passwd"),
    "/loop": (302, b"", "text/plain", "/loop"),
}


async def _named(request: web.Request) -> web.Response:
    """The PNG, only when asked for by the name localhost (the Host header survives pinning)."""
    if not request.host.startswith("localhost:"):
        return web.Response(status=404, text=f"wrong host {request.host}")
    return web.Response(body=PNG, content_type="image/png")


async def _page(request: web.Request) -> web.Response:
    """Answer with the fixed page of the path."""
    status, body, content_type, location = _PAGES[request.path]
    headers = {} if location is None else {"Location": location}
    return web.Response(status=status, body=body, content_type=content_type, headers=headers)


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[str]:
    """A real HTTP server on 127.0.0.1; its base URL."""
    app = web.Application()
    app.add_routes([web.get(path, _page) for path in _PAGES])
    app.add_routes([web.get("/endless.png", _endless), web.get("/named.png", _named)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _self_signed(host: str) -> tuple[bytes, bytes]:
    """A certificate and key (PEM) for `host`, signed by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
async def tls_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    """An HTTPS server on 127.0.0.1 with a certificate for localhost; its URL and trust context."""
    certificate, key = _self_signed("localhost")
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(certificate)
    (folder / "key.pem").write_bytes(key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    app = web.Application()
    app.add_routes([web.get("/named.png", _named)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://localhost:{port}", ssl.create_default_context(cadata=certificate.decode())
    await runner.cleanup()


@pytest.fixture(scope="module")
async def module_clients(moto: LocalAws) -> AsyncIterator[AwsClients]:
    """AWS clients shared by the module's fetchers: opening them is the slow part of a test."""
    async with aws_clients() as opened:
        yield opened


@pytest.fixture
async def make_fetcher(module_clients: AwsClients) -> AsyncIterator[MakeFetcher]:
    """Builds fetchers on the emulator's S3 with a small cap, closing them afterwards."""
    made: list[InputFetcher] = []

    def make(allow: Sequence[str] = (), max_bytes: int = CAP) -> InputFetcher:
        made.append(InputFetcher(module_clients.s3, max_bytes=max_bytes, allow=allow))
        return made[-1]

    yield make
    for fetcher in made:
        await fetcher.aclose()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    yield port


async def test_loopback_server_is_refused_without_allow_list(
    server: str, make_fetcher: MakeFetcher
) -> None:
    """A URL on 127.0.0.1 is refused with a message naming the input and the reason."""
    with pytest.raises(
        InputRefused, match=r"^inputs\.image: .* 127\.0\.0\.1 is loopback; allow-list"
    ):
        await make_fetcher().fetch("image", f"{server}/image.png")


async def test_metadata_service_is_refused(make_fetcher: MakeFetcher) -> None:
    """The instance metadata address is refused as link-local."""
    with pytest.raises(InputRefused) as refused:
        await make_fetcher().fetch("image", "http://169.254.169.254/latest/meta-data")
    assert str(refused.value) == (
        "inputs.image: http://169.254.169.254/latest/meta-data refused: 169.254.169.254 is "
        "link-local; allow-list it with SDWORKER_INPUT_ALLOW if it is meant"
    )


async def test_private_address_is_refused(make_fetcher: MakeFetcher) -> None:
    """An address in 10.0.0.0/8 is refused as private."""
    with pytest.raises(InputRefused, match=r"^inputs\.mask: .*10\.0\.0\.1 is private"):
        await make_fetcher().fetch("mask", "https://10.0.0.1/mask.png")


async def test_ipv6_loopback_is_refused(make_fetcher: MakeFetcher) -> None:
    """The IPv6 loopback literal is refused."""
    with pytest.raises(InputRefused, match=r"^inputs\.image: .*::1 is loopback"):
        await make_fetcher().fetch("image", "http://[::1]:8080/image.png")


async def test_ipv4_mapped_loopback_is_refused(make_fetcher: MakeFetcher) -> None:
    """An IPv4-mapped IPv6 address is judged by the IPv4 address it stands for."""
    with pytest.raises(InputRefused, match=r"stands for 127\.0\.0\.1, which is loopback"):
        await make_fetcher().fetch("image", "http://[::ffff:127.0.0.1]/image.png")


async def test_decimal_loopback_is_refused(make_fetcher: MakeFetcher) -> None:
    """A decimal host that the resolver turns into 127.0.0.1 is refused."""
    with pytest.raises(InputRefused, match=r"127\.0\.0\.1 is loopback"):
        await make_fetcher().fetch("image", "http://2130706433/image.png")


async def test_allow_listed_loopback_fetches_the_image(
    server: str, make_fetcher: MakeFetcher
) -> None:
    """With 127.0.0.1 allow-listed the PNG is fetched, typed by its bytes."""
    fetched = await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/image.png")
    assert (fetched.data, fetched.content_type) == (PNG, "image/png")


async def test_allow_listed_network_fetches_the_image(
    server: str, make_fetcher: MakeFetcher
) -> None:
    """A CIDR network in the allow-list admits the addresses inside it."""
    fetched = await make_fetcher(allow=["127.0.0.0/8"]).fetch("image", f"{server}/image.png")
    assert fetched.data == PNG


async def test_allow_listed_host_name_fetches_the_image(
    server: str, make_fetcher: MakeFetcher
) -> None:
    """An allow-listed host name is fetched whatever it resolves to, sent with its Host header."""
    url = server.replace("127.0.0.1", "LOCALHOST") + "/named.png"
    fetched = await make_fetcher(allow=["localhost"]).fetch("image", url)
    assert fetched.data == PNG


async def test_a_closed_fetcher_says_so_rather_than_opening_a_client_again(
    server: str, make_fetcher: MakeFetcher
) -> None:
    """After `aclose()` an http(s) fetch is a programming error, not a client nobody closes."""
    fetcher = make_fetcher(allow=["127.0.0.1"])
    await fetcher.fetch("image", f"{server}/image.png")
    await fetcher.aclose()
    with pytest.raises(RuntimeError, match=r"used after aclose"):
        await fetcher.fetch("image", f"{server}/image.png")


async def test_https_keeps_the_host_name_for_tls(
    tls_server: tuple[str, ssl.SSLContext], module_clients: AwsClients
) -> None:
    """Over https the pinned address is reached with the URL's name checked by the certificate."""
    url, trust = tls_server
    async with httpx.AsyncClient(verify=trust, trust_env=False) as http:
        fetcher = InputFetcher(module_clients.s3, max_bytes=CAP, allow=["localhost"], http=http)
        fetched = await fetcher.fetch("image", f"{url}/named.png")
    assert fetched.data == PNG


async def test_https_refuses_a_certificate_nobody_vouches_for(
    tls_server: tuple[str, ssl.SSLContext], make_fetcher: MakeFetcher
) -> None:
    """The fetcher's own client verifies certificates against the public CA bundle: a self-signed
    one fails the fetch, and says so."""
    url, _trust = tls_server
    with pytest.raises(RetryableError, match=r"^inputs\.image: .* certificate verify failed"):
        await make_fetcher(allow=["localhost"]).fetch("image", f"{url}/named.png")


async def test_source_drops_the_query_string(server: str, make_fetcher: MakeFetcher) -> None:
    """The recorded source keeps the URL but not its (presigned) query string."""
    fetched = await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/image.png?{SECRET}")
    assert fetched.source == f"{server}/image.png"


async def test_redirect_to_own_path_is_followed(server: str, make_fetcher: MakeFetcher) -> None:
    """A redirect to another path on an allowed host is followed to the image."""
    fetched = await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/to-image")
    assert fetched.data == PNG


async def test_redirect_to_metadata_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """A redirect is checked again: allowing the first host does not admit the metadata service."""
    with pytest.raises(InputRefused, match=r"169\.254\.169\.254 is link-local"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/to-metadata")


async def test_redirect_is_checked_with_a_redirect_following_client(
    server: str, module_clients: AwsClients
) -> None:
    """A client that follows redirects itself still has every hop checked by the guard."""
    async with httpx.AsyncClient(follow_redirects=True) as http:
        fetcher = InputFetcher(module_clients.s3, max_bytes=CAP, allow=["127.0.0.1"], http=http)
        with pytest.raises(InputRefused, match=r"169\.254\.169\.254 is link-local"):
            await fetcher.fetch("image", f"{server}/to-metadata")


async def test_redirect_to_file_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """A redirect to a non-http scheme is refused."""
    with pytest.raises(InputRefused, match=r"redirects to a file: URI"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/to-file")


async def test_redirect_loop_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """More than MAX_REDIRECTS redirects are refused."""
    with pytest.raises(InputRefused, match=rf"redirects more than {MAX_REDIRECTS} times"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/loop")


async def test_declared_length_over_cap_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """A Content-Length over the cap is refused, naming the size, the limit and the setting."""
    size = len(PNG) + 16 * CAP
    with pytest.raises(
        InputRefused,
        match=rf"^inputs\.mask: .*: {size} bytes exceeds the {CAP}-byte limit "
        r"\(SDWORKER_MAX_INPUT_BYTES\)",
    ):
        await make_fetcher(allow=["127.0.0.1"]).fetch("mask", f"{server}/huge.png")


async def test_stream_without_length_is_cut_at_cap(server: str, make_fetcher: MakeFetcher) -> None:
    """A chunked body with no length is refused once it passes the cap."""
    with pytest.raises(InputRefused, match=rf"more than {CAP} bytes exceeds the {CAP}-byte limit"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/endless.png")


async def test_html_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """An HTML page is not an image."""
    with pytest.raises(InputRefused, match=r"page\.html is not an image \(text/html\)"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/page.html")


async def test_html_claiming_to_be_png_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """The bytes decide, not the Content-Type the server claimed."""
    with pytest.raises(InputRefused, match=r"is not an image \(image/png\)"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/fake.png")


async def test_not_found_is_refused(server: str, make_fetcher: MakeFetcher) -> None:
    """A 404 is permanent."""
    with pytest.raises(InputRefused, match=r"answered HTTP 404"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/missing")


async def test_service_unavailable_is_retryable(server: str, make_fetcher: MakeFetcher) -> None:
    """A 503 may pass later."""
    with pytest.raises(RetryableError, match=r"answered HTTP 503"):
        await make_fetcher(allow=["127.0.0.1"]).fetch("image", f"{server}/busy")


async def test_connection_refused_is_retryable(closed_port: int, make_fetcher: MakeFetcher) -> None:
    """A source that does not accept connections may come back."""
    with pytest.raises(RetryableError, match=r"^inputs\.image: .*ConnectError"):
        await make_fetcher(allow=["127.0.0.1"]).fetch(
            "image", f"http://127.0.0.1:{closed_port}/image.png"
        )


@pytest.mark.parametrize(
    ("allow", "path"),
    [
        ((), "/image.png"),
        (("127.0.0.1",), "/missing"),
        (("127.0.0.1",), "/busy"),
        (("127.0.0.1",), "/page.html"),
    ],
)
async def test_query_string_never_appears_in_errors(
    server: str, make_fetcher: MakeFetcher, allow: Sequence[str], path: str
) -> None:
    """A presigned URL's query string is kept out of every error message."""
    with pytest.raises((InputRefused, RetryableError)) as failed:
        await make_fetcher(allow=allow).fetch("image", f"{server}{path}?{SECRET}")
    assert "5ecre7" not in str(failed.value)
    assert "AKIAEXAMPLE" not in str(failed.value)


async def test_data_uri_is_decoded(make_fetcher: MakeFetcher) -> None:
    """A base64 data: URI gives its bytes, typed by sniffing."""
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    fetched = await make_fetcher().fetch("image", uri)
    assert (fetched.data, fetched.content_type) == (PNG, "image/png")


async def test_bad_base64_data_uri_is_refused(make_fetcher: MakeFetcher) -> None:
    """A data: URI whose payload is not base64 is refused."""
    with pytest.raises(InputRefused, match=r"^inputs\.image: data:image/png;base64,\.\.\. is not"):
        await make_fetcher().fetch("image", "data:image/png;base64,not*base64!")


async def test_data_uri_over_cap_is_refused(make_fetcher: MakeFetcher) -> None:
    """The cap applies to decoded data: URIs too."""
    uri = "data:image/png;base64," + base64.b64encode(PNG + bytes(2 * CAP)).decode()
    with pytest.raises(InputRefused, match=rf"exceeds the {CAP}-byte limit"):
        await make_fetcher().fetch("image", uri)


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "ftp://example.com/a.png", "/etc/passwd"])
async def test_other_schemes_are_refused(make_fetcher: MakeFetcher, uri: str) -> None:
    """Only s3://, http(s):// and data: URIs are fetched."""
    with pytest.raises(
        InputRefused, match=r"^inputs\.image: .*use an s3://, https:// or data: URI"
    ):
        await make_fetcher().fetch("image", uri)


async def test_s3_object_is_fetched(
    clients: AwsClients, resources: LocalResources, make_fetcher: MakeFetcher
) -> None:
    """An s3:// input is read from the bucket."""
    await clients.s3.put_object(Bucket=resources.bucket, Key="in/fox.png", Body=PNG)
    uri = f"s3://{resources.bucket}/in/fox.png"
    fetched = await make_fetcher().fetch("image", uri)
    assert (fetched.data, fetched.content_type, fetched.source) == (PNG, "image/png", uri)


async def test_missing_s3_key_is_refused(
    resources: LocalResources, make_fetcher: MakeFetcher
) -> None:
    """A key that does not exist is a permanent refusal."""
    with pytest.raises(InputRefused, match=r"^inputs\.image: s3://.*NoSuchKey"):
        await make_fetcher().fetch("image", f"s3://{resources.bucket}/in/none.png")


async def test_s3_object_over_cap_is_refused(
    clients: AwsClients, resources: LocalResources, make_fetcher: MakeFetcher
) -> None:
    """An S3 object larger than the cap is refused from its length."""
    await clients.s3.put_object(Bucket=resources.bucket, Key="big.png", Body=PNG + bytes(CAP))
    with pytest.raises(InputRefused, match=rf"exceeds the {CAP}-byte limit"):
        await make_fetcher().fetch("image", f"s3://{resources.bucket}/big.png")


async def test_fetch_all_returns_every_input(server: str, make_fetcher: MakeFetcher) -> None:
    """All inputs are fetched together and keyed by name; absent ones are skipped."""
    png_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    fetched = await make_fetcher(allow=["127.0.0.1"]).fetch_all(
        {"image": f"{server}/image.png", "mask": png_uri, "control": None}
    )
    assert {name: item.data for name, item in fetched.items()} == {"image": PNG, "mask": PNG}


async def test_fetch_all_raises_the_refusal(server: str, make_fetcher: MakeFetcher) -> None:
    """One refused input fails the whole set with that refusal, not an exception group."""
    with pytest.raises(InputRefused, match=r"^inputs\.mask: .*not an image"):
        await make_fetcher(allow=["127.0.0.1"]).fetch_all(
            {"image": f"{server}/image.png", "mask": f"{server}/page.html"}
        )


async def test_fetcher_from_settings_uses_allow_list(
    server: str, module_clients: AwsClients
) -> None:
    """`from_settings` takes the cap and allow-list from the settings."""
    settings = Settings(max_input_bytes=CAP, input_allow="127.0.0.1")
    async with InputFetcher.from_settings(module_clients.s3, settings) as fetcher:
        fetched = await fetcher.fetch("image", f"{server}/image.png")
    assert fetched.data == PNG
