"""The end of a run: where a validation split selected the weights, the test set scored with the
final weights and with the best ones; the summary's words and TensorBoard's HParams metrics."""

from __future__ import annotations

from pathlib import Path

from utils.data.batches import BatchSource
from utils.data.datasets import DataSplits
from utils.runtime import distributed as dist
from utils.training.evaluation import evaluate
from utils.training.learner import Learner
from utils.training.logger import Reporter
from utils.training.precision import Precision
from utils.training.run_files import read_weights


def final_scores(
    learner: Learner,
    data: DataSplits,
    batches: BatchSource,
    ctx: dist.Context,
    precision: Precision,
    reporter: Reporter,
    best_file: Path,
) -> tuple[str, dict[str, float]]:
    """The summary's words and the HParams metrics. Without a test set apart from the one that
    selected the best weights, their score is called what it is: optimistic."""
    metrics = {"best_accuracy": learner.best_acc, "final_accuracy": learner.last_acc}
    kind = "averaged weights" if learner.best_averaged else "weights"
    best = f"best accuracy {learner.best_acc:.4f} at step {learner.best_step}"
    best += " (averaged weights)" if learner.best_averaged else ""
    final = f"final accuracy {learner.last_acc:.4f}"
    if learner.average is not None:
        final += f" (averaged weights {learner.last_averaged_acc:.4f})"
    if data.select_name == "test":
        return (f"{best} (test set, which also selected it, as the reference does: an "
                f"optimistic figure) | {final}"), metrics  # fmt: skip
    if data.test is None:
        return (f"{best} (val set, which also selected it: an optimistic figure; no test "
                f"set) | {final} (val set)"), metrics  # fmt: skip
    score = lambda model: evaluate(model, batches.test(), ctx.device, precision,
                                   len(data.classes))  # fmt: skip
    last = score(learner.model)
    final = f"final accuracy {last.accuracy:.4f} (test set, final weights"
    if learner.average is not None:
        final += f"; their average {score(learner.average.module).accuracy:.4f}"
    # rank 0 wrote the best weights; the other processes, maybe on other disks, get them from it
    best_weights = dist.from_main(lambda: read_weights(best_file)[0], ctx)
    learner.trains.load_whole(learner.model, best_weights)
    best_test = score(learner.model)
    reporter.scalars(
        {"test/accuracy_final": last.accuracy, "test/loss_final": last.loss,
         "test/accuracy_best": best_test.accuracy, "test/loss_best": best_test.loss},
        learner.step,
    )  # fmt: skip
    metrics |= {"test_accuracy_final": last.accuracy, "test_accuracy_best": best_test.accuracy}
    return (
        f"{final}) | best accuracy {best_test.accuracy:.4f} (test set, {kind} of step "
        f"{learner.best_step}, selected on validation accuracy {learner.best_acc:.4f}; the test "
        "set played no part in selection)"
    ), metrics
