"""What TensorBoard shows of a run, read back by TensorBoard's own code: the HParams tab's columns
and values, and where the results sort among the curves."""

from __future__ import annotations

from pathlib import Path

from tensorboard import context
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
)

from tests.test_train import event_scalars
from utils.training.logger import Reporter


def hparams_tab(logdir: Path) -> tuple[list[str], dict[str, tuple[dict, dict[str, float]]]]:
    """The HParams tab of ``tensorboard --logdir logdir``: its metric columns, and for each run
    its flags and metric values, as TensorBoard's HParams plugin serves them to the page."""
    events = multiplexer.EventMultiplexer().AddRunsFromDirectory(str(logdir))
    events.Reload()
    provider = data_provider.MultiplexerDataProvider(events, str(logdir))
    plugin = backend_context.Context(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=events, data_provider=provider)
    )
    request = context.RequestContext()
    experiment = get_experiment.Handler(request, plugin, "", api_pb2.GetExperimentRequest()).run()
    every_status = list(api_pb2.Status.values())
    groups = list_session_groups.Handler(
        request,
        plugin,
        "",
        api_pb2.ListSessionGroupsRequest(slice_size=100, allowed_statuses=every_status),
    ).run()
    runs = {}
    for group in groups.session_groups:
        (session,) = group.sessions
        flags = {
            name: getattr(value, value.WhichOneof("kind")) for name, value in group.hparams.items()
        }
        runs[session.name] = (flags, {m.name.tag: m.value for m in session.metric_values})
    return [m.name.tag for m in experiment.metric_infos], runs


def tags(logdir: Path, kind: str) -> set[str]:
    """The tags of one kind ("scalars", "images", "tensors"...) in a run's event files."""
    found = set()
    for events in logdir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={kind: 1})
        accumulator.Reload()
        found |= set(accumulator.Tags()[kind])
    return found


def tag_groups_in_order(logdir: Path) -> list[str]:
    """The scalar tag groups of a run top to bottom in TensorBoard's Scalars and Time Series tabs:
    by name, which for names of lower-case letters is Python's string order."""
    return sorted({tag.split("/")[0] for tag in tags(logdir, "scalars")})


def write_run(logdir: Path, results: dict[str, float]) -> None:
    reporter = Reporter(logdir, total_steps=10, start_step=0)
    for step in (5, 10):
        reporter.scalars({"train/loss": 1.0 / step, "val/accuracy": step / 20}, step)
    reporter.hparams({"learning_rate": 0.03, "model_type": "ViT-B_16", "config": []}, results, 10)
    reporter.close()


def test_results_sort_below_the_curves_and_fill_the_hparams_tab(tmp_path: Path) -> None:
    write_run(tmp_path / "plain", {"best_accuracy": 0.5, "final_accuracy": 0.25})
    with_test = {"test_accuracy_final": 0.375, "test_accuracy_best": 0.4375}
    write_run(tmp_path / "split", {"best_accuracy": 0.75, "final_accuracy": 0.5, **with_test})

    columns, runs = hparams_tab(tmp_path)
    assert runs == {
        "plain": (
            {"learning_rate": 0.03, "model_type": "ViT-B_16", "config": "[]"},
            {"verdict/best_accuracy": 0.5, "verdict/final_accuracy": 0.25},
        ),
        "split": (
            {"learning_rate": 0.03, "model_type": "ViT-B_16", "config": "[]"},
            {
                "verdict/best_accuracy": 0.75,
                "verdict/final_accuracy": 0.5,
                "verdict/test_accuracy_final": 0.375,
                "verdict/test_accuracy_best": 0.4375,
            },
        ),
    }
    # Whichever run TensorBoard takes the columns from, a run without a test score included.
    everything = [f"verdict/{name}" for name in ("best_accuracy", "final_accuracy", *with_test)]
    for run in ("plain", "split"):
        assert hparams_tab(tmp_path / run)[0] == everything
    assert columns == everything

    # The results are single points at the last step, in a group below the curves.
    for run, (_, values) in runs.items():
        scalars = event_scalars(tmp_path / run)
        assert {tag: scalars[tag] for tag in values} == {t: [(10, v)] for t, v in values.items()}
        assert tag_groups_in_order(tmp_path / run) == ["train", "val", "verdict"]
