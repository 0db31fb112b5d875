"""Plans and the CLI contract: every stage under every profile, dry runs light and side-effect free, the all-stage page."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from pipeline import plan as P
from pipeline.core.errors import ConfigError
from pipeline.core.paths import ROOT
from pipeline.core.profiles import available
from pipeline.stage.resolve import resolve, split_overrides
from pipeline.stage.spec import names

STAGES = names()
PROFILES = available("hw")


def _main(stage):
    import importlib

    return importlib.import_module(f"pipeline.{stage}").main


@pytest.mark.parametrize("stage,hw", list(itertools.product(STAGES, PROFILES)))
def test_the_plan_of_every_stage_under_every_profile(stage, hw, capsys):
    assert _main(stage)(["--hw", hw]) == 0
    out = capsys.readouterr().out
    r = resolve(stage, hw=hw)
    assert out.startswith(f"━━ {stage} ━━ (HW={hw}, model {r.model.name})")
    assert f"mlflow run . -e {stage} --env-manager local" in out and f"-P hw={hw} -P dry_run=false" in out
    assert "tracking " in out and "experiment" in out and "HF_HOME=" in out and "HF_ENDPOINT=" in out
    assert "  inputs\n" in out and "  outputs\n" in out and "  estimate\n    memory  " in out
    assert r.model.ref in out and "resolved config" in out


def test_stage_plans_name_what_later_issues_rely_on(capsys):
    _main("sft")(["--hw", "4090"])
    sft = capsys.readouterr().out
    assert "outputs/data/default/{sft.jsonl,sft_eval.jsonl,manifest.json}" in sft and "zh-align-sft@candidate" in sft
    _main("align")(["--hw", "4090", "--loss", "dpo"])
    dpo = capsys.readouterr().out
    assert "loss" in dpo and "dpo, beta 0.2, length penalty alpha 0.02" in dpo and "-P loss=dpo" in dpo
    assert ("latest FINISHED sft run with base qwen2.5-7b-instruct and profile 4090 [looked up in MLflow at run time"
            in dpo)
    _main("evaluate")(["--hw", "4090"])
    assert "cmmlu, ceval-valid, hellaswag, winogrande" in capsys.readouterr().out


def test_the_equivalent_command_carries_config_and_overrides(capsys):
    _main("sft")(["--hw", "cpu", "--config", "configs/smoke/sft.yaml", "--set", "lora.r=8",
                  "--overrides", "train.epochs=2 'train.seed=3'"])
    out = capsys.readouterr().out
    assert "-P 'overrides=lora.r=8 train.epochs=2 train.seed=3'" in out
    assert "r: 8" in out and "epochs: 2.0" in out


@pytest.mark.parametrize("stage", [*STAGES, "plan"])
def test_help_exits_0(stage, capsys):
    with pytest.raises(SystemExit) as done:
        _main(stage)(["--help"])
    assert done.value.code == 0 and "--hw" in capsys.readouterr().out


def test_a_config_error_exits_2_naming_the_key(capsys):
    assert _main("sft")(["--set", "lora.rr=8"]) == 2
    assert "did you mean `lora.r`?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main("sft")(["--dry-run", "maybe"])


def test_a_dry_run_imports_nothing_heavy_and_writes_nothing(tmp_path):
    probe = ("import sys; from pipeline import sft, prepare, plan;"
             "assert sft.main(['--hw', 'cpu']) == 0 and plan.main(['--hw', '4090']) == 0;"
             "heavy = {'torch', 'transformers', 'trl', 'peft', 'mlflow', 'datasets', 'lm_eval'} & set(sys.modules);"
             "print('HEAVY', sorted(heavy))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "ZH_ALIGN_TINY_CACHE": str(tmp_path / "tiny")}
    before = _tree()
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert _tree() == before and list(tmp_path.iterdir()) == []


def _tree() -> dict[str, int]:
    skip = {".venv", ".git", ".pytest_cache", ".ruff_cache", "__pycache__"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_plan_routes_overrides_to_the_stages_that_have_the_key():
    routed = split_overrides([("model", "tiny-qwen3"), ("sft.lora.r", 8), ("hw.micro_batch", 1), ("beta", 0.1)])
    assert all(("model", "tiny-qwen3") in routed[s] for s in STAGES)
    assert routed["sft"].count(("lora.r", 8)) == 1 and ("lora.r", 8) not in routed["align"]
    assert all(("hw.micro_batch", 1) in routed[s] for s in STAGES)
    assert routed["align"] == [("model", "tiny-qwen3"), ("hw.micro_batch", 1), ("beta", 0.1)]
    with pytest.raises(ConfigError, match="no stage has a key `modle`; did you mean `model`"):
        split_overrides([("modle", "x")])


def test_the_all_stage_page_shows_five_stages_and_collects_errors(capsys):
    assert P.main(["--hw", "4090"]) == 0
    page = capsys.readouterr().out
    assert [line.split()[1] for line in page.splitlines() if line.startswith("━━")] == list(STAGES)
    assert P.main(["--hw", "3090"]) == 2
    err = capsys.readouterr().err
    assert err.count("unknown hardware profile '3090'") == 1 and "4090, 5090, cpu" in err
