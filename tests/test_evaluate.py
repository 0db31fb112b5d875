"""The evaluate stage on the tiny model (CPU, offline): zh_smoke for the adapter and the base, results on the eval run,
on the training run and on the registered version, delta = tuned − base, and the gate's paired test."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import mlflow
import pytest

from pipeline import evaluate, prepare, sft
from pipeline.core.errors import ConfigError
from pipeline.core.strict import parse_overrides
from pipeline.evaluation import forgetting
from pipeline.stage.resolve import resolve

FAST = ["hw.micro_batch=4", "hw.grad_accum=1", "train.logging_steps=5", "train.eval_steps=100", "train.save_steps=100"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A pool, an sft run whose adapter really moved (high lr), and one evaluation of it against the base."""
    tmp = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "eval-test")
    mp.setenv("ZH_ALIGN_EVAL_CACHE", str(tmp / ".cache" / "eval-base"))
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    assert prepare.main(["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={tmp / 'data'}"]) == 0
    trained = sft.run(resolve("sft", hw="cpu", overrides=parse_overrides(
        [f"data.path={tmp / 'data'}", f"output_dir={tmp / 'sft'}", "train.max_steps=20", "train.lr=2e-2",
         "train.warmup_ratio=0.0", "train.epochs=6", *FAST])))
    r = resolve("evaluate", hw="cpu", overrides=parse_overrides([f"output_dir={tmp / 'eval'}"]))
    result = evaluate.run(r)
    yield {"tmp": tmp, "out": tmp / "eval", "result": result, "sft": trained}
    mp.undo()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def choices(items: list[dict]) -> dict[int, int]:
    """doc_id → the option the model scored highest (lm-eval's filtered log-likelihoods)."""
    return {s["doc_id"]: max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0]))
            for s in items}


def test_an_adapter_that_moves_the_model_answers_differently_from_the_base(world):
    """The 20-step smoke adapter shifts log-likelihoods but not the tiny model's letter preference; an adapter with
    large LoRA weights (the same files, B matrices drawn at random) must change answers, item by item."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    moved = world["tmp"] / "moved-adapter"
    shutil.copytree(world["sft"].adapter, moved, dirs_exist_ok=True)
    weights = load_file(moved / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v for k, v in weights.items()},
              moved / "adapter_model.safetensors")
    evaluate.run(resolve("evaluate", hw="cpu", overrides=parse_overrides(
        [f"output_dir={world['tmp'] / 'eval-moved'}", f"adapter={moved}"])))
    base = json.loads(next(Path(world["tmp"] / ".cache" / "eval-base").glob("*.json")).read_text())["samples"]
    tuned, before = choices(samples(world["tmp"] / "eval-moved" / "samples.jsonl")), choices(base["zh_smoke"])
    assert len(tuned) == len(before) >= 50
    assert sum(tuned[i] != before[i] for i in tuned) >= 3


def test_csv_rows_match_the_json_and_delta_is_tuned_minus_base(world):
    results = json.loads((world["out"] / "results.json").read_text(encoding="utf-8"))["results"]
    with open(world["out"] / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(row["value"]) == pytest.approx(results[row["task"]][f"{row['metric']},none"]) for row in rows)
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id],  # the fixture's: the first
                             filter_string="tags.stage = 'evaluate'", order_by=["attributes.start_time ASC"])[0]
    base = json.loads(next(Path(world["tmp"] / ".cache" / "eval-base").glob("*.json")).read_text())["results"]
    tuned = run.data.metrics["eval/zh_smoke/acc"]
    assert tuned == pytest.approx(results["zh_smoke"]["acc,none"])
    assert run.data.metrics["delta/zh_smoke/acc"] == pytest.approx(tuned - base["zh_smoke"]["acc,none"], abs=1e-12)
    assert run.data.tags["eval.gate"] in ("pass", "fail") and "McNemar" in run.data.tags["eval.gate_rule"]
    written = {p.name for p in world["out"].iterdir()}
    assert {"results.json", "results.csv", "base_vs_tuned.png", "forgetting.json"} <= written


def test_scores_land_on_the_training_run_and_the_registered_version(world):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("zh-align-sft", "candidate")
    training = client.get_run(version.run_id)
    assert "eval/zh_smoke/acc" in training.data.metrics
    assert "eval/results.csv" in {a.path for a in client.list_artifacts(version.run_id, "eval")}
    assert version.tags["eval.gate"] in ("pass", "fail") and "eval.zh_smoke.acc" in version.tags
    assert "eval.max_drop" in version.tags


def test_the_base_runs_once_then_comes_from_the_cache(world):
    """… and a run without `earlier` in a folder an earlier-adapter run used leaves no stale `earlier/` behind."""
    stale = world["tmp"] / "eval2" / "earlier"
    stale.mkdir(parents=True)
    (stale / "results.csv").write_text("from another run\n", encoding="utf-8")
    r = resolve("evaluate", hw="cpu", overrides=parse_overrides([f"output_dir={world['tmp'] / 'eval2'}"]))
    evaluate.run(r)
    assert len(list(Path(world["tmp"] / ".cache" / "eval-base").glob("*.json"))) == 1
    assert not stale.exists() and (world["tmp"] / "eval2" / "results.csv").exists()


def test_the_gate_passes_identical_models_and_fails_a_planted_drop():
    same = {i: float(i % 2) for i in range(60)}
    assert forgetting.gate([forgetting.paired("zh", same, same)], 0.02, 0.05)[0] == "pass"
    dropped = {i: 0.0 for i in range(60)}
    verdict, rule, failed = forgetting.gate([forgetting.paired("zh", same, dropped)], 0.02, 0.05)
    assert verdict == "fail" and failed == ["zh"] and "McNemar" in rule
    noisy = dict(same)
    noisy[1] = noisy[3] = 0.0  # two items lost out of 60: a 3.3-point drop, but p = 0.5
    assert forgetting.gate([forgetting.paired("zh", same, noisy)], 0.02, 0.05)[0] == "pass"
    assert forgetting.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_an_unknown_task_names_the_close_ones():
    with pytest.raises(ConfigError, match="hellaswag"):
        evaluate.run(resolve("evaluate", hw="cpu", overrides=parse_overrides(["tasks=[hellaswg]", "adapter=null"])))


def test_a_missing_mirror_names_task_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"cmmlu.*nowhere"):
        evaluate.run(resolve("evaluate", hw="cpu", overrides=parse_overrides(
            ["tasks=[cmmlu]", f"mirrors.cmmlu={tmp_path / 'nowhere'}", "adapter=null"])))


def test_the_dry_run_shows_tasks_model_adapter_and_mirrors(mlflow_store, capsys):
    assert evaluate.main(["--hw", "4090", "--set", "mirrors.cmmlu=/data/cmmlu"]) == 0
    page = capsys.readouterr().out
    assert "cmmlu, ceval-valid, hellaswag, winogrande" in page and "zh-align-sft@candidate" in page
    assert "mirror of cmmlu: /data/cmmlu" in page


def test_the_dry_run_shows_the_earlier_adapter_gated_too_and_earlier_needs_an_adapter(mlflow_store, capsys):
    assert evaluate.main(["--hw", "4090", "--set", "earlier=zh-align-sft/1", "--set", "adapter=zh-align-orpo/1"]) == 0
    page = capsys.readouterr().out
    assert "earlier adapter (evaluated and gated too): zh-align-sft/1" in page
    assert "base → earlier → tuned" in page and "for each of the two adapters" in page
    assert "3 model(s)" in page  # the estimate counts the earlier adapter's pass
    assert evaluate.main(["--hw", "cpu", "--set", "earlier=zh-align-sft/1", "--set", "adapter=null"]) == 2
    assert "`earlier` is 'zh-align-sft/1' but `adapter` is null" in capsys.readouterr().err


def test_an_adapter_of_another_profile_is_scored_on_its_recorded_base(mlflow_store, tmp_path, capsys, caplog):
    """`make eval HW=4090 SET="adapter=…"` of a tiny-qwen2 adapter, no model named: the plan (and the run) take the
    adapter's recorded base, as chat and pull do; a named model that is not its base, an earlier adapter of another
    base, and a base no model definition has are refused, naming both."""
    def adapter(name: str, base: str) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        return str(tmp_path / name)

    tiny, other = adapter("tiny", "tiny-qwen2-0123abcd"), adapter("other", "Qwen/Qwen2.5-7B-Instruct")
    caplog.set_level("INFO", logger="pipeline.stage.resolve")
    assert evaluate.main(["--hw", "4090", "--set", f"adapter={tiny}"]) == 0
    page = capsys.readouterr().out
    assert "base model: tiny-qwen2 → " in page and "Qwen/Qwen2.5-7B-Instruct" not in page
    assert "is an adapter of tiny-qwen2: the evaluate runs on that model definition, not qwen2.5-7b-instruct" in caplog.text
    assert evaluate.main(["--hw", "4090", "--set", f"adapter={tiny}", "--set", "model=qwen2.5-7b-instruct"]) == 2
    err = capsys.readouterr().err
    assert "is an adapter of base 'tiny-qwen2-0123abcd', but this evaluate's model is qwen2.5-7b-instruct" in err
    assert evaluate.main(["--hw", "4090", "--set", f"adapter={tiny}", "--set", f"earlier={other}"]) == 2
    assert "`earlier` " in (err := capsys.readouterr().err) and "give an earlier adapter of tiny-qwen2" in err
    assert evaluate.main(["--hw", "cpu", "--set", f"adapter={adapter('alien', 'someone/alien-7b')}"]) == 2
    assert "add a model definition with `hub_id: someone/alien-7b`" in capsys.readouterr().err


def test_a_registered_adapter_of_another_profile_is_looked_up_by_the_run_and_the_pre_check(world, capsys):
    """The world's sft adapter (tiny-qwen2) named under HW=4090: the dry run opens no store and says the run takes the
    recorded base; the run's lookup takes it; the pre-check refuses a named model that is not that base."""
    ref = "zh-align-sft@candidate"
    assert evaluate.main(["--hw", "4090", "--set", f"adapter={ref}"]) == 0
    assert f"unless a model is named, the run takes the base {ref} records" in capsys.readouterr().out
    rebased = evaluate._on_adapter_base(resolve("evaluate", hw="4090", overrides=[("adapter", ref)]))
    assert rebased.model.name == rebased.cfg.model == "tiny-qwen2" and rebased.hw.name == "4090"
    assert evaluate.main(["--hw", "4090", "--set", f"adapter={ref}", "--set", "model=qwen2.5-7b-instruct",
                          "--check"]) == 2
    err = capsys.readouterr().err
    assert f"`adapter` '{ref}' is an adapter of base 'tiny-qwen2', but this evaluate's model is qwen2.5" in err
