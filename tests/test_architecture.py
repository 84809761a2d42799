"""The house that docs/architecture.md describes: imports point down, train.py stays the story,
and the README's layout names every module that exists and none that does not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# From the ground up: a module may import its own room and the rooms below it, never above.
FLOORS = ["models", "utils/files", "utils/runtime", "utils/data", "utils/cli", "utils/training",
          "utils/inspection"]  # fmt: skip
SCRIPTS = {"train", "evaluate", "predict", "export", "visualize_attention", "bench"}


def room(module: str) -> str | None:
    """The floor of a dotted module name of this project, or None for an outside one."""
    path = module.replace(".", "/")
    return next((f for f in reversed(FLOORS) if path == f or path.startswith(f + "/")), None)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def test_imports_point_down() -> None:
    wrong = []
    for path in [*REPO.glob("models/**/*.py"), *REPO.glob("utils/**/*.py")]:
        own = room(str(path.relative_to(REPO).with_suffix("")).replace("/", "."))
        for name in imports(path):
            if name.split(".")[0] in SCRIPTS:
                wrong.append(f"{path.relative_to(REPO)} imports the script {name}")
            elif (to := room(name)) is not None and FLOORS.index(to) > FLOORS.index(own):
                wrong.append(f"{path.relative_to(REPO)} ({own}) imports {name} ({to}), above it")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_import_that_runs_up() -> None:
    assert room("utils.training.saving") == "utils/training"
    assert room("utils.cli") == "utils/cli" and room("torch.nn") is None
    assert FLOORS.index(room("utils.inspection.figures")) > FLOORS.index(room("models.errors"))


def test_train_py_is_the_story() -> None:
    """docs/architecture.md: a short file of a few named steps; each concept lives elsewhere."""
    source = (REPO / "train.py").read_text()
    tree = ast.parse(source)
    definitions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert len(source.splitlines()) <= 450 and len(definitions) <= 16
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in definitions
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]  # fmt: skip
    assert not long, long
    assert [n.name for n in definitions[:2]] == ["main", "train"], "it reads top-down"


def test_the_readme_layout_names_every_module_and_only_those() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Project layout", 1)[1].split("```")[1]
    named, folder = set(), ""
    for line in block.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if not line.startswith(" ") and word.endswith("/"):
            folder = word
        elif line.startswith("  ") and word.endswith(".py"):
            named.add(folder + word)
    modules = {
        str(p.relative_to(REPO))
        for p in [*REPO.glob("models/*.py"), *REPO.glob("utils/*/*.py")]
        if p.name != "__init__.py"
    }
    assert named == modules, (sorted(modules - named), sorted(named - modules))
    for path in re.findall(
        r"`((?:utils|models)/[\w/]+\.py)`", (REPO / "docs/architecture.md").read_text()
    ):
        assert (REPO / path).is_file(), path
