"""Loading one image the contract's way: first frame, EXIF orientation, 16-bit scaled, transparency on white, RGB."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from llavanext_cli.errors import InputError

_PILLOW_DIR = Path(PIL.__file__).resolve().parent

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey spans 0..65535: scale to 0..255 (value / 257) instead of clipping everything to white.
        image = image.point(lambda value: value / 257).convert("L")
    has_transparency = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_transparency:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def image_from_bytes(data: bytes, name: str) -> Image.Image:
    """Decode image bytes; any failure is an InputError (its message leaves the input's name to the record)."""
    if not data:
        raise InputError("empty file")
    return _open(io.BytesIO(data), name)


def why_unreadable(error: OSError) -> str:
    """What the operating system said, as an error record says it: "no such file", "too many levels of symbolic
    links", "file name too long", "input/output error", ..."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    text = error.strerror or type(error).__name__
    return text[:1].lower() + text[1:]


def load_image(path: str | Path, draft_edge: int | None = None) -> Image.Image:
    """Open a local image file and return it as RGB. With `draft_edge`, a JPEG much larger than that is decoded
    at a reduced scale (both sides still at least `draft_edge`): faster, with pixels slightly different from a
    full decode followed by a resize. Whatever the operating system refuses (a missing file, a directory, a loop of
    links, a name too long, an I/O error) is an InputError for this input."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError("is a directory")
        if path.stat().st_size == 0:
            raise InputError("empty file")
        with open(path, "rb") as handle:
            return _open(handle, str(path), draft_edge)
    except OSError as exc:
        raise InputError(why_unreadable(exc)) from exc


def _open(handle: io.IOBase, name: str, draft_edge: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it announces.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                if draft_edge and image.format == "JPEG" and min(image.size) >= 2 * draft_edge:
                    image.draft(image.mode if image.mode in ("RGB", "L") else "RGB", (draft_edge, draft_edge))
                image.load()
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError("not an image (or a format Pillow cannot read)") from exc
    except Exception as exc:
        # Pillow's readers fail on hostile bytes in many ways (OSError, SyntaxError, struct.error, IndexError,
        # KeyError, TypeError, ... raised while decoding a frame or seeking to the first one): whatever Pillow
        # raises, this input cannot be used. An exception raised by the tool's own code is a bug, and stays one.
        if not _raised_inside_pillow(exc):
            raise
        raise InputError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def _raised_inside_pillow(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return False
    return Path(traceback.tb_frame.f_code.co_filename).resolve().is_relative_to(_PILLOW_DIR)


DEFAULT_URL_TIMEOUT = 30.0
DEFAULT_URL_MAX_BYTES = 50 * 1024 * 1024


def fetch_url(url: str, timeout: float = DEFAULT_URL_TIMEOUT, max_bytes: int = DEFAULT_URL_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, at most `max_bytes`, within `timeout` seconds a read."""
    import socket
    import urllib.error
    import urllib.request

    if not url.lower().startswith(("http://", "https://")):
        raise InputError("only http:// and https:// URLs are supported")
    request = urllib.request.Request(url, headers={"User-Agent": "llava-cli"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"URL body too large ({int(length):,} bytes, limit {max_bytes:,})")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"URL failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise InputError(f"URL timed out after {timeout:g} s") from exc
        raise InputError(f"URL failed: {reason}") from exc
    except (socket.timeout, TimeoutError) as exc:
        raise InputError(f"URL timed out after {timeout:g} s") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"URL failed: {exc}") from exc
    if len(data) > max_bytes:
        raise InputError(f"URL body too large (over the limit of {max_bytes:,} bytes)")
    return data


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


OFFLINE_URL = "--offline: a URL is not fetched (download the image first, or drop --offline)"


@dataclass(frozen=True)
class ImageFetching:
    """How inputs are fetched: the limits on an http(s) URL (seconds a read may wait, bytes it may send); with
    `offline` (--offline) a URL is never fetched, and is an error for that input. `in_memory`: images given as objects
    (the Python API's PIL images and bytes, a server's uploads), under the names their records carry."""

    url_timeout: float = DEFAULT_URL_TIMEOUT
    url_max_bytes: int = DEFAULT_URL_MAX_BYTES
    offline: bool = False
    in_memory: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: object) -> ImageFetching:
        return cls(getattr(settings, "url_timeout"), getattr(settings, "url_max_bytes"),
                   bool(getattr(settings, "offline", False)))

    def read_bytes(self, source: str) -> bytes:
        """An input's bytes (a file, a URL, bytes in memory; a PIL image in memory: its pixels), for its digest."""
        if source in self.in_memory:
            given = self.in_memory[source]
            return given.tobytes() if isinstance(given, Image.Image) else bytes(given)
        if is_url(source):
            return self.fetch(source)
        try:
            return Path(source).read_bytes()
        except IsADirectoryError as exc:
            raise InputError("is a directory") from exc
        except OSError as exc:
            raise InputError(why_unreadable(exc)) from exc

    def fetch(self, url: str) -> bytes:
        if self.offline:
            raise InputError(OFFLINE_URL)
        return fetch_url(url, self.url_timeout, self.url_max_bytes)

    def load(self, source: str, draft_edge: int | None = None) -> Image.Image:
        """An input as the user gave it (a path, an http(s) URL, or the name of an image in memory) as an RGB
        image."""
        if source in self.in_memory:
            given = self.in_memory[source]
            if isinstance(given, Image.Image):
                return _to_rgb(given.copy())
            return image_from_bytes(bytes(given), source)
        if is_url(source):
            return image_from_bytes(self.fetch(source), source)
        return load_image(source, draft_edge)


def missing_file(source: str) -> str | None:
    """"no such file" for a local input that is not there (a stat, no read: known before anything loads); None for
    anything else, which the loader judges when it reads it."""
    if is_url(source):
        return None
    try:
        os.stat(source)
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError):
        return None
    return None


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size_without_decoding(source: str) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF rotation applied), read from the header only; None when unknown
    (URLs, unreadable files)."""
    if is_url(source):
        return None
    try:
        with Image.open(source) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            return width, height
    except Exception as exc:  # an unreadable input gets its error record when it is really loaded
        if not _raised_inside_pillow(exc):
            raise
        return None
