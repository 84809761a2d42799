"""Files the tests make themselves: CIFAR in the official layout, a local HTTP server."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import pickle
import tarfile
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np

from utils.data.cifar import CIFAR

SUBSET = Path(
    os.environ.get(
        "CIFAR10_SUBSET", Path(__file__).resolve().parents[2] / "shared" / "cifar10-subset"
    )
)
SPEC = CIFAR["cifar10"]


# ---------------------------------------------------------------------------------------------
# Synthetic files in the official layout


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar(name: str, root: Path, per_file: int = 4, seed: int = 0) -> Path:
    """Write a tiny CIFAR-10 or CIFAR-100 in the official layout under ``root``; return the
    folder. CIFAR-10's class names are the real ones, CIFAR-100's ``class0`` ... ``class99``."""
    spec = CIFAR[name]
    rng = np.random.default_rng(seed)
    folder = root / spec.folder
    folder.mkdir(parents=True)
    for file in (*spec.train_files, *spec.test_files):
        write_pickle(
            folder / file,
            {
                b"batch_label": file.encode(),
                spec.label_key: rng.integers(0, spec.num_classes, per_file).tolist(),
                b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            },
        )
    names = [f"class{i}".encode() for i in range(spec.num_classes)]
    if name == "cifar10":
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
        names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / spec.meta_file, {spec.names_key: names, b"num_vis": 3072})
    return folder


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0) -> Path:
    return write_cifar("cifar10", root, per_batch, seed)


def make_archive(folder: Path, dest: Path, extra: dict[str, bytes] | None = None) -> str:
    """Pack ``folder`` and ``extra`` raw members as a .tar.gz like the official one; return MD5."""
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return md5_of(dest)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------
# A local HTTP server


PORTAL_PAGE = b"<!DOCTYPE html>\n<html><body>Sign in to use this network</body></html>\n"


class Handler(BaseHTTPRequestHandler):
    """Serves ``self.server.files``; ``/truncated`` promises more bytes than it sends, ``/portal``
    and every path below it is a captive portal's page (HTTP 200, text/html). Prefixes change how
    a file is sent: ``/cut/<path>`` sends its first half without a Content-Length and closes the
    connection, ``/gcs/<path>`` adds Google Cloud Storage's ``x-goog-hash`` header and
    ``/gcs-bad-md5/<path>`` one whose MD5 is another file's. Their crc32c is never checked, so it
    is made up."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            return
        if self.path == "/portal" or self.path.startswith("/portal/"):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PORTAL_PAGE)))
            self.end_headers()
            self.wfile.write(PORTAL_PAGE)
            return
        mode, _, rest = self.path[1:].partition("/")
        if mode not in ("cut", "gcs", "gcs-bad-md5"):
            mode, rest = "", self.path[1:]
        body = self.server.files.get("/" + rest)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if mode == "cut":  # HTTP/1.0: the end of the body is where the connection closes
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        if mode.startswith("gcs"):
            hashed = body if mode == "gcs" else body + b"other"
            md5 = base64.b64encode(hashlib.md5(hashed, usedforsecurity=False).digest()).decode()
            self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={md5}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # a client may want the headers only: a start asking whether a download would work
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def confusion_matrix(preds, labels, num_classes: int) -> np.ndarray:
    """The oracle: int64 (num_classes, num_classes), [t, p] counts images of class t predicted
    as p, counted one image at a time."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(np.asarray(preds).ravel(), np.asarray(labels).ravel(), strict=True):
        cm[t, p] += 1
    return cm
