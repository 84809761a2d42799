"""Between log steps, train.py's step loop never waits for the device.

A GPU runs ahead of the host only while the host asks it for nothing: every ``.item()``,
``.tolist()``, ``.cpu()``, ``bool(tensor)``, data-dependent shape (``nonzero``) or blocking copy
of a host value to the device stalls the queue until the device catches up. Here the loop runs
on the CPU with a torch-function mode that records each such call made while a batch is made or
an optimizer step is taken; the log, evaluation and checkpoint steps read values by design and
are left out.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import train
from tests.test_train import SMALL
from utils.data.batches import BatchSource
from utils.training import update

Tensor = torch.Tensor
READS = {
    Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__,
    Tensor.__float__, Tensor.__index__, Tensor.__format__, Tensor.nonzero, torch.nonzero,
    Tensor.unique, torch.unique, torch.masked_select, Tensor.masked_select,
    torch.cuda.synchronize,
}  # fmt: skip
COPIES = {Tensor.to, Tensor.cuda, Tensor.copy_}


class HostWaits(TorchFunctionMode):
    """Records the calls that would make the host wait for the device, with where they were."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._waits(func, args, kwargs):
            self.found.append(f"{func.__name__} at {self._caller()}")
        return func(*args, **kwargs)

    @staticmethod
    def _caller() -> str:
        """The innermost frame in this project's code (torch's own frames skipped)."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and frame.filename != __file__:
                return f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"
        return "?"

    @staticmethod
    def _waits(func, args, kwargs) -> bool:
        if func in READS:
            return True
        if func in (torch.tensor, torch.as_tensor):  # host data to a device: a blocking copy
            return not isinstance(args[0], Tensor) and kwargs.get("device") is not None
        if func in COPIES and not HostWaits._in_torch():
            # A copy of ours that names a device and does not say non_blocking. (torch's own
            # copies, such as clip_grad_norm_'s gathering of per-device norms, stay on the
            # device of one-device runs; on the CPU no copy can be told from a no-op.)
            to_device = func is Tensor.cuda or "device" in kwargs
            to_device |= any(isinstance(a, str | torch.device) for a in args[1:])
            return to_device and not kwargs.get("non_blocking", False)
        return False

    @staticmethod
    def _in_torch() -> bool:
        stack = traceback.extract_stack()[:-3]
        caller = next(f for f in reversed(stack) if f.filename != __file__)
        return "/torch/" in caller.filename


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> HostWaits:
    """Watch train.py's ``one_step``, and ``BatchSource.next_batch`` where batches are made on
    the device. (DataLoader batches are host work by design: a worker process makes them, and
    the main process only queues their copy.) ``one_step`` is patched in train.py itself: the
    promise is of its loop, the learning rate and the meter included, not only of the update."""
    mode = HostWaits()

    def watch(function):
        def watched_call(*args, **kwargs):
            with mode:
                return function(*args, **kwargs)

        return watched_call

    real_init = BatchSource.__init__

    def init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        if self.copies is not None:  # batches made on the device
            self.next_batch = watch(self.next_batch)

    monkeypatch.setattr(BatchSource, "__init__", init)
    monkeypatch.setattr(train, "one_step", watch(train.one_step))
    return mode


def run_train(subset: Path, tmp_path: Path, *extra: str) -> int:
    return train.main(
        [
            "--name", "sync", *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
            "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs"),
            "--train_batch_size", "8", "--log_every", "4", "--eval_batch_size", "512",
            "--device", "cpu", *extra,
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        ["--data_on_device", "on", "--precision", "bf16", "--val_split", "0.1"],
        ["--data_on_device", "on", "--gradient_accumulation_steps", "2", "--hflip"],
        ["--data_on_device", "off", "--num_workers", "1"],
    ],
    ids=["device-data-bf16-val-split", "device-data-accumulation", "workers"],
)
def test_no_host_waits_between_log_steps(
    watched: HostWaits, subset: Path, tmp_path: Path, extra: list[str]
) -> None:
    assert run_train(subset, tmp_path, "--num_steps", "12", "--eval_every", "12", *extra) == 0
    assert not watched.found, "\n".join(sorted(set(watched.found)))


def test_the_watch_sees_a_read(
    watched: HostWaits, subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: a loss read in the step is caught, with its place."""
    real_step = update.train_step

    def reading_step(*args, **kwargs):
        loss, norm = real_step(*args, **kwargs)
        float(loss)  # what a `print(loss.item())` in the loop would cost
        return loss, norm

    monkeypatch.setattr(update, "train_step", reading_step)
    assert run_train(subset, tmp_path, "--num_steps", "2", "--eval_every", "2") == 0
    assert len(watched.found) == 2 and watched.found[0].startswith("__float__ at ")
    watched.found.clear()
    with watched:
        torch.tensor([1, 2], device="cpu")
        torch.ones(2).to("cpu")
        torch.ones(2).to("cpu", non_blocking=True)  # allowed: it does not wait
        torch.as_tensor(torch.ones(2), device="cpu")  # allowed: already a tensor
    assert [f.split(" at ")[0] for f in watched.found] == ["tensor", "to"]
