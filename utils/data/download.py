"""Download a file over HTTP(S) so that the destination is either complete and verified or absent.

A download that fails halfway (network error, timeout, wrong checksum, Ctrl-C) must never leave a
file at the destination that a later run would mistake for a good one, so the data is streamed into
a temporary file beside the destination and renamed into place only once it is whole.

"Whole" means: as many bytes as the Content-Length; not an HTML page (a proxy's or captive
portal's login, a mirror's error page: these arrive as HTTP 200); the caller's MD5, and the MD5 in
Google Cloud Storage's ``x-goog-hash`` header, where given; and the caller's ``verify`` of the
content (an .npz that ``np.load`` reads, say), the only check that a response cut short without a
Content-Length meets.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from models.errors import UserError
from utils.files import atomic_write

CHUNK_SIZE = 1 << 20  # 1 MiB


class DownloadError(UserError):
    """A download failed; the message says what to fetch by hand and where to put it."""

    def __init__(self, url: str, dest: str | Path, reason: str) -> None:
        self.url = url
        self.dest = Path(dest)
        self.reason = reason
        where = self.dest.absolute()
        super().__init__(
            f"could not download {url} to {where} ({reason}); "
            f"fetch the file by hand and save it as {where}"
        )


class ChecksumError(DownloadError):
    """The file arrived whole, but its MD5 is not the one the caller declared."""

    def __init__(self, url: str, dest: str | Path, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(url, dest, f"MD5 mismatch: expected {expected}, got {actual}")


_HTML_TYPES = ("text/html", "application/xhtml+xml")
_HTML_STARTS = (b"<!doctype html", b"<html")


def _html_page(content_type: str = "", head: bytes = b"") -> str | None:
    """How a response shows itself to be an HTML page, by its Content-Type or its first bytes;
    None when it does not. No data file we download is one."""
    media = content_type.split(";")[0].strip().lower()
    if media in _HTML_TYPES:
        return f"an HTML page ({media})"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_STARTS):
        return f"an HTML page (starting {head[:15]!r})"
    return None


def _html_reason(page: str) -> str:
    return f"the server sent {page}, not the file: a proxy's or portal's login, or an error page"


def _served_md5(headers: http.client.HTTPMessage) -> str | None:
    """The base64 MD5 of the file in Google Cloud Storage's ``x-goog-hash`` header, if any.

    GCS sends ``x-goog-hash: crc32c=<base64>,md5=<base64>``, or the two as separate headers;
    composite objects have no md5, and an object stored gzip-compressed but served decompressed
    is hashed as stored, so it is not compared then. The crc32c is not checked: the standard
    library has no CRC-32C, and the MD5 covers the same bytes.
    """
    if headers.get("x-goog-stored-content-encoding", "identity") != "identity":
        return None
    for header in headers.get_all("x-goog-hash") or []:
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name == "md5":
                return value
    return None


def _reason(err: BaseException, timeout: float) -> str:
    """A short human description of why a download failed."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(err, urllib.error.URLError):
        if isinstance(err.reason, TimeoutError):
            return f"timed out after {timeout:g} s"
        return str(err.reason)
    if isinstance(err, http.client.IncompleteRead):
        return f"connection closed after {len(err.partial)} bytes"
    return str(err) or type(err).__name__


def unreachable(url: str, timeout: float = 15) -> str | None:
    """Why ``url`` cannot be downloaded now, in a failed download's words, or None. Only the
    response's headers are read: a start asks this for every input it lacks before anything slow,
    so that all of them are named at once."""
    request = urllib.request.Request(url, headers={"User-Agent": "vit-cifar"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            page = _html_page(content_type=response.headers.get("Content-Type", ""))
            return _html_reason(page) if page else None
    except (OSError, http.client.HTTPException, ValueError) as err:
        return _reason(err, timeout)


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    desc: str | None = None,
    timeout: float = 60,
    verify: Callable[[BinaryIO], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The body is streamed in 1 MiB chunks into a temporary file beside ``dest`` (see
    :func:`utils.files.atomic_write`), hashed on the way, and renamed into place only when it is
    complete (see the module docstring) and, if ``md5`` is given, its MD5 matches. ``verify`` is
    called with the complete temporary file open for reading and raises ``ValueError`` saying what
    the file is instead when it is not what the caller expects. On any failure the temporary file
    is removed and :class:`DownloadError` (:class:`ChecksumError` for a wrong ``md5``) is raised
    with the cause chained. ``timeout`` bounds each blocking network operation (connect, each
    read), not the whole download.
    """
    dest = Path(dest)

    def fetch(out: BinaryIO) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "vit-cifar"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers = response.headers
            if page := _html_page(content_type=headers.get("Content-Type", "")):
                raise DownloadError(url, dest, _html_reason(page))
            length = headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest = hashlib.md5(usedforsecurity=False)
            received = 0
            with tqdm(
                total=total,
                desc=desc or dest.name,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=None,  # quiet when stderr is not a terminal (logs, CI)
            ) as bar:
                while chunk := response.read(CHUNK_SIZE):
                    if not received and (page := _html_page(head=chunk)):
                        raise DownloadError(url, dest, _html_reason(page))
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(
                url,
                dest,
                f"a file cut short: {received} of {total} bytes, then the connection closed",
            )
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise ChecksumError(url, dest, md5.lower(), digest.hexdigest())
        served, got = _served_md5(headers), base64.b64encode(digest.digest()).decode()
        if served is not None and served != got:
            says = f"it says md5={served}, the {received} bytes that arrived have md5={got}"
            raise DownloadError(url, dest, f"MD5 mismatch with the server's x-goog-hash: {says}")
        if verify is None:
            return
        out.flush()
        try:  # the temporary file's descriptor is read-write (mkstemp): read it back through it
            with open(out.fileno(), "rb", closefd=False) as written:
                written.seek(0)
                verify(written)
        except ValueError as err:
            reason = f"what arrived is {err}"
            if total is None and served is None:  # nothing said how much was to come
                reason += (
                    f"; perhaps a file cut short: {received} bytes, then the connection closed"
                )
            raise DownloadError(url, dest, reason) from err

    try:
        atomic_write(dest, fetch)
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        # OSError covers URLError, HTTPError and socket timeouts; ValueError a malformed URL.
        raise DownloadError(url, dest, _reason(err, timeout)) from err
    return dest
