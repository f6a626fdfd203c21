"""The images a request may carry, and what the server refuses (the weak spots of other servers: an image fetcher
that reaches the cloud's metadata service, follows a redirect to localhost, reads any file, or decodes a bomb).

- `data:` URIs (base64): always, within the request's byte cap;
- `file://` URLs: only with --media-root, and only files under it (links resolved first); a bare path: never;
- `http(s)://` URLs: only with --allow-url-images; the host's addresses are checked before a connection, on every
  redirect (no loopback, private, link-local, multicast, reserved, shared or metadata address, unless a network
  the operator allows with --allow-network), the connection goes to the address checked (no second lookup to
  rebind), and a total deadline and a byte cap apply;
- every image: decodable, and no more pixels than --max-pixels (read from its header, before it is decoded).

A refusal is a `MediaError` with the HTTP status to answer (400, 403 or 413) and the tool's own message.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Addresses an image URL may never reach, whatever resolves to them (beyond what ipaddress calls private).
_SHARED = ipaddress.ip_network("100.64.0.0/10")          # carrier-grade NAT
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
MAX_REDIRECTS = 5


class MediaError(Exception):
    """An image a request cannot use: the status to answer and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class MediaPolicy:
    """What the server lets a request's images be (see the module's docstring)."""

    media_root: Path | None = None
    allow_urls: bool = False
    allowed_networks: tuple[Any, ...] = ()
    max_pixels: int = 40_000_000
    url_timeout: float = 10.0
    url_max_bytes: int = 20 * 1024 * 1024
    resolve: Any = field(default=None, compare=False)  # the name resolver (socket.getaddrinfo), replaceable in tests

    def image_bytes(self, url: str) -> bytes:
        """The bytes of the image a request names by `url` (an OpenAI image_url, or a native route's "url")."""
        if not isinstance(url, str) or not url:
            raise MediaError(400, "an image URL must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = data_uri_bytes(url)
        elif scheme == "file":
            data = self._file(url)
        elif scheme in ("http", "https"):
            data = self._fetch(url)
        else:
            raise MediaError(400, "an image must be a data: URI (or, where the server allows them, a file:// URL "
                                  "under its media root or an http(s) URL); a bare path is never read")
        self.check_image(data)
        return data

    def check_image(self, data: bytes) -> None:
        """The image decodes as one (its header at least), with no more pixels than allowed."""
        import warnings

        from PIL import Image

        if not data:
            raise MediaError(400, "an image is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(_bytes_io(data)) as image:
                    width, height = image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise MediaError(413, f"an image has more pixels than the server's limit of {self.max_pixels:,}") from None
        except Exception:  # anything Pillow refuses: not an image it can read
            raise MediaError(400, "an image is not one Pillow can read") from None
        if width * height > self.max_pixels:
            raise MediaError(413, f"an image has {width}x{height} pixels, more than the server's limit of "
                                  f"{self.max_pixels:,}")

    # -- file:// -----------------------------------------------------------------------------------------------------
    def _file(self, url: str) -> bytes:
        if self.media_root is None:
            raise MediaError(403, "file:// images are refused: the server has no --media-root")
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(403, "file:// images must be on this machine")
        path = Path(urllib.parse.unquote(parsed.path))
        root = self.media_root.resolve()
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MediaError(400, "a file:// image does not exist") from None
        if not real.is_relative_to(root) or not real.is_file():
            raise MediaError(403, "a file:// image is outside the server's --media-root")
        try:
            return real.read_bytes()
        except OSError:
            raise MediaError(400, "a file:// image cannot be read") from None

    # -- http(s):// -----------------------------------------------------------------------------------------------------
    def _fetch(self, url: str) -> bytes:
        if not self.allow_urls:
            raise MediaError(403, "http(s) image URLs are refused: the server was not started with "
                                  "--allow-url-images (send the image as a data: URI)")
        deadline = time.monotonic() + self.url_timeout
        for _ in range(MAX_REDIRECTS + 1):
            status, headers, body = self._one_hop(url, deadline)
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise MediaError(400, "an image URL redirected nowhere")
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                    raise MediaError(403, "an image URL redirected to a scheme that is not http(s)")
                continue
            if status != 200:
                raise MediaError(400, f"an image URL answered HTTP {status}")
            return body
        raise MediaError(400, f"an image URL redirected more than {MAX_REDIRECTS} times")

    def _one_hop(self, url: str, deadline: float) -> tuple[int, dict[str, str], bytes]:
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname
        if not host:
            raise MediaError(400, "an image URL has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        address = self._public_address(host, port)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(400, "an image URL took too long")
        connection: http.client.HTTPConnection
        if parsed.scheme == "https":
            connection = _PinnedHTTPS(host, port, address, timeout=remaining)
        else:
            connection = _PinnedHTTP(host, port, address, timeout=remaining)
        path = parsed.path or "/"
        if parsed.query:
            path += "?" + parsed.query
        try:
            connection.request("GET", path, headers={"Host": parsed.netloc, "User-Agent": "llava-serve"})
            response = connection.getresponse()
            headers = {key.lower(): value for key, value in response.getheaders()}
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.url_max_bytes:
                raise MediaError(413, f"an image URL sends more than {self.url_max_bytes:,} bytes")
            body = b""
            if response.status == 200:
                body = response.read(self.url_max_bytes + 1)
                if len(body) > self.url_max_bytes:
                    raise MediaError(413, f"an image URL sends more than {self.url_max_bytes:,} bytes")
            if time.monotonic() > deadline:
                raise MediaError(400, "an image URL took too long")
            return response.status, headers, body
        except MediaError:
            raise
        except (OSError, http.client.HTTPException):
            raise MediaError(400, "an image URL could not be fetched") from None
        finally:
            connection.close()

    def _public_address(self, host: str, port: int) -> str:
        """An address of `host` that the server may connect to; every address it resolves to must be one (a name
        with one forbidden address is refused whole: which one a connection gets is not ours to choose)."""
        resolve = self.resolve or socket.getaddrinfo
        try:
            infos = resolve(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise MediaError(400, "an image URL's host does not resolve") from None
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise MediaError(400, "an image URL's host does not resolve")
        for text in addresses:
            if not self._allowed(ipaddress.ip_address(text.split("%", 1)[0])):
                raise MediaError(403, "an image URL points at an address the server does not fetch from "
                                      "(loopback, private, link-local or metadata)")
        return addresses[0]

    def _allowed(self, address: Any) -> bool:
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        if any(address in network for network in self.allowed_networks):
            return True
        return not (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                    or address.is_reserved or address.is_unspecified or address in _METADATA
                    or (address.version == 4 and address in _SHARED))


def data_uri_bytes(url: str) -> bytes:
    """The bytes of a `data:[<type>][;base64],<data>` URI (base64 only: an image is binary)."""
    header, separator, payload = url.partition(",")
    if not separator or not header.lower().endswith(";base64"):
        raise MediaError(400, "an image data: URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(400, "an image data: URI is not valid base64") from None


def parse_networks(texts: list[str]) -> tuple[Any, ...]:
    from llavanext_cli.errors import UsageError

    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise UsageError(f"--allow-network {text!r} is not a network (such as 10.0.0.0/8)") from exc
    return tuple(networks)


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to the address that was checked (the Host header names the host)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to the address that was checked, its certificate checked against the host's name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def media_policy_from(media_root: str | None, allow_urls: bool, networks: list[str], max_pixels: int) -> MediaPolicy:
    return MediaPolicy(Path(media_root).expanduser() if media_root else None, allow_urls, parse_networks(networks),
                       max_pixels)

