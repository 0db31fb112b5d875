"""Enumerated consistency: MLproject ↔ CLI ↔ Makefile ↔ README ↔ conda.yaml / constraints.txt / pyproject.toml."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.core.paths import ROOT
from pipeline.core.profiles import DEFAULT_HW
from pipeline.stage import cli
from pipeline.stage.spec import get, names

MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text(encoding="utf-8"))
ENTRY_POINTS = MLPROJECT["entry_points"]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
TRAINING_ARGS = {"output_dir", "learning_rate", "seed", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "bf16", "fp16", "logging_steps", "save_steps", "eval_steps",
                 "run_name", "report_to", "max_grad_norm", "warmup_ratio", "lr_scheduler_type", "optim"}


def _make_targets() -> dict[str, str]:
    return dict(re.findall(r"^([a-z-]+):.*?## (.+)$", MAKEFILE, flags=re.M))


def test_every_stage_plan_and_pipeline_is_an_entry_point_with_a_module():
    assert set(ENTRY_POINTS) == {*names(), "plan", "pipeline"}
    for name in ENTRY_POINTS:
        assert callable(importlib.import_module(f"pipeline.{name}").main)
        assert (ROOT / "pipeline" / f"{name}.py").is_file()


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_declared_parameter_reaches_the_command_and_the_cli_accepts_it(name):
    ep = ENTRY_POINTS[name]
    params = ep["parameters"]
    placeholders = set(re.findall(r"\{(\w+)\}", ep["command"]))
    assert placeholders == set(params), f"{name}: declared {sorted(params)} but the command uses {sorted(placeholders)}"
    assert not set(params) & TRAINING_ARGS
    sample = {"config": "", "hw": "cpu", "dry_run": "true", "overrides": "", "loss": "", "accel": "", "resume": ""}
    argv = shlex.split(ep["command"].format(**{k: shlex.quote(sample[k]) for k in params}))
    assert argv[:3] == ["python", "-m", f"pipeline.{name}"]
    assert importlib.import_module(f"pipeline.{name}").main(argv[3:]) == 0


def test_parameters_are_launch_choices_whose_defaults_match_the_cli():
    for name, ep in ENTRY_POINTS.items():
        params = ep["parameters"]
        assert all("default" in p for p in params.values()), f"{name}: every parameter needs a default (plain run)"
        assert params["hw"]["default"] == DEFAULT_HW, f"{name}: hw's default is the Makefile's HW ?= {DEFAULT_HW}"
        assert set(params) <= {"config", "hw", "dry_run", "overrides", "loss", "accel", "resume"}
        if name == "pipeline":  # no config of its own: it routes overrides to the stages' configs, as plan does
            assert {"hw", "dry_run", "overrides", "loss", "accel", "resume"} == set(params)
        elif name != "plan":
            assert {"config", "hw", "dry_run", "overrides"} <= set(params)
            assert params["dry_run"]["default"] == "true"
            parser = cli.make_parser(get(name))
            assert parser.parse_args([]).dry_run is True
    assert "loss" in ENTRY_POINTS["align"]["parameters"]
    assert all("accel" in ENTRY_POINTS[s]["parameters"] for s in ("sft", "align"))
    assert re.search(r"^HW \?= (\S+)$", MAKEFILE, re.M).group(1) == DEFAULT_HW


def test_makefile_declares_the_variables_and_targets():
    for var, default in [("DRY_RUN", "1"), ("HW", "4090"), ("EXPERIMENT", "zh-align"), ("ENV_MANAGER", "local"),
                         ("SET", ""), ("LOSS", "orpo"), ("PORT", "5000")]:
        assert re.search(rf"^{var} \?={' ' + default if default else ''}$", MAKEFILE, re.M), var
    assert ".DEFAULT_GOAL := help" in MAKEFILE
    targets = _make_targets()
    required = {"demo", "setup", "plan", "pipeline", "rerun", "prepare", "data", "sft", "align", "orpo", "dpo",
                "evaluate", "eval", "export", "promote", "pull", "ui", "screenshots", "test", "lint", "clean", "help"}
    assert required <= set(targets)
    phony = set(re.search(r"^\.PHONY: (.+)$", MAKEFILE, re.M).group(1).split())
    assert set(targets) <= phony
    for stage in names():
        body = MAKEFILE.split(f"\n{stage}: ", 1)[1].split("\n\n", 1)[0]
        assert f"$(call stage,{stage}" in body


def test_make_help_lists_every_target_with_one_line():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target, line in _make_targets().items():
        assert re.search(rf"^  {re.escape(target)}\s+{re.escape(line)}$", out, re.M), target


def test_stage_targets_run_mlflow_with_the_dry_run_experiment():
    dry = subprocess.run(["make", "-n", "sft", "SET=lora.r=8"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "mlflow run . -e sft --env-manager local --experiment-name 'zh-align-dryrun'" in dry.stdout
    assert "-P dry_run=true" in dry.stdout and "-P overrides='lora.r=8'" in dry.stdout
    real = subprocess.run(["make", "-n", "dpo", "DRY_RUN=0", "HW=cpu"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert "--experiment-name 'zh-align'" in real.stdout and "-P dry_run=false" in real.stdout
    assert "-P loss='dpo'" in real.stdout and "-P hw='cpu'" in real.stdout


def test_make_refuses_a_bad_key_before_mlflow_starts():
    proc = subprocess.run(["make", "sft", "SET=lora.rr=8"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "`lora.rr`" in proc.stderr and "did you mean `lora.r`?" in proc.stderr
    assert "mlflow run" not in proc.stdout


def _pins(lines) -> dict[str, str]:
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower(): str(r.specifier) + (f"; {r.marker}" if r.marker else "") for r in reqs}


def test_conda_yaml_pins_the_same_versions_as_constraints_and_they_fit_pyproject():
    constraints = _pins(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                        if line.strip() and not line.startswith("#"))
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_list = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip_list) == constraints
    assert all(spec.startswith("==") for spec in constraints.values())
    assert "CUDA 13.0" in (ROOT / "conda.yaml").read_text()  # which CUDA the plain torch wheel targets
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in ranges:
        assert req.name.lower() in constraints, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(constraints[req.name.lower()][2:]), f"{req} vs {constraints[req.name.lower()]}"
    torch_range = next(r for r in ranges if r.name == "torch").specifier
    assert torch_range.contains("2.11.0") and next(r for r in ranges if r.name == "transformers").specifier.contains(
        "5.17.0")  # GPU machines commonly carry these
    extras = project["optional-dependencies"]
    assert {"bitsandbytes", "liger-kernel", "nvidia-ml-py"} == {Requirement(r).name for r in extras["gpu"]}
    for req in map(Requirement, extras["gpu"] + extras["logging"]):  # every extra pinned, the CUDA ones on Linux only
        pin = constraints.get(req.name.lower(), "")
        assert pin.startswith("=="), f"the {req.name} extra package is not pinned in constraints.txt / conda.yaml"
        assert req.specifier.contains(pin[2:].split(";")[0]), f"{req} vs {pin}"
        assert pin.endswith('; sys_platform == "linux"') == (req in map(Requirement, extras["gpu"])), pin
    assert {Requirement(r).name for r in extras["logging"]} == {"tensorboard", "wandb"}
    assert set(extras["logging"]) <= set(extras["dev"])  # so `make setup` installs them and tests/test_backends runs


def _tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line and (ROOT / line).exists()}


def test_readme_file_tree_is_true():
    block = README.split("<!-- tree:", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    entries = {}
    for line in block.splitlines():
        path, sep, comment = line.partition("#")
        assert sep and comment.strip(), f"README tree line without a comment: {line!r}"
        entries[path.strip()] = comment.strip()
    for path in entries:
        assert (ROOT / path).exists(), f"README lists {path}, which does not exist"
    folders = [p for p in entries if p.endswith("/")]
    missing = sorted(f for f in _tracked_files() if f not in entries and not any(f.startswith(d) for d in folders))
    assert not missing, f"README's file tree misses {missing}"


def test_readme_commands_exist():
    targets = set(_make_targets())
    for target in re.findall(r"`make ([a-z-]+)", README):
        assert target in targets, f"README mentions `make {target}`"
    assert "make test" in README and "中文快速上手" in README
    for stage in re.findall(r"python -m pipeline\.(\w+)", README):
        assert stage in ENTRY_POINTS
