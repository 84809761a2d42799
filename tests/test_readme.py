"""The command blocks of the README and of docs/, run as written, in reading order, in one folder
laid out like a checkout.

Every ```bash and ```python block of these pages carries a marker on the line above it:
``<!-- readme-test: run ... -->`` or ``<!-- readme-test: skip, <why> -->``. Run blocks execute in
a fresh folder with the scripts linked in, ``../shared/cifar10-subset`` beside it, and every
download served from 127.0.0.1 through the documented mirror variables: a ViT-B_16 ``.npz`` in
Google's layout (ImageNet-21k head and pre-logits included) and a CIFAR-10 archive, both made
here. Only size flags are appended to ``train.py`` commands (steps, batch, image size when the
command gives none, device) and a vanishing learning rate, so that the headline command's saved
model must equal the served checkpoint. Later blocks use what earlier ones wrote, as a reader
following the README would.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models.configs import CONFIGS, apply_overrides
from models.modeling import VisionTransformer
from tests.helpers import Handler, make_archive, write_cifar, write_cifar10
from utils.data.batches import BatchSource
from utils.training import memory

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOCS = ("training.md", "inspect.md", "models.md", "flags.md", "PERFORMANCE.md", "architecture.md")
PAGES = [REPO / "README.md", *(REPO / "docs" / page for page in DOCS)]
LINKED = ("train.py", "evaluate.py", "predict.py", "visualize_attention.py", "export.py",
          "models", "utils", "bench", "requirements.txt", "requirements-dev.txt")  # fmt: skip

# What stands in for `python`, `pip` and their arguments while a bash block runs.
PRELUDE = r"""
set -euo pipefail
python() {
    if [[ "${1:-}" == train.py ]]; then
        local size=(--num_steps 1 --warmup_steps 0 --eval_every 1 --train_batch_size 4
                    --eval_batch_size 256 --learning_rate 1e-9 --device cpu)
        [[ " $* " == *" --img_size "* ]] || size+=(--img_size 16)
        [[ " $* " == *" --resume "* ]] && size+=(--num_steps 3)  # two steps beyond the first run
        command python "$@" "${size[@]}"
    elif [[ "${1:-} ${2:-}" == "-m pytest" ]]; then
        echo "readme-test: the suite is what runs this; not again inside itself"
    else
        command python "$@"
    fi
}
pip() { echo "readme-test: pip $* left to CI, which installs into a fresh venv"; }
"""


@dataclass(frozen=True)
class Block:
    line: str  # page:line
    language: str
    marker: str
    code: str

    @property
    def runs(self) -> bool:
        return self.marker.startswith("run")


def readme_blocks() -> list[Block]:
    """The blocks of the README, then of docs/ in reading order (later ones use what earlier
    ones wrote: the inspection commands the smoke test's model, for instance)."""
    return [block for page in PAGES for block in page_blocks(page)]


def page_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    name = page.relative_to(REPO)
    blocks = []
    for i, line in enumerate(lines):
        fence = re.fullmatch(r"```(bash|python)", line)
        if not fence:
            continue
        end = lines.index("```", i + 1)
        marker = re.fullmatch(r"<!-- readme-test: (.*) -->", lines[i - 1]) if i else None
        blocks.append(
            Block(
                f"{name}:{i + 1}",
                fence[1],
                marker[1] if marker else "",
                "\n".join(lines[i + 1 : end]),
            )  # fmt: skip
        )
    return blocks


BLOCKS = readme_blocks()


def test_every_command_block_says_whether_it_runs() -> None:
    for block in BLOCKS:
        assert re.match(r"run\b|skip, \S", block.marker), (
            f"{block.line}: put <!-- readme-test: run --> or "
            "<!-- readme-test: skip, <why> --> on the line above the block"
        )
    assert sum(b.runs for b in BLOCKS) >= 8
    assert sorted(DOCS) == sorted(p.name for p in (REPO / "docs").glob("*.md")), "a page unread"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A local server with the ViT-B_16 checkpoint and the CIFAR-10 archive a fresh machine
    downloads, and the environment that points the scripts at it."""
    made = tmp_path_factory.mktemp("served")
    config = apply_overrides(CONFIGS["ViT-B_16"], ["representation_size=768"])
    torch.manual_seed(7)
    google = VisionTransformer(config, 224, num_classes=21843)
    google.export_npz(str(made / "ViT-B_16.npz"))
    del google
    cifar_md5 = make_archive(
        write_cifar10(made / "c10", per_batch=100), made / "cifar-10-python.tar.gz"
    )
    files = {
        "/vit/imagenet21k/ViT-B_16.npz": (made / "ViT-B_16.npz").read_bytes(),
        "/kriz/cifar-10-python.tar.gz": (made / "cifar-10-python.tar.gz").read_bytes(),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files = files
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(made),
        "no_proxy": "*",
        "NO_PROXY": "*",
        "VIT_CHECKPOINT_MIRROR": f"{base}/vit",
        "VIT_CIFAR_MIRROR": f"{base}/kriz",
        "VIT_CIFAR_MD5": cifar_md5,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    try:
        yield made, env
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def laid_out_like_a_checkout(root: Path, subset: Path) -> Path:
    """``root/vit`` with the scripts linked in, and ``root/shared/cifar10-subset`` beside it."""
    work = root / "vit"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    (root / "shared").mkdir()
    (root / "shared" / "cifar10-subset").symlink_to(subset)
    return work


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, subset: Path, served) -> Path:
    """A folder laid out like a fresh checkout, with ../shared/cifar10-subset beside it."""
    root = tmp_path_factory.mktemp("readme")
    work = laid_out_like_a_checkout(root, subset)
    made, _ = served
    # What "Running offline" expects the user to have fetched by hand.
    make_archive(made / "c10" / "cifar-10-batches-py", work / "cifar-10-python.tar.gz")
    make_archive(write_cifar("cifar100", made / "c100"), work / "cifar-100-python.tar.gz")
    # PATH in "Your own images": two classes of odd-sized images, with a val/ folder.
    flowers = root / "flowers"
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("val", 4)):
        for name in ("daisy", "tulip"):
            (flowers / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(flowers / split / name / f"{k}.png")
    return work


def run_block(block: Block, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = block.code.replace("--data_dir PATH", f"--data_dir {work.parent / 'flowers'}")
    command = (
        ["bash", "-c", PRELUDE + code] if block.language == "bash" else [sys.executable, "-c", code]
    )
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.runs], ids=[b.line for b in BLOCKS if b.runs]
)
def test_readme_block_runs_as_written(block: Block, checkout: Path, served) -> None:
    made, env = served
    result = run_block(block, checkout, env)
    assert result.returncode == 0, (
        f"{block.line} failed:\n{block.code}\n--- stderr\n{result.stderr[-4000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    if "--name cifar10-100_500 --model_type ViT-B_16" in block.code:
        check_the_headline_run(checkout, made, result)


def check_the_headline_run(work: Path, made: Path, result: subprocess.CompletedProcess) -> None:
    """Without --pretrained_dir the main command fetched checkpoint/ViT-B_16.npz, said so, and
    fine-tuned from it: with a vanishing learning rate the saved weights are the served ones."""
    start = "fine-tuning from checkpoint/ViT-B_16.npz (ImageNet-21k, paper release)"
    assert (work / "checkpoint" / "ViT-B_16.npz").read_bytes() == (
        made / "ViT-B_16.npz"
    ).read_bytes()
    log = result.stderr.splitlines()
    assert start in "\n".join(log[:3]), result.stderr[:2000]
    summary = [line for line in result.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1 and summary[0].endswith(start), result.stdout

    expected = VisionTransformer(CONFIGS["ViT-B_16"], 16, zero_head=True, num_classes=10)
    expected.load_from(np.load(made / "ViT-B_16.npz"))
    saved = torch.load(work / "output" / "cifar10-100_500_checkpoint.bin", weights_only=True)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=0, msg=key)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for events in (work / "logs" / "cifar10-100_500").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("args"):
                texts += [t.tensor_proto.string_val[0].decode() for t in acc.Tensors(tag)]
    assert len(texts) == 1 and start in texts[0], texts


# ---------------------------------------------------------------------------------------------
# The headline command at its real size

HEADLINE = "python train.py --name cifar10-100_500 --model_type ViT-B_16"


def headline_argv() -> list[str]:
    """The README's main command as typed there: the words after ``python train.py``."""
    block = next(b for b in BLOCKS if b.runs and HEADLINE in b.code)
    line = next(line for line in block.code.splitlines() if HEADLINE in line)
    return shlex.split(line[line.index(HEADLINE) :].split("&&")[0])[2:]


# What trial steps find on such a card, from the H200 table of docs/PERFORMANCE.md: the largest
# bf16 micro-batch of ViT-B/16 at 224 px is 368 at 24 GB and 1312 at 80 GB; fp32 saves 1.82x as
# many bytes per image (143.3 against 78.7 MiB), so about 200 and 720 fit: 512 images make 4
# micro-batches of 128 on a 24 GB card and one of 512 on an 80 GB card (and on a 141 GB one).
@pytest.mark.parametrize(("free_gib", "micro_batches"), [(24, 4), (80, 1)], ids=["24GB", "80GB"])
def test_the_headline_command_at_its_real_size_sets_up_and_starts(
    free_gib: int, micro_batches: int, served, subset: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd,
) -> None:  # fmt: skip
    """The README's command with nothing but ``--device cpu`` appended: ViT-B/16 at 224 px, 512
    images, fp32, the served Google checkpoint downloaded to its default path, with the free
    memory of a 24 GB and of an 80 GB card. Set-up passes, picks what that card's user gets, and
    the first step begins (its batch is made); SIGTERM then stops the run before its first
    micro-batch, which on this CPU would take minutes."""
    made, env = served
    for key in ("VIT_CHECKPOINT_MIRROR", "no_proxy", "NO_PROXY"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-batches-py").symlink_to(subset / "cifar-10-batches-py")
    monkeypatch.setattr(memory, "available_bytes", lambda device: free_gib * 2**30)
    monkeypatch.setattr(memory, "CPU_HEADROOM", (0, 0.0))  # a card's memory, no other processes
    real_batches, begun = BatchSource.training_batches, []

    def first_batch_then_signal(data_path, *args):
        next_batch = real_batches(data_path, *args)

        def made_then_signal():
            batch = next_batch()
            begun.append(tuple(batch[0].shape))
            os.kill(os.getpid(), signal.SIGTERM)  # once the first step has begun: its batch made
            return batch

        return made_then_signal

    monkeypatch.setattr(BatchSource, "training_batches", first_batch_then_signal)
    assert train.main([*headline_argv(), "--device", "cpu"]) == 128 + signal.SIGTERM
    log = capfd.readouterr().err
    assert begun == [(512, 3, 224, 224)]
    micro = 512 // micro_batches
    plural = "es" if micro_batches > 1 else ""
    lines = log.splitlines()
    assert "fine-tuning from checkpoint/ViT-B_16.npz (ImageNet-21k, paper release)" in lines[0]
    assert (
        f"--gradient_accumulation_steps auto: {micro_batches} micro-batch{plural} of {micro} "
        f"images, the fewest that fit in the {free_gib}.0 GiB free, from the memory estimate"
    ) in log
    assert (
        f"ViT-B_16 on cpu: 1 process(es), global batch 512 (512 per process in {micro_batches} "
        f"micro-batch{plural} of {micro}), fp32, 10000 steps"
    ) in log
    assert "stopped by signal before step 1: nothing was trained yet, so nothing was saved" in log
    assert "Traceback" not in log and "may not fit" not in log
    assert (tmp_path / "checkpoint" / "ViT-B_16.npz").stat().st_size == (
        made / "ViT-B_16.npz"
    ).stat().st_size
    assert not list((tmp_path / "output").iterdir())


# ---------------------------------------------------------------------------------------------
# Printed samples: what a page shows a command printing is what that command prints


@dataclass(frozen=True)
class Sample:
    line: str  # page:line
    key: str  # a regular expression that finds the one command of a run block that prints it
    text: str


def page_samples(page: Path) -> list[Sample]:
    """The fenced blocks under ``<!-- readme-sample: KEY -->``: the output of the command that
    the regular expression KEY finds; ``...`` stands for lines left out."""
    lines = page.read_text().splitlines()
    samples = []
    for i, line in enumerate(lines):
        if marker := re.fullmatch(r"<!-- readme-sample: (.*) -->", line):
            assert lines[i + 1] == "```", f"{page.name}:{i + 1}: a ``` block must follow"
            end = lines.index("```", i + 2)
            text = "\n".join(lines[i + 2 : end])
            samples.append(Sample(f"{page.relative_to(REPO)}:{i + 2}", marker[1], text))
    return samples


SAMPLES = [sample for page in PAGES for sample in page_samples(page)]
# What differs from machine to machine; the rest (the accuracies on the subset) does not.
MACHINE_OWN = [(r"wall time [\d.]+ s", "wall time <t> s"), (r"[\d.]+ images/s", "<n> images/s")]


def sampled_command(key: str) -> str:
    """The one command (continuations joined, spaces collapsed) of the pages' run blocks that
    the regular expression ``key`` finds."""
    commands = [
        " ".join(line.split())
        for block in BLOCKS
        if block.runs and block.language == "bash"
        for line in block.code.replace("\\\n", " ").splitlines()
    ]
    found = [c for c in commands if not c.startswith("#") and re.search(key, c)]
    assert len(found) == 1, f"readme-sample: {key!r} names {len(found)} commands: {found}"
    return found[0]


def machine_free(line: str) -> str:
    for pattern, stand_in in MACHINE_OWN:
        line = re.sub(pattern, stand_in, line)
    return line


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> dict[str, str]:
    """Each sampled command run exactly as written, in the pages' order, in a fresh folder laid
    out like a checkout: what it printed (stdout and stderr)."""
    root = tmp_path_factory.mktemp("samples")
    work = laid_out_like_a_checkout(root, subset)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(root)}
    outputs = {}
    for sample in SAMPLES:
        command = sampled_command(sample.key)
        result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        outputs[sample.key] = result.stdout + result.stderr
    return outputs


def test_the_pages_show_printed_samples() -> None:
    assert {sampled_command(s.key).split()[3] for s in SAMPLES} >= {"smoke", "honest"}


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.line for s in SAMPLES])
def test_a_printed_sample_is_what_its_command_prints(sample: Sample, printed) -> None:
    """Every line of the sample (but ``...``) is a line the command printed, numbers included;
    only the wall time and images/s are the machine's own."""
    lines = {machine_free(line) for line in printed[sample.key].splitlines()}
    for line in sample.text.splitlines():
        if line.strip() != "...":
            assert machine_free(line) in lines, f"{sample.line}: not printed: {line}"
