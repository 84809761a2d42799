"""The command-line grammar every script shares (utils/cli.py), the --help of every script, and the
recipes: each parses with train.py's parser, passes its checks and says what the README says."""

from __future__ import annotations

import argparse
import multiprocessing
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import bench.throughput
import evaluate
import export
import predict
import train
import visualize_attention
from models.configs import CONFIGS, apply_overrides
from utils.cli import run_main
from utils.training import flags as train_flags

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.args"))
SCRIPTS = {
    "train.py": train_flags,  # train.py's flags live in utils/training/flags.py
    "evaluate.py": evaluate,
    "predict.py": predict,
    "visualize_attention.py": visualize_attention,
    "export.py": export,
    "bench/throughput.py": bench.throughput,
}


def sample_value(action: argparse.Action) -> list[str]:
    """A value the action accepts, as words of a command line (none for a switch)."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    if action.type is int:
        return ["7"]  # no flag's default
    if action.type is float:
        return ["0.25"]
    if action.type not in (None, str):  # a parser of its own, e.g. a count or "auto"
        return ["7"]
    return ["some-value"]


def required_words(parser: argparse.ArgumentParser, leave_out: argparse.Action) -> list[str]:
    """The positionals and required flags the parser needs, all but ``leave_out``."""
    words = []
    for action in parser._actions:
        if action is leave_out:
            continue
        if not action.option_strings:
            words += sample_value(action)
        elif action.required:
            words += [action.option_strings[0], *sample_value(action)]
    return words


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


# ---------------------------------------------------------------------------------------------
# The grammar: hyphens, @FILE, one-line errors


@pytest.mark.parametrize("script", SCRIPTS)
def test_hyphen_and_underscore_spellings_parse_alike(script: str) -> None:
    parser = SCRIPTS[script].build_parser()
    checked = 0
    for action in flag_actions(parser):
        underscored = next((o for o in action.option_strings if "_" in o), None)
        if underscored is None:
            continue
        hyphenated = underscored.replace("_", "-")
        base, value = required_words(parser, action), sample_value(action)
        expected = parser.parse_args([*base, underscored, *value])
        assert getattr(expected, action.dest) != action.default, f"{script} {underscored}"
        assert parser.parse_args([*base, hyphenated, *value]) == expected, f"{script} {hyphenated}"
        if value:
            assert parser.parse_args([*base, f"{hyphenated}={value[0]}"]) == expected
        checked += 1
    assert checked >= 1


def test_values_and_positionals_keep_their_hyphens() -> None:
    args = train_flags.build_parser().parse_args(["--name=--my-run", "--output-dir", "out-put"])
    assert (args.name, args.output_dir) == ("--my-run", "out-put")
    args = predict.build_parser().parse_args(["--checkpoint", "c.bin", "--", "--top-k", "a-b.png"])
    assert args.images == ["--top-k", "a-b.png"] and args.top_k == 5
    # torchrun's spelling, which was a second registered flag before
    assert train_flags.build_parser().parse_args(["--name", "x", "--local-rank=3"]).local_rank == 3


def test_a_misspelled_hyphen_flag_is_reported_as_typed(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        train_flags.build_parser().parse_args(["--name", "x", "--num-stepz", "5"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --num-stepz 5" in capsys.readouterr().err


def test_flags_after_the_file_override_it_and_before_it_are_overridden(tmp_path: Path) -> None:
    recipe = tmp_path / "r.args"
    recipe.write_text(
        "# a comment line, then a blank one\n"
        "\n"
        "--num_steps 500 --warmup-steps 50     # several to a line, and a trailing comment\n"
        "--learning_rate=0.01\n"
        "--logdir 'logs #2'                    # quotes keep the space and the #\n"
        "--output_dir run#2\n"
        "--config transformer.dropout_rate=0.0\n"
    )
    parser = train_flags.build_parser()
    args = parser.parse_args(["--learning_rate", "0.5", f"@{recipe}", "--name", "r"])
    assert (args.num_steps, args.warmup_steps, args.learning_rate) == (500, 50, 0.01)
    assert (args.logdir, args.output_dir) == ("logs #2", "run#2")
    train_flags.check_args(args)

    args = parser.parse_args(
        [f"@{recipe}", "--name", "r", "--num-steps", "20", "--warmup_steps", "2",
         "--config", "transformer.dropout_rate=0.1"]
    )  # fmt: skip
    assert (args.num_steps, args.warmup_steps, args.learning_rate) == (20, 2, 0.01)
    # --config adds to the file's overrides; the later value of a key is the one applied
    assert apply_overrides(CONFIGS["ViT-B_16"], args.config).transformer.dropout_rate == 0.1


@pytest.mark.parametrize("where", ["command line", "inside a flag file", "a folder"])
def test_a_missing_flag_file_is_one_line_and_exit_code_2(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "recipes" / "no-such.args"
    if where == "inside a flag file":
        outer = tmp_path / "outer.args"
        outer.write_text(f"--num_steps 5\n@{missing}\n")
        argv = [f"@{outer}", "--name", "x"]
    elif where == "a folder":
        missing = tmp_path
        argv = [f"@{tmp_path}", "--name", "x"]
    else:
        argv = ["--name", "x", f"@{missing}"]
    with pytest.raises(SystemExit) as stop:
        train_flags.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and err.startswith(train_flags.build_parser().prog + ": error: ")
    assert str(missing) in err and "Errno" not in err


@pytest.fixture
def sigint_handler():
    """run_main makes a Ctrl-C after an interrupt end the process at once, and lets worker
    processes end unwatched: not in pytest's process, after the test."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGCHLD)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run_main_code(main) -> int:
    try:
        run_main(main, "x.py")
    except SystemExit as stop:
        return stop.code
    except KeyboardInterrupt:
        pytest.fail("run_main let the Ctrl-C through")
    pytest.fail("run_main did not exit")


def test_ctrl_c_in_a_finaliser_is_one_line_and_exit_code_130(capsys, sigint_handler) -> None:
    """Python prints a KeyboardInterrupt raised in a __del__ as "Exception ignored" and goes
    on (a DataLoader shutting its workers down); run_main reports it as an interruption."""

    class Finalised:
        def __del__(self) -> None:
            raise KeyboardInterrupt("what was saved")

    def main() -> int:
        Finalised()
        return 0

    assert run_main_code(main) == 130
    assert capsys.readouterr().err == "x.py: interrupted: what was saved\n"


def test_an_interrupt_kills_the_workers_a_cut_short_shutdown_leaves(capsys, sigint_handler) -> None:
    """Our workers ignore SIGTERM, so multiprocessing's exit (terminate, then join) would wait
    for them forever when a Ctrl-C cut the DataLoader's own shutdown short."""
    from torch.utils.data import DataLoader

    from utils.runtime.signals import ignore_stop_signals

    kept = []

    def main() -> int:
        loader = DataLoader(
            range(64), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals
        )
        kept.append(iter(loader))
        next(kept[0])  # workers running; the iterator is never shut down
        raise KeyboardInterrupt

    assert run_main_code(main) == 130
    assert capsys.readouterr().err == "x.py: interrupted\n"
    assert not multiprocessing.active_children()
    kept.clear()


# ---------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_one_spelling_per_flag_each_explained_with_its_default(script: str) -> None:
    parser = SCRIPTS[script].build_parser()
    text = parser.format_help()  # what --help prints
    assert "``" not in text, "reStructuredText markup in --help"
    shown = re.findall(r"(?m)^  (-.*?)(?:  |$)", text)  # the option column
    spellings: dict[str, set[str]] = {}
    for entry in shown:
        for flag in re.findall(r"--[\w-]+", entry):
            spellings.setdefault("--" + flag[2:].replace("-", "_"), set()).add(flag)
    assert len(spellings) > 3
    assert [s for s in spellings.values() if len(s) > 1] == [], "two spellings of a flag"

    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: no help text"
        if isinstance(action, argparse._HelpAction) or action.nargs == 0 or action.required:
            continue
        if not action.option_strings:
            continue
        stated = re.search(r"\S.*\(default: (.+)\)$", action.help, re.DOTALL)
        assert stated, f"{name}: help should end with (default: ...): {action.help!r}"
        default = action.default
        if default is None or isinstance(default, list):
            continue  # described in words: the checkpoint's, none, cuda when available
        try:
            value = (action.type or str)(stated[1])
        except ValueError:
            continue  # a default that depends on the machine, e.g. min(4, CPU count)
        assert value == default, f"{name}: help says {stated[1]!r}, the default is {default!r}"


@pytest.mark.parametrize("script", ["train.py", "bench/throughput.py"])  # the two with a note
def test_help_leaves_out_the_docstrings_note_to_developers(script: str) -> None:
    text = " ".join(SCRIPTS[script].build_parser().format_help().split())
    script_doc = {"train.py": train, "bench/throughput.py": bench.throughput}[script].__doc__
    for paragraph in script_doc.split("\n\n")[:2]:  # the summary and the commands stay
        assert " ".join(paragraph.split()) in text
    for note in ("The story of a run", "One file ("):
        assert note not in text


def test_help_on_the_command_line_is_the_same_text() -> None:
    done = subprocess.run(
        [sys.executable, "export.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ""
    assert "``" not in done.stdout and "--img_size" in done.stdout
    assert "--flag-name" in done.stdout  # the grammar, in the epilog


# ---------------------------------------------------------------------------------------------
# Recipes


def recipe_header(path: Path) -> dict[str, str]:
    """The ``# Key: value`` lines of a recipe's opening comment, continuation lines joined."""
    header, key = {}, None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if match := re.match(r"# ([A-Z][\w ]+?): (.*)", line):
            key = match[1]
            header[key] = match[2]
        elif key and line.startswith("#   "):
            header[key] += " " + line[4:]
    return header


def readme_recipes() -> dict[str, list[str]]:
    """Recipe name -> the other cells of its row in the README's Recipes table."""
    section = (REPO / "README.md").read_text().split("\n## Recipes\n")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        if match := re.match(r"\| \[`([\w-]+)`\]\(recipes/\1\.args\) \|(.*)\|$", line):
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def test_there_are_recipes_and_the_readme_lists_each_once() -> None:
    assert len(RECIPES) >= 5
    assert sorted(readme_recipes()) == sorted(path.stem for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_parses_passes_train_checks_and_states_its_numbers(path: Path) -> None:
    words = [w for line in path.read_text().splitlines() for w in line.split("#")[0].split()]
    assert "--name" not in words, "the run's name is the user's"
    args = train_flags.build_parser().parse_args([f"@{path}", "--name", "run"])
    train_flags.check_args(args)  # the checks train.py makes before anything else

    header = recipe_header(path)
    assert {"Source", "Published accuracy", "Expected time on one H100"} <= set(header)
    assert args.dataset in path.stem.split("-")
    accuracy, batch, steps, resolution = readme_recipes()[path.stem]
    published = re.match(r"[\d.]+ %", header["Published accuracy"])
    assert published and accuracy.startswith(published[0]), (accuracy, header)
    assert int(batch) == args.train_batch_size  # one process: the global batch
    assert int(steps.replace(",", "")) == args.num_steps
    assert resolution == f"{args.img_size} px"


def test_a_flag_typed_after_a_recipe_overrides_it() -> None:
    path = REPO / "recipes" / "vit-b16-cifar10-google.args"
    args = train_flags.build_parser().parse_args([f"@{path}", "--name", "run", "--img-size", "224"])
    assert args.img_size == 224 and args.num_steps == 10000


def test_num_epochs_after_a_recipe_overrides_its_num_steps_and_the_later_one_counts() -> None:
    path = REPO / "recipes" / "vit-b16-cifar10-google.args"  # sets --num_steps 10000
    parser = train_flags.build_parser()
    args = parser.parse_args([f"@{path}", "--name", "run", "--num_epochs", "3"])
    train_flags.check_args(args)
    assert (args.num_epochs, args.num_steps) == (3.0, None)  # steps follow from the epochs
    args = parser.parse_args(["--name", "r", "--num-epochs", "3", "--num_steps", "700"])
    train_flags.check_args(args)
    assert (args.num_epochs, args.num_steps) == (None, 700)
    help_text = " ".join(parser.format_help().split())
    assert "the one typed last counts" in help_text


def test_train_flags_are_final_once_parsed_and_derived_values_stand_beside_them() -> None:
    """Nothing changes the parsed namespace (train.main runs on it in every training test);
    --num_epochs in steps and auto's count are recorded beside the flags, as the files show."""
    args = train_flags.parse_flags(["--name", "r", "--num_epochs", "2", "--warmup_steps", "3"])
    assert (args.num_steps, args.num_epochs, args.gradient_accumulation_steps) == (None, 2, "auto")
    with pytest.raises(AttributeError, match="final once parsed; derive num_steps"):
        args.num_steps = 5
    steps = train_flags.total_steps(args, train_images=1000, global_batch=64)
    assert steps == 2 * 1000 // 64 == 31
    recorded = train_flags.as_run_used(args, steps, 4)
    assert (recorded["num_steps"], recorded["gradient_accumulation_steps"]) == (31, 4)
    assert (args.num_steps, args.gradient_accumulation_steps) == (None, "auto")
    assert train_flags.parse_flags(["--name", "r"]).num_steps == train_flags.DEFAULT_STEPS


# ---------------------------------------------------------------------------------------------
# Values no flag takes: refused as the command line is parsed, before anything else happens


def train_refusal(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """train.py's command line in this process, as run_main runs it; its one error line."""
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: train.main(argv), "train.py")
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    # argparse names the program after sys.argv[0], run_main "train.py"
    assert err.count("\n") == 1 and re.match(r"[\w.]+: error: ", err), err
    return err


def finished_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> list[str]:
    """The command line of a finished two-step run on the CIFAR-10 subset."""
    from tests.test_train import SMALL

    root = tmp_path_factory.mktemp("finished")
    argv = ["--name", "done", *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
            "--output_dir", str(root / "out"), "--logdir", str(root / "logs"),
            "--train_batch_size", "16", "--eval_batch_size", "512", "--device", "cpu",
            "--img_size", "16", "--num_steps", "2", "--eval_every", "2"]  # fmt: skip
    assert train.main(argv) == 0
    assert (root / "out" / "done_checkpoint.bin").is_file()
    return argv


@pytest.mark.parametrize(
    "flags",
    [["--learning_rate", "nan"], ["--learning_rate", "inf"], ["--max_grad_norm", "inf"],
     ["--weight_decay", "-inf"], ["--num_epochs", "1e400"], ["--fp16", "--loss_scale", "nan"]],
    ids=" ".join,
)  # fmt: skip
def test_overwrite_with_a_non_finite_flag_deletes_nothing(
    finished_run: list[str], flags: list[str], capsys: pytest.CaptureFixture
) -> None:
    """nan and inf got past every start-up check (``value <= 0`` is False for nan), so
    --overwrite deleted the finished run and then trained to nan (or took --loss_scale nan for
    dynamic scaling): now the flag is refused in one line and the finished files stay."""
    root = Path(finished_run[finished_run.index("--output_dir") + 1]).parent
    before = finished_files(root)
    err = train_refusal([*finished_run, "--overwrite", *flags], capsys)
    assert f"argument {flags[-2]}: {flags[-1]} is not a finite number" in err
    assert finished_files(root) == before


def numeric_flags() -> list[argparse.Action]:
    """train.py's flags whose values are numbers, found from the parser: a flag added later is
    covered without a word here."""

    def numeric(action: argparse.Action) -> bool:
        try:
            return action.nargs != 0 and isinstance((action.type or str)("1"), int | float)
        except (TypeError, ValueError):
            return False

    return [a for a in flag_actions(train_flags.build_parser()) if numeric(a)]


NON_FINITE = ["nan", "inf", "-inf", "1e400", "-1e400"]  # the last two overflow a float
BEYOND_INT64 = [str(10**30), str(-(10**30))]
NUMBER_CASES = [
    (action.option_strings[0], value)
    for action in numeric_flags()
    for value in NON_FINITE
    + (BEYOND_INT64 if isinstance(action.type("1"), int) else [])
    # and negative, where the default is not: a count, a rate, a size
    + ([] if isinstance(action.default, int) and action.default < 0 else ["-1"])
]


def test_the_numeric_flags_are_found() -> None:
    found = {flag for flag, _ in NUMBER_CASES}
    assert {"--learning_rate", "--loss_scale", "--img_size", "--seed", "--local_rank"} <= found
    assert "--gradient_accumulation_steps" in found and "--name" not in found


@pytest.mark.parametrize(("flag", "value"), NUMBER_CASES, ids=lambda v: str(v)[:12])
def test_every_numeric_flag_refuses_values_beyond_its_range_in_one_line(
    flag: str, value: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nan, +-inf, a float overflowing to inf, an integer beyond 64 bits, and a negative count:
    one line naming the flag, exit code 2, before the process joins a group or reads a file."""
    monkeypatch.setattr(train.dist, "setup", lambda *a: pytest.fail(f"{flag} {value} accepted"))
    err = train_refusal(["--name", "x", "--model_type", "testing", "--img_size", "32",
                         flag, value], capsys)  # fmt: skip
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("model_type", "img_size", "largest"),
    [("ViT-B_16", "4096", 1024), ("ViT-B_16", "100000", 1024), ("R50-ViT-B_16", "2048", 1024),
     ("ViT-B_32", "4096", 2048), ("testing", "4096", 256)],
)  # fmt: skip
def test_a_huge_img_size_is_refused_before_the_memory_measurement(
    model_type: str, img_size: str, largest: int, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """4096 px hung for minutes in the start-up memory measurement, 100000 px ended in a 40 GB
    allocation's traceback: more patches than a 64x64 grid are refused with the largest size
    that is not, which passes."""
    monkeypatch.setattr(train.dist, "setup", lambda *a: pytest.fail("went past check_args"))
    err = train_refusal(["--name", "x", "--model_type", model_type, "--img_size", img_size],
                        capsys)  # fmt: skip
    assert f"--img_size {img_size} makes" in err and "64x64 grid" in err
    assert f"Use --img_size {largest} or less" in err
    parser = train_flags.build_parser()
    train_flags.check_args(
        parser.parse_args(["--name", "x", "--model_type", model_type, "--img_size", str(largest)])
    )


@pytest.mark.parametrize("flags", [["--name", ""], ["--name", "x", "--data_dir", ""],
                                   ["--name", "x", "--output_dir="]])  # fmt: skip
def test_an_empty_value_is_refused_naming_its_flag(
    flags: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'' was taken for an @FILE (every string starts with ''), and for a path it means the
    current folder: an unset shell variable, refused by name."""
    monkeypatch.setattr(train.dist, "setup", lambda *a: pytest.fail("went past check_args"))
    err = train_refusal(flags, capsys)
    flag = flags[-2] if flags[-1] == "" else flags[-1].rstrip("=")
    assert f"argument {flag}: empty value" in err and "@" not in err


def test_launchers_flag_without_a_launcher_is_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--local_rank 3 typed by hand ended in torch.distributed's traceback (RANK not set)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    err = train_refusal(["--name", "x", "--model_type", "testing", "--img_size", "32",
                         "--local_rank", "3"], capsys)  # fmt: skip
    assert "--local_rank 3 is for launchers" in err and "leave it out" in err


# ---------------------------------------------------------------------------------------------
# Close matches, and train.py's --help in groups as docs/flags.md


@pytest.mark.parametrize(
    ("typed", "meant"),
    [(["--lerning_rate", "0.1"], "unrecognized arguments: --lerning_rate 0.1; did you mean "
                                 "--learning_rate?"),
     (["--num-stepz=5"], "did you mean --num_steps?"),
     (["--model_type", "ViT-B16"], "invalid choice: 'ViT-B16'; did you mean ViT-B_16?"),
     (["--model_type", "vit-b_16"], "did you mean ViT-B_16?"),
     (["--dataset", "cifar-10"], "did you mean cifar10?")],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)  # fmt: skip
def test_a_misspelt_flag_or_choice_gets_the_close_one(
    typed: list[str], meant: str, capsys: pytest.CaptureFixture
) -> None:
    err = train_refusal(["--name", "x", *typed], capsys)
    assert meant in err
    assert "Mixer-L_16" not in err, "the close match, not every choice"


def test_a_choice_close_to_none_lists_them_all(capsys: pytest.CaptureFixture) -> None:
    err = train_refusal(["--name", "x", "--model_type", "zzz"], capsys)
    assert "invalid choice: 'zzz'; choose from ViT-Ti_16," in err and "Mixer-L_16" in err


def help_groups(text: str) -> dict[str, list[str]]:
    """Group title -> its flags, in the order --help prints them."""
    groups: dict[str, list[str]] = {}
    for block in text.split("\n\n"):
        title, _, body = block.partition(":\n")
        if body.startswith("  -") and "\n" not in title:
            groups[title.lower()] = re.findall(r"(?m)^  (--\w+)", body)
    return groups


def test_train_help_is_in_groups_with_each_model_type_once() -> None:
    done = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == ""
    text = done.stdout
    # the types once, in --model_type's help (argparse's {ViT-Ti_16,...} put them in the usage
    # line and again in the option column)
    assert " ".join(text.split()).count(", ".join(CONFIGS)) == 1 and "{ViT" not in text
    assert text.count("Mixer-L_16") == 2  # in the list, and in --pretrained_dir's default
    groups = help_groups(text)
    del groups["options"]  # -h, --help
    assert len(groups) >= 6 and all(len(flags) <= 8 for flags in groups.values())
    parser = train_flags.build_parser()
    assert sorted(sum(groups.values(), [])) == sorted(
        a.option_strings[0] for a in flag_actions(parser) if a.option_strings[0] != "-h"
    )
    assert len(text.splitlines()) < 139  # a flat list of 139 lines before


def test_docs_flags_table_has_helps_groups_and_order() -> None:
    """docs/flags.md says --help prints the same list: the same groups, flags and order."""
    page = (REPO / "docs" / "flags.md").read_text().split("\n## All flags\n")[1]
    documented = {}
    for section in page.split("\n### ")[1:]:
        title = section.splitlines()[0].strip().lower()
        documented[title] = re.findall(r"(?m)^\| `(--\w+)", section)
    groups = help_groups(train_flags.build_parser().format_help())
    del groups["options"]
    assert documented == groups


def test_flag_files_that_include_each_other_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A flag file that includes itself, or two that include each other: argparse would recurse
    until Python's limit and print a RecursionError."""
    monkeypatch.chdir(tmp_path)
    Path("self.txt").write_text("--num_steps 5\n@self.txt\n")
    Path("a.txt").write_text("@b.txt\n")
    Path("b.txt").write_text("--seed 3 @a.txt\n")
    for flag_file in ("@self.txt", "@a.txt"):
        with pytest.raises(SystemExit) as stopped:
            run_main(lambda f=flag_file: train.main(["--name", "x", f]), "train.py")
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "flag files include each other more than 16 deep; does one include itself?" in err
    Path("base.txt").write_text("--seed 3\n")
    Path("recipe.txt").write_text("@base.txt --num_steps 700\n")  # an include without a loop
    assert train_flags.parse_flags(["--name", "x", "@recipe.txt"]).num_steps == 700
