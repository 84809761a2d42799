"""Shared fixtures: the real CIFAR-10 subset, and HTTP servers on 127.0.0.1 (never elsewhere)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import SPEC, SUBSET, Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(base URL, dict path -> body to serve) of a server on 127.0.0.1 for this test."""
    monkeypatch.setenv("no_proxy", "*")  # never send 127.0.0.1 requests to a configured proxy
    monkeypatch.setenv("NO_PROXY", "*")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files = {}
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.files
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def closed_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """A URL on a 127.0.0.1 port that nothing listens on."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


@pytest.fixture(scope="session")
def subset() -> Path:
    if not (SUBSET / SPEC.folder).is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {SUBSET} (set CIFAR10_SUBSET)")
    return SUBSET
