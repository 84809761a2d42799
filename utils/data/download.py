"""Download a file over HTTP(S) so that the destination is either complete and verified or absent.

A download that fails halfway (network error, timeout, wrong checksum, Ctrl-C) must never leave a
file at the destination that a later run would mistake for a good one, so the data is streamed into
a temporary file beside the destination and renamed into place only once it is whole.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
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
        super().__init__(
            f"could not download {url} to {self.dest} ({reason}); "
            f"fetch the file by hand and save it as {self.dest}"
        )


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


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    desc: str | None = None,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The body is streamed in 1 MiB chunks into a temporary file beside ``dest`` (see
    :func:`utils.files.atomic_write`), hashed on the way, and renamed into place only
    when it is complete and, if ``md5`` is given, its MD5 matches. On any failure the temporary file
    is removed and :class:`DownloadError` is raised with the cause chained. ``timeout`` bounds
    each blocking network operation (connect, each read), not the whole download.
    """
    dest = Path(dest)

    def fetch(out: BinaryIO) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "vit-cifar"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
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
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(url, dest, f"got {received} of {total} bytes")
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise DownloadError(
                url, dest, f"MD5 mismatch: expected {md5.lower()}, got {digest.hexdigest()}"
            )

    try:
        atomic_write(dest, fetch)
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        # OSError covers URLError, HTTPError and socket timeouts; ValueError a malformed URL.
        raise DownloadError(url, dest, _reason(err, timeout)) from err
    return dest
