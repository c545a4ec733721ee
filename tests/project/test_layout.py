"""Package layout: no import cycles, a light command-line parser, package data found from an installed copy, and
the tests laid out like the packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("search", "surgery", "objectives", "studies")
HEAVY = ("torch", "transformers", "pandas", "optuna", "peft", "lm_eval", "matplotlib")
TESTS = ROOT / "tests"
TEST_FOLDERS = ("search", "surgery", "objectives", "project")  # a package's tests, or what spans the packages


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, *, lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run at import time (module body, ``if``/``try`` blocks), or every one when ``lazy``;
    never those under ``if TYPE_CHECKING``."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif lazy or isinstance(node, (ast.If, ast.Try)):
            stack += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return found


def _targets(node, name: str, is_package: bool, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    base = node.module or ""
    if node.level:
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names} & modules


def import_graph(packages=PACKAGES, *, lazy: bool = False) -> dict[str, set[str]]:
    """Project module -> project modules it imports."""
    paths = {_module_name(p): p for package in packages for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        nodes = _imports(ast.parse(path.read_text(encoding="utf-8")), lazy=lazy)
        graph[name] = set().union(*(_targets(n, name, path.name == "__init__.py", set(paths)) for n in nodes)) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [node, other])
            elif other not in state:
                visit(other, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycles():
    """Every import statement counts, those inside functions too: a lazy import is still a dependency."""
    graph = import_graph(lazy=True)
    assert len(graph) > 40 and "objectives.latency" in graph["objectives.budgets"]
    assert "search.evaluation.executors" in graph["search.commands.run"]  # an import inside a function
    assert cycles(graph) == []


def test_schemas_do_not_import_commands():
    """The study config and its sections are read by every command; no command is needed to read them."""
    graph = import_graph(("search",), lazy=True)
    schemas = ("search.schema", "search.config", "search.record", "search.stored")
    assert {m: sorted(d for d in graph[m] if d.startswith("search.commands")) for m in schemas} == dict.fromkeys(
        schemas, [])


def test_commands_depend_on_the_study_package_not_on_each_other():
    """run, report, export and confirm read and write a study through ``search.studydir``; none imports another."""
    graph = import_graph(("search",), lazy=True)
    verbs = [f"search.commands.{name}" for name in ("run", "report", "export", "confirm")]

    def verb(module: str) -> str | None:
        return next((v for v in verbs if module == v or module.startswith(v + ".")), None)

    assert [(m, d) for m, deps in graph.items() for d in deps if verb(d) and verb(d) != verb(m)] == []
    assert all("search.studydir" in graph[v] for v in verbs)
    study = {m: sorted(d for d in deps if d.startswith("search.commands"))
             for m, deps in graph.items() if m.startswith("search.studydir")}
    assert len(study) >= 5 and all(deps == [] for deps in study.values()), study


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_building_the_parser_imports_nothing_heavy():
    code = ("import sys; from search.study import build_parser; build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["run", "report", "export", "bench", "confirm"])
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "search.study", command, "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and f"python -m search.study {command}" in out.stdout


def test_package_data_is_found_through_the_package(tmp_path):
    from objectives.tasks.utils import BENCHMARKS
    from search.arguments import study_config
    from studies import assets, bundled_study

    assert (assets("models", "stories260k") / "config.json").is_file()
    assert BENCHMARKS == assets("benchmarks") and (BENCHMARKS / "tinystories_ppl.jsonl").is_file()
    assert bundled_study("stories260k") == ROOT / "studies" / "stories260k.yaml"
    assert bundled_study("no_such_study") is None and bundled_study("../pyproject") is None
    assert study_config("stories260k") == str(ROOT / "studies" / "stories260k.yaml")
    mine = tmp_path / "stories260k"
    mine.write_text("x")
    assert study_config(str(mine)) == str(mine)  # a path that exists is the user's file, not the shipped one


def test_pyproject_ships_what_the_default_study_reads():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "studies" in data["packages"]["find"]["include"]
    shipped = data["package-data"]["studies"]
    for needed in ("*.yaml", "assets/text/*", "assets/benchmarks/*.jsonl", "assets/models/stories260k/*"):
        assert needed in shipped


def _sources(*folders: str) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for folder in folders for p in (ROOT / folder).rglob("*.py")}


def test_no_private_reaches_into_optuna_or_other_modules():
    banned = ("._storage", "_CONSTRAINTS_KEY", "._trial_id", "._study_id", "ctx._values", "optuna.study._")
    found = [(p.name, b) for p, text in _sources("search", "tests", "benchmarks").items() for b in banned
             if b in text and p.name != "test_layout.py"]
    assert found == []


def test_only_the_record_knows_the_storage_layout():
    layout = ("user_attrs", "set_user_attr", "system_attrs", "keep_{", '"keep_', '"strategy:', '"heldout:',
              "create_trial", "create_study", "load_study(")
    found = [(str(p.relative_to(ROOT)), key) for p, text in _sources("search", "benchmarks").items() for key in layout
             if key in text and p != ROOT / "search" / "record.py"]
    assert found == []


def test_strategies_see_only_the_run_object():
    sources = {**_sources("search/strategies"), ROOT / "search/evaluation/tune.py": (
        ROOT / "search/evaluation/tune.py").read_text(encoding="utf-8")}
    found = [p.name for p, text in sources.items() if "run.ctx" in text or ".ctx." in text]
    assert found == []
    graph = import_graph(("search",), lazy=True)
    strategies = {m: deps for m, deps in graph.items() if m.startswith("search.strategies")}
    allowed = ("search.strategies", "search.record", "search.evaluation.context")
    assert all(d.startswith(allowed) for deps in strategies.values() for d in deps), strategies


def test_seams_are_typed_not_probed():
    """Evaluators and strategies are found through their base classes, never by probing for attributes."""
    found = [(p.name, line.strip()) for p, text in _sources("search/evaluation", "search/strategies").items()
             for line in text.splitlines() if "hasattr(" in line or 'getattr(self.ctx' in line]
    assert found == []


def test_lower_layers_do_not_import_search():
    graph = import_graph(("surgery", "objectives"), lazy=True)
    assert not any(d.startswith("search") for deps in graph.values() for d in deps)


def test_tests_are_laid_out_like_the_packages():
    """Every test module sits in ``tests/<package>/`` (``project/``: the CLI chain, README, wheel, benchmark scripts,
    CI); only shared helpers and the root conftest.py stay in ``tests/``. Each folder on the way is a package, so
    pytest imports ``tests.search.test_x`` and never puts ``tests/`` itself on sys.path, where ``tests/search``
    would hide the ``search`` package."""
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 40
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []
    misplaced = [str(p.relative_to(TESTS)) for p in modules if p.relative_to(TESTS).parts[0] not in TEST_FOLDERS]
    assert misplaced == []
    assert all((ROOT / name / "__init__.py").is_file() for name in TEST_FOLDERS if name != "project")
    folders = {folder for p in modules for folder in p.relative_to(TESTS).parents}
    assert sorted(str(f) for f in folders if not (TESTS / f / "__init__.py").is_file()) == []
    assert all(any((TESTS / name).glob("test_*.py")) for name in TEST_FOLDERS)
