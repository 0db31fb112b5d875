"""The layout: layers that import only downward, no import cycle, small modules, MLflow in one package, every stage's
declaration complete, and docs/ARCHITECTURE.md listing every module."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pipeline.core.paths import ROOT
from pipeline.core.profiles import available, load_profile
from pipeline.stage.resolve import default_config_path
from pipeline.stage.spec import names, stages

PACKAGE = ROOT / "pipeline"
# Lower ranks sit below higher ones; a module imports only from lower ranks or from its own package. Packages of one
# rank are peers and do not import each other; each top-level module is a package of its own.
RANKS = {"core": 0, "tracking": 1, "models": 1, "hardware": 1, "data": 2, "training": 3, "evaluation": 3, "stage": 4}
STAGE_RANK, COMMAND_RANK = 5, 6
MAX_LINES = 450
ARCHITECTURE = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module of the package this file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:  # `from pipeline.tracking import runs` imports the module pipeline.tracking.runs
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found - {"pipeline"}


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def rank(module: str) -> int:
    pkg = package(module)
    if pkg in RANKS:
        return RANKS[pkg]
    source = MODULES[module].read_text(encoding="utf-8")
    return STAGE_RANK if re.search(r"^STAGE = Stage\(", source, re.M) else COMMAND_RANK


def test_every_package_has_a_rank():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(RANKS), "a new package needs its place in RANKS (and in docs/ARCHITECTURE.md)"


def test_imports_go_only_downward():
    upward = [f"{m} → {dep} ({package(m) or 'top'} {rank(m)} → {package(dep) or 'top'} {rank(dep)})"
              for m, deps in GRAPH.items() if m != "pipeline" for dep in deps
              if package(dep) != package(m) or not package(m)
              if rank(dep) >= rank(m)]
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(sorted(upward))


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" → ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _import_alone(module: str) -> tuple[str, int, str]:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return module, done.returncode, done.stderr[-2000:]


def test_every_module_imports_first_in_a_fresh_interpreter():
    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(m, err) for m, code, err in pool.map(_import_alone, sorted(MODULES)) if code]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)


def test_modules_are_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_only_the_tracking_package_imports_mlflow():
    outside = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names_ = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                      [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if package(module) != "tracking" and any(n.split(".")[0] == "mlflow" for n in names_):
                outside.append(module)
    assert not outside, f"mlflow imported outside pipeline/tracking/: {sorted(set(outside))}"


# ---------------------------------------------------------------------------------------------------------------
# A stage declares itself
# ---------------------------------------------------------------------------------------------------------------
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text(encoding="utf-8"))["entry_points"]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_chain_is_the_five_stages_in_their_order():
    assert names() == ("prepare", "sft", "align", "evaluate", "export")


@pytest.mark.parametrize("stage", stages(), ids=lambda s: s.name)
def test_every_stage_declaration_is_complete(stage):
    earlier = names()[: names().index(stage.name)]
    assert stage.needs <= set(earlier), f"{stage.name} links to or follows a stage that is not before it"
    assert stage.key_metrics and stage.checks and stage.summary, "key metrics, rerun checks and a summary"
    assert stage.plan.__module__ == stage.run.__module__ == stage.config.__module__ == f"pipeline.{stage.name}"
    keys = {f.name for f in dataclasses.fields(stage.config)}
    assert {k.split(".")[0] for k in [*stage.links, *stage.pinned, *stage.rerun_sets]} <= keys
    declared = set(MLPROJECT[stage.name]["parameters"])
    assert set(stage.parameters(hw="cpu", overrides="", config="")) | {"dry_run"} == declared
    for hw in available("hw"):
        for variant in stage.variants or (None,):
            assert default_config_path(stage, load_profile(hw), variant).is_file(), (stage.name, hw, variant)
    assert (ROOT / "tests" / f"test_{stage.name}.py").is_file()
    assert re.search(rf"^{stage.name}: .*## ", MAKEFILE, re.M) and f"make {stage.name}" in README
    assert f"pipeline/{stage.name}.py" in ARCHITECTURE


def test_architecture_md_lists_every_module_and_package():
    listed = set(re.findall(r"^(pipeline/\S+)", ARCHITECTURE, re.M))
    missing = sorted(str(p.relative_to(ROOT)) for p in MODULES.values()
                     if str(p.relative_to(ROOT)) not in listed and p.name != "__init__.py")
    assert not missing, f"docs/ARCHITECTURE.md does not list {missing}"
    assert all((ROOT / entry).exists() for entry in listed), "docs/ARCHITECTURE.md lists a path that does not exist"
