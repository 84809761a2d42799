"""Downloads take their final name only once verified: what a proxy, a portal or a connection
cut short sends instead of the file is refused in one line that says what arrived, and a bad file
already in place is named with the command that removes it."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

import train
from models.configs import CONFIGS
from models.modeling import VisionTransformer
from models.npz_io import (
    CheckpointError,
    check_downloaded_npz,
    export_npz_weights,
    npz_problem,
    read_npz,
)
from tests.helpers import PORTAL_PAGE, listing, make_archive, write_cifar10
from utils.cli import run_main
from utils.data import cifar as data_module
from utils.data.cifar import ensure_cifar
from utils.data.download import DownloadError, download_file
from utils.data.errors import DataError

SMALL = ["--model_type", "testing", "--img_size", "32", "--num_workers", "0", "--warmup_steps", "0"]


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_npz() -> bytes:
    """A checkpoint in Google's layout, as export.py writes it, for the testing model."""
    model = VisionTransformer(CONFIGS["testing"], img_size=32, num_classes=10)
    return npz_bytes(**export_npz_weights(model))


def one_line_with(message: str, *parts: str) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("served", ["typed", "untyped"])
def test_an_html_page_is_refused_and_leaves_nothing(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], served: str
) -> None:
    """HTTP 200 with a captive portal's page, said by its Content-Type or only by its first
    bytes: an error naming the HTML page and the URL, nothing at the destination, no temp file."""
    base, files = server
    files["/page.npz"] = PORTAL_PAGE  # sent with no Content-Type at all
    url = f"{base}/portal" if served == "typed" else f"{base}/page.npz"
    dest = tmp_path / "checkpoint" / "ViT-B_16.npz"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest)
    page = "an HTML page (text/html)" if served == "typed" else "an HTML page (starting b'<!DOC"
    one_line_with(str(info.value), page, url, str(dest))
    assert listing(tmp_path) == ["checkpoint"]


def test_a_wrong_x_goog_hash_md5_is_refused(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], good_npz: bytes
) -> None:
    base, files = server
    files["/w.npz"] = good_npz
    dest = tmp_path / "w.npz"
    with pytest.raises(DownloadError) as info:
        download_file(f"{base}/gcs-bad-md5/w.npz", dest)
    one_line_with(str(info.value), "MD5 mismatch with the server's x-goog-hash", f"{base}/gcs-")
    assert listing(tmp_path) == []


def test_a_good_npz_with_a_right_x_goog_hash_is_kept_and_loads(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], good_npz: bytes
) -> None:
    base, files = server
    files["/w.npz"] = good_npz
    dest = tmp_path / "w.npz"
    assert download_file(f"{base}/gcs/w.npz", dest, verify=check_downloaded_npz) == dest
    assert dest.read_bytes() == good_npz and listing(tmp_path) == ["w.npz"]
    VisionTransformer(CONFIGS["testing"], img_size=32, num_classes=10).load_from(read_npz(dest))


def test_a_body_cut_short_without_content_length_is_refused(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], good_npz: bytes
) -> None:
    """No Content-Length, no checksum: only reading the .npz shows that half of it came."""
    base, files = server
    files["/w.npz"] = good_npz
    dest = tmp_path / "w.npz"
    with pytest.raises(DownloadError) as info:
        download_file(f"{base}/cut/w.npz", dest, verify=check_downloaded_npz)
    one_line_with(
        str(info.value),
        "what arrived is a truncated or damaged zip archive",
        f"perhaps a file cut short: {len(good_npz) // 2} bytes, then the connection closed",
    )
    assert listing(tmp_path) == []


def _zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not weights")
    return buffer.getvalue()


def _bad_crc(good: bytes) -> bytes:
    """An .npz whose one array, large enough that reading its first bytes does not reach its
    end, has a byte flipped in the middle: only a read of all of it against its CRC shows it."""
    damaged = bytearray(npz_bytes(**{"embedding/kernel": np.zeros((64, 1024), np.float32)}))
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda good: good[: len(good) // 2], "a truncated or damaged zip archive"),
        (lambda good: good[:100], "a truncated or damaged zip archive"),
        (lambda good: b"\x1f\x8b\x08\x00gzip", r"not a zip archive (starts with b'\x1f\x8b"),
        (lambda good: PORTAL_PAGE, "an HTML page"),
        (lambda good: b"", "an empty file"),
        (lambda good: _zip_of_text(), "a zip archive of other files than arrays (readme.txt)"),
        (lambda good: npz_bytes(a=np.zeros(3)), "an .npz without Google's ViT keys"),
        (lambda good: good[:-1000] + bytes(1000), "a truncated or damaged zip archive"),
        (_bad_crc, "a damaged zip archive (member embedding/kernel.npy fails its CRC check)"),
    ],
    ids=[
        "half",
        "head",
        "gzip",
        "html",
        "empty",
        "zip-of-text",
        "foreign-keys",
        "zeroed-end",
        "bad-crc",
    ],
)
def test_the_download_check_says_what_arrived(good_npz: bytes, make, what: str) -> None:
    assert check_downloaded_npz(io.BytesIO(good_npz)) is None
    with pytest.raises(CheckpointError) as info:
        check_downloaded_npz(io.BytesIO(make(good_npz)))
    one_line_with(str(info.value), what)


def test_an_unreadable_file_that_is_not_official_is_named_with_its_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_npz: bytes
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("mine.npz").write_bytes(good_npz[:1000])
    with pytest.raises(CheckpointError) as info:
        read_npz("mine.npz")
    message = str(info.value)
    one_line_with(message, f"{tmp_path / 'mine.npz'} is not a readable .npz (a truncated")
    assert "replace it" in message and "rm " not in message
    assert npz_problem(Path("mine.npz")) is not None and npz_problem(io.BytesIO(good_npz)) is None


# ---------------------------------------------------------------------------------------------
# train.py: a download of an official file, and an official file already in place


def run_train(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: train.main(argv), "train.py")
    return stopped.value.code, capsys.readouterr().err


@pytest.fixture
def train_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A run in ``tmp_path`` of the testing model on a tiny CIFAR-10 that starts from
    checkpoint/ViT-B_16.npz (an official name: downloaded when missing)."""
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "data", per_batch=4)
    return [
        "--name", "dl", *SMALL, "--pretrained_dir", "checkpoint/ViT-B_16.npz",
        "--data_dir", "data", "--output_dir", "out", "--logdir", "logs",
        "--train_batch_size", "8", "--num_steps", "1",
    ]  # fmt: skip


def test_train_refuses_a_download_cut_short(
    tmp_path: Path,
    server: tuple[str, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    train_args: list[str],
    good_npz: bytes,
) -> None:
    base, files = server
    files["/imagenet21k/ViT-B_16.npz"] = good_npz
    monkeypatch.setenv("VIT_CHECKPOINT_MIRROR", f"{base}/cut")
    code, err = run_train(train_args, capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err
    one_line_with(
        lines[0],
        f"{base}/cut/imagenet21k/ViT-B_16.npz",
        "a truncated or damaged zip archive",
        f"save it as {tmp_path / 'checkpoint' / 'ViT-B_16.npz'}",
    )
    assert listing(tmp_path / "checkpoint") == []


@pytest.mark.parametrize(
    "content, what",
    [
        (PORTAL_PAGE, "(an HTML page)"),
        (b"PK\x03\x04" + b"\0" * 200, "(a truncated or damaged zip archive"),
        (_zip_of_text(), "(a zip archive of other files than arrays (readme.txt))"),
    ],
    ids=["html", "truncated", "zip-of-text"],
)
def test_train_names_a_bad_official_file_with_the_command_to_delete_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    train_args: list[str],
    content: bytes,
    what: str,
) -> None:
    path = tmp_path / "checkpoint" / "ViT-B_16.npz"
    path.parent.mkdir()
    path.write_bytes(content)
    code, err = run_train(train_args, capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err
    one_line_with(
        lines[0],
        f"{path} is not a readable .npz {what}",
        f"delete it (rm {path}) and run again to download it anew",
    )
    assert path.read_bytes() == content  # reported, not deleted behind the user's back


# ---------------------------------------------------------------------------------------------
# CIFAR archives


@pytest.fixture
def cifar_mirror(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> str:
    """A mirror (VIT_CIFAR_MIRROR) that serves an archive of its own, and no VIT_CIFAR_MD5."""
    base, files = server
    make_archive(write_cifar10(tmp_path / "src"), tmp_path / "own.tar.gz")
    files["/cifar-10-python.tar.gz"] = (tmp_path / "own.tar.gz").read_bytes()
    monkeypatch.setenv("VIT_CIFAR_MIRROR", base)
    monkeypatch.delenv("VIT_CIFAR_MD5", raising=False)
    return base


def test_a_mirrors_own_cifar_archive_names_the_md5_variable(
    tmp_path: Path, cifar_mirror: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        ensure_cifar("cifar10", root)
    one_line_with(str(info.value), f"{cifar_mirror}/cifar-10-python.tar.gz", "MD5 mismatch")
    assert "set VIT_CIFAR_MD5 to its MD5" in str(info.value)
    # the same mismatch from the official URL is no mirror's own archive: no such advice
    spec = dataclasses.replace(
        data_module.CIFAR["cifar10"], url=f"{cifar_mirror}/cifar-10-python.tar.gz"
    )
    monkeypatch.setitem(data_module.CIFAR, "cifar10", spec)
    monkeypatch.delenv("VIT_CIFAR_MIRROR")
    with pytest.raises(DataError) as info:
        ensure_cifar("cifar10", root)
    assert "MD5" in str(info.value) and "VIT_CIFAR_MD5" not in str(info.value)
    assert listing(root) == []


def test_an_html_page_from_a_cifar_mirror_is_named(
    tmp_path: Path, cifar_mirror: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIT_CIFAR_MIRROR", f"{cifar_mirror}/portal")
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        ensure_cifar("cifar10", root)
    one_line_with(str(info.value), "an HTML page (text/html)", f"{cifar_mirror}/portal")
    assert listing(root) == []


def test_every_input_that_cannot_be_downloaded_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, closed_url: str
) -> None:
    """A machine without the data and without the checkpoint, and no way to download either:
    one line names both, before the memory estimate or anything else slow."""
    base = closed_url.rsplit("/", 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_CIFAR_MIRROR", base)
    monkeypatch.setenv("VIT_CHECKPOINT_MIRROR", base)
    argv = ["--name", "none", *SMALL, "--pretrained_dir", "checkpoint/ViT-B_16.npz",
            "--data_dir", "data", "--output_dir", "out", "--logdir", "logs",
            "--train_batch_size", "8", "--num_steps", "1"]  # fmt: skip
    code, err = run_train(argv, capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err
    one_line_with(
        lines[0],
        f"CIFAR-10 not found in {tmp_path / 'data' / 'cifar-10-batches-py'}",
        f"the download from {base}/cifar-10-python.tar.gz failed (",
        f"; and could not download {base}/imagenet21k/ViT-B_16.npz",
        "or set VIT_CHECKPOINT_MIRROR to a mirror",
    )
    assert "gradient_accumulation_steps" not in err  # no memory estimate came first
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
