"""The package's shape: imports flow downward (CLI -> stages -> ground floor), never in a cycle.

Read from the source with ``ast`` (imports inside functions included), so a lazy import that
closes a loop is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# The ground floor every stage uses; it must use nothing above it.
GROUND_FLOOR = {"pipeline.errors", "pipeline.files", "pipeline.hf", "pipeline.ids",
                "pipeline.lock", "pipeline.clips", "pipeline.records", "pipeline.runner",
                "pipeline.engine", "pipeline.media", "pipeline.shards", "pipeline.device"}
# The stages: none imports another (what one needs of another's output is in the ground floor).
STAGES = {"pipeline.subclip": ("pipeline.segments",), "pipeline.frames": (),
          "pipeline.features": (), "pipeline.train": (), "pipeline.export": ()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            deps.update(t for t in targets if t in modules and t != name)
        # A package's __init__ is not a dependency of its own submodules' siblings' imports.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    assert "pipeline.features.sources" in graph["pipeline.features.stage"]  # imports are seen
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def on_ground_floor(module: str) -> bool:
    return any(module == g or module.startswith(g + ".") for g in GROUND_FLOOR)


def test_the_ground_floor_imports_nothing_above_it() -> None:
    graph = import_graph()
    floor = [m for m in graph if on_ground_floor(m)]
    assert "pipeline.shards.writer" in floor
    above = {m: sorted(d for d in graph[m] if not on_ground_floor(d) and d != "pipeline")
             for m in floor}
    assert above == {m: [] for m in floor}


def test_no_module_uses_another_modules_private_names() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "pipeline"
            ):
                offenders += [f"{module_name(path)}: {node.module}.{a.name}"
                              for a in node.names if _private(a.name)]
    assert offenders == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def stage_of(module: str) -> str | None:
    for stage, parts in STAGES.items():
        if any(module == m or module.startswith(m + ".") for m in (stage, *parts)):
            return stage
    return None


def test_no_stage_imports_another() -> None:
    graph = import_graph()
    assert stage_of("pipeline.features.stage") == "pipeline.features"
    crossing = {m: sorted(d for d in deps if stage_of(d) not in (None, stage_of(m)))
                for m, deps in graph.items() if stage_of(m)}
    assert crossing == {m: [] for m in crossing}


def test_workflow_does_not_import_the_cli() -> None:
    graph = import_graph()
    assert "pipeline.workflow.plan" in graph
    reach = {m: sorted(d for d in deps if d == "pipeline.cli" or d.startswith("pipeline.cli."))
             for m, deps in graph.items() if m.startswith("pipeline.workflow")}
    assert reach == {m: [] for m in reach}


TASK_NAMES = {"regression", "classification", "multilabel", "caption"}
TASKS_PACKAGE = PACKAGE / "train" / "tasks"


def task_comparisons(tree: ast.AST) -> list[int]:
    """Lines of ``==``/``!=``/``in``/``not in`` comparisons of a task: a ``task`` name or
    attribute, or a task's name as a string, on either side."""
    def is_task(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Name) and node.id == "task")
                or (isinstance(node, ast.Attribute) and node.attr == "task")
                or (isinstance(node, ast.Constant) and node.value in TASK_NAMES))

    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Compare)
            and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops)
            and any(is_task(n) for n in [node.left, *node.comparators])]


def test_no_module_outside_train_tasks_compares_a_task_name() -> None:
    # Shared code asks the task object (tasks.get_task); only a task's own module knows it.
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}"
                 for path in sorted(PACKAGE.rglob("*.py")) if TASKS_PACKAGE not in path.parents
                 for line in task_comparisons(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == []


def test_the_task_comparison_finder_sees_each_spelling() -> None:
    code = ('if spec.task == "caption": pass\nif task != x: pass\nif "multilabel" in t: pass\n'
            'if cfg.task is None: pass\nif task not in TASKS: pass\n')
    assert task_comparisons(ast.parse(code)) == [1, 2, 3, 5]


def test_only_vggish_knows_vggish() -> None:
    """Nothing outside an encoder's module asks which encoder it is: no code compares a name
    with "vggish", names VGGish's own options (``opts.audio_pca``, "audio_postprocess": they
    reach the options, the CLI and the records from its declaration) or reaches its functions
    elsewhere."""
    own = PACKAGE / "features" / "encoders" / "vggish.py"
    vggish_only = {"audio_pca", "audio_postprocess", "audio_examples", "wav_examples",
                   "resolve_audio_weights", "check_audio_options", "load_audio_encoder"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == own:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any(a.name in vggish_only
                                                        for a in node.names):
                found.append(f"{path.name}:{node.lineno}: imports VGGish's functions")
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value == "vggish"
                for c in [node.left, *node.comparators]
            ):
                found.append(f"{path.name}:{node.lineno}: compares with 'vggish'")
            named = (node.attr if isinstance(node, ast.Attribute) else
                     node.value if isinstance(node, ast.Constant) else None)
            if named in vggish_only:
                found.append(f"{path.name}:{node.lineno}: {named}")
    assert not found
