"""Fetch a job's input images from s3://, http(s):// and data: URIs, with a size cap and SSRF guard.

Every http(s) hop (the first request and each redirect, at most `MAX_REDIRECTS`) resolves its host
once, refuses the whole URI if any address is loopback, link-local, private or otherwise not
public (unless allow-listed), then connects to one of exactly those checked addresses: the URL's
host is kept in the Host header and as the TLS server name, so a DNS answer that changes between
the check and the connection (DNS rebinding) is never used. Proxies from the environment are not
used, because a proxy would resolve the host itself.

What is kept, logged or put in an error never carries a URI's query string, fragment or password:
presigned URLs hold their signature there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from sdworker.backend import InputFile
from sdworker.errors import InputRefused, JobError, PermanentError, RetryableError
from sdworker.tls import verifying_context

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from sdworker.settings import Settings

__all__ = ["MAX_REDIRECTS", "InputFetcher", "redact", "sniff_image"]

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_ALLOW_HINT = "allow-list it with SDWORKER_INPUT_ALLOW if it is meant"
_LIMIT = "SDWORKER_MAX_INPUT_BYTES"
_IMAGE_TYPES = "PNG, JPEG, WEBP, GIF, BMP or TIFF"
_SCHEMES = "an s3://, https:// or data: URI"
_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "sdworker"}
_RETRY_STATUSES = frozenset({408, 425, 429})
_S3_RETRY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_KINDS: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    ("unspecified", lambda address: address.is_unspecified),
    ("loopback", lambda address: address.is_loopback),
    ("link-local", lambda address: address.is_link_local),
    ("multicast", lambda address: address.is_multicast),
    ("shared address space (100.64.0.0/10)", lambda address: address in _SHARED),
    ("private", lambda address: address.is_private),
    ("reserved", lambda address: address.is_reserved),
    ("not globally routable", lambda address: not address.is_global),
)

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff_image(data: bytes) -> str | None:
    """The image type the bytes' magic number shows, or None when they are not a known image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "image/bmp"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


def redact(uri: str) -> str:
    """`uri` fit to log and keep: no query string, fragment or password, no data: payload."""
    if uri[:5].lower() == "data:":
        return uri.partition(",")[0][:100] + ",..."
    if uri[:5].lower() == "s3://":
        return uri
    head = uri.partition("?")[0].partition("#")[0]
    scheme, slashes, rest = head.partition("//")
    authority, slash, path = rest.partition("/")
    return scheme + slashes + authority.rpartition("@")[2] + slash + path


class _AddressGuard:
    """Resolves a URL's host and refuses it unless every address is public or allow-listed."""

    def __init__(self, allow: Sequence[str]) -> None:
        self._names: set[str] = set()
        self._networks: list[_Network] = []
        for entry in allow:
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[] "), strict=False))
            except ValueError:
                self._names.add(entry.strip().rstrip(".").lower())

    async def check(self, label: str, url: httpx.URL) -> list[str]:
        """The addresses `url`'s host resolves to, once each of them has passed the guard."""
        addresses = await _resolve(label, url)
        names = {url.host.rstrip("."), url.raw_host.decode("ascii").rstrip(".")}
        if not names.isdisjoint(self._names):
            return addresses
        for address in addresses:
            reason = self._refusal(ipaddress.ip_address(address))
            if reason is not None:
                raise InputRefused(f"{label}: {redact(str(url))} refused: {reason}; {_ALLOW_HINT}")
        return addresses

    def _refusal(self, address: IPAddress) -> str | None:
        """Why `address` must not be fetched from, or None when it may be."""
        inner = _embedded_ipv4(address)
        candidates = [address] if inner is None else [address, inner]
        if any(each in network for each in candidates for network in self._networks):
            return None
        inner_kind = None if inner is None else _kind(inner)
        if inner_kind is not None:
            return f"{address} stands for {inner}, which is {inner_kind}"
        kind = _kind(address)
        return None if kind is None else f"{address} is {kind}"


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 IPv6 address stands for."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def _kind(address: IPAddress) -> str | None:
    """The kind of non-public address `address` is, or None when it is public."""
    return next((kind for kind, test in _KINDS if test(address)), None)


async def _resolve(label: str, url: httpx.URL) -> list[str]:
    """Every address `url`'s host resolves to (a literal IP resolves to itself), in order."""
    host = url.raw_host.decode("ascii")
    if not host:
        raise InputRefused(f"{label}: {redact(str(url))} has no host; give a full URL")
    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        where = f"{label}: {redact(str(url))}: cannot resolve {host} ({error.strerror})"
        if error.errno == socket.EAI_AGAIN:
            raise RetryableError(f"{where}; will retry") from None
        raise InputRefused(f"{where}; check the host name") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise InputRefused(f"{label}: {redact(str(url))}: {host} has no address; check the host")
    return addresses


class InputFetcher:
    """Fetches input URIs into `InputFile`s. Example: `await fetcher.fetch("image", "s3://b/k")`.

    Refusals raise `InputRefused`; failures that may pass later raise `RetryableError`.
    """

    def __init__(
        self,
        s3: S3Client,
        *,
        max_bytes: int,
        allow: Sequence[str] = (),
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self._s3 = s3
        self._max_bytes = max_bytes
        self._guard = _AddressGuard(allow)
        self._owns_http = http is None
        self._client = http
        self._closed = False
        self._timeout_s = timeout_s

    @classmethod
    def from_settings(cls, s3: S3Client, settings: Settings) -> InputFetcher:
        """A fetcher with the size cap and allow-list of `settings`."""
        return cls(s3, max_bytes=settings.max_input_bytes, allow=settings.input_allow)

    async def __aenter__(self) -> InputFetcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this fetcher made it."""
        self._closed = True
        if self._owns_http and self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def _http(self) -> httpx.AsyncClient:
        """The HTTP client, made on the first http(s) input: most jobs' inputs are s3: or data:."""
        if self._client is None:
            if self._closed:
                raise RuntimeError("InputFetcher: used after aclose()")
            self._client = _default_http_client()
        return self._client

    async def fetch_all(self, inputs: Mapping[str, str | None]) -> dict[str, InputFile]:
        """Fetch every input at once (None values are skipped); a refusal outranks a retry."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = {
                    name: group.create_task(self.fetch(name, uri))
                    for name, uri in inputs.items()
                    if uri is not None
                }
        except BaseExceptionGroup as failures:
            raise _most_telling(failures) from None
        return {name: task.result() for name, task in tasks.items()}

    async def fetch(self, name: str, uri: str) -> InputFile:
        """Fetch the input `name` from `uri` and check that it is an image within the cap."""
        label = f"inputs.{name}"
        data, claimed = await self._fetch_bytes(label, uri)
        content_type = sniff_image(data)
        if content_type is None:
            raise InputRefused(
                f"{label}: {redact(uri)} is not an image ({claimed or 'unrecognised content'}); "
                f"give a {_IMAGE_TYPES}"
            )
        return InputFile(data=data, content_type=content_type, source=redact(uri))

    async def _fetch_bytes(self, label: str, uri: str) -> tuple[bytes, str | None]:
        """The bytes behind `uri` and the content type its source claimed."""
        scheme = uri.partition(":")[0].lower() if ":" in uri else ""
        readers: dict[str, Callable[[str, str], Awaitable[tuple[bytes, str | None]]]] = {
            "s3": self._read_s3,
            "http": self._read_http,
            "https": self._read_http,
            "data": self._read_data,
        }
        if scheme not in readers:
            raise InputRefused(_scheme_refusal(label, uri, scheme))
        try:
            async with asyncio.timeout(self._timeout_s):
                return await readers[scheme](label, uri)
        except TimeoutError:
            raise RetryableError(
                f"{label}: {redact(uri)} took over {self._timeout_s:g} s; will retry"
            ) from None

    async def _read_data(self, label: str, uri: str) -> tuple[bytes, str | None]:
        """Decode a `data:[<mediatype>][;base64],<data>` URI."""
        header, comma, payload = uri[5:].partition(",")
        if not comma:
            raise InputRefused(
                f"{label}: {redact(uri)} has no ','; write data:image/png;base64,..."
            )
        data = unquote_to_bytes(payload)
        if header.lower().endswith(";base64"):
            try:
                data = base64.b64decode(b"".join(data.split()), validate=True)
            except binascii.Error:
                raise InputRefused(
                    f"{label}: {redact(uri)} is not valid base64; encode the image again"
                ) from None
        self._check_size(label, uri, len(data))
        return data, header.partition(";")[0] or None

    async def _read_s3(self, label: str, uri: str) -> tuple[bytes, str | None]:
        """Read `s3://bucket/key` (the key taken literally), refusing it when over the cap."""
        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key:
            raise InputRefused(f"{label}: {uri} is not an S3 URI; write s3://bucket/key")
        try:
            response = await self._s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                self._check_size(label, uri, response["ContentLength"])
                data = await self._read_capped(label, uri, body.iter_chunks(_CHUNK))
        except ClientError as error:
            raise _s3_failure(label, uri, error) from error
        except BotoCoreError as error:
            raise RetryableError(
                f"{label}: {uri} could not be read ({error}); will retry"
            ) from error
        return data, response.get("ContentType")

    async def _read_http(self, label: str, uri: str) -> tuple[bytes, str | None]:
        """Read an http(s) URI, mapping transport failures onto refusals and retries."""
        try:
            url = httpx.URL(uri)
        except httpx.InvalidURL:
            raise InputRefused(f"{label}: {redact(uri)} is not a valid URL; fix it") from None
        try:
            return await self._follow(label, url)
        except httpx.TimeoutException:
            raise RetryableError(f"{label}: {redact(uri)} timed out; will retry") from None
        except httpx.TransportError as error:
            reason = _transport_reason(error)
            raise RetryableError(f"{label}: {redact(uri)} failed ({reason}); will retry") from None
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            reason = type(error).__name__
            raise InputRefused(f"{label}: {redact(uri)} could not be read ({reason})") from None

    async def _follow(self, label: str, url: httpx.URL) -> tuple[bytes, str | None]:
        """GET `url`, following up to `MAX_REDIRECTS` redirects, each one through the guard."""
        for _hop in range(MAX_REDIRECTS + 1):
            addresses = await self._guard.check(label, url)
            response = await self._send(url, addresses)
            try:
                if not response.is_redirect:
                    return await self._read_response(label, url, response)
                url = _redirect_target(label, url, response)
            finally:
                await response.aclose()
        raise InputRefused(
            f"{label}: {redact(str(url))} redirects more than {MAX_REDIRECTS} times; "
            "give the final URL"
        )

    async def _send(self, url: httpx.URL, addresses: list[str]) -> httpx.Response:
        """Send the GET to the first checked address that accepts a connection."""
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):
                return await self._send_to(url, address)
        return await self._send_to(url, addresses[-1])

    async def _send_to(self, url: httpx.URL, address: str) -> httpx.Response:
        """Send the GET to `address`, never letting the client follow a redirect on its own."""
        request = self._request(url, address)
        return await self._http.send(request, stream=True, follow_redirects=False)

    def _request(self, url: httpx.URL, address: str) -> httpx.Request:
        """A GET for `url` sent to `address`; Host header and TLS server name stay `url`'s host."""
        extensions: dict[str, object] = {"timeout": self._http.timeout.as_dict()}
        if url.scheme == "https":
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        headers = {**_HEADERS, "Host": url.netloc.decode("ascii")}
        return httpx.Request(
            "GET", url.copy_with(host=address), headers=headers, extensions=extensions
        )

    async def _read_response(
        self, label: str, url: httpx.URL, response: httpx.Response
    ) -> tuple[bytes, str | None]:
        """The body of a final (non-redirect) response, within the cap."""
        where = redact(str(url))
        _check_status(label, where, response.status_code)
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit():
            self._check_size(label, where, int(declared))
        data = await self._read_capped(label, where, response.aiter_bytes(_CHUNK))
        claimed = response.headers.get("Content-Type", "").partition(";")[0].strip()
        return data, claimed or None

    async def _read_capped(self, label: str, where: str, chunks: AsyncIterator[bytes]) -> bytes:
        """Join `chunks`, stopping with a refusal as soon as they pass the cap."""
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if len(data) > self._max_bytes:
                raise InputRefused(self._too_big(label, where, f"more than {self._max_bytes}"))
        return bytes(data)

    def _check_size(self, label: str, where: str, size: int) -> None:
        """Refuse an input whose (declared) size is over the cap."""
        if size > self._max_bytes:
            raise InputRefused(self._too_big(label, where, str(size)))

    def _too_big(self, label: str, where: str, size: str) -> str:
        """The refusal message of an input over the cap."""
        return (
            f"{label}: {redact(where)}: {size} bytes exceeds the {self._max_bytes}-byte limit "
            f"({_LIMIT}); send a smaller image or raise the limit"
        )


def _default_http_client() -> httpx.AsyncClient:
    """The fetcher's own client: no environment proxies, no pooled connections, firm timeouts."""
    # A pooled TLS connection is keyed by address, not host name, and was verified for the host
    # it was opened for; not keeping connections alive binds each request to its own check.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, connect=10.0),
        limits=httpx.Limits(max_keepalive_connections=0),
        trust_env=False,
        verify=verifying_context(),
    )


def _redirect_target(label: str, url: httpx.URL, response: httpx.Response) -> httpx.URL:
    """Where a redirect points, refused unless it is http(s)."""
    target = url.join(response.headers["Location"])
    if target.scheme not in ("http", "https"):
        raise InputRefused(
            f"{label}: {redact(str(url))} redirects to a {target.scheme}: URI; "
            "only http(s) redirects are followed"
        )
    return target


def _check_status(label: str, where: str, status: int) -> None:
    """Pass a 2xx; 5xx, 408, 425 and 429 may pass later; any other status is a refusal."""
    if 200 <= status < 300:
        return
    if status >= 500 or status in _RETRY_STATUSES:
        raise RetryableError(f"{label}: {where} answered HTTP {status}; will retry")
    raise InputRefused(
        f"{label}: {where} answered HTTP {status}; check the URL and that it is readable"
    )


def _s3_failure(label: str, uri: str, error: ClientError) -> JobError:
    """Throttling and 5xx from S3 may pass later; a missing object or a denial will not."""
    details = error.response.get("Error", {})
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    answer = f"S3 answered {details.get('Code') or status} ({details.get('Message', '')})"
    if status >= 500 or status == 429 or details.get("Code") in _S3_RETRY_CODES:
        return RetryableError(f"{label}: {uri}: {answer}; will retry")
    return InputRefused(
        f"{label}: {uri}: {answer}; check the bucket, the key and that the worker may read it"
    )


def _scheme_refusal(label: str, uri: str, scheme: str) -> str:
    """The refusal of a URI whose scheme is not fetched."""
    if not scheme:
        return f"{label}: {redact(uri)!r} is not a URI; use {_SCHEMES}"
    return f"{label}: {redact(uri)} refused: {scheme}: URIs are not fetched; use {_SCHEMES}"


def _most_telling(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report for a group: a permanent one, else any job error, else the first."""
    flat = list(_leaves(failures))
    for wanted in (PermanentError, JobError):
        found = next((error for error in flat if isinstance(error, wanted)), None)
        if found is not None:
            return found
    return flat[0]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a (possibly nested) group, in order."""
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def _transport_reason(error: httpx.TransportError) -> str:
    """The error's kind and what it says: a refused connection, an unverified certificate..."""
    said = str(error).strip()
    kind = type(error).__name__
    return f"{kind}: {said[:200]}" if said else kind
