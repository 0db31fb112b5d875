"""The whole chain on the tiny model: prepare → sft → orpo → evaluate → export as five FINISHED child runs of one
parent, linked by run id; the merged model pulled from the registry gives the logits logged at export; a re-run of a
finished run comes out identical; resume reuses unchanged children; and the errors of pull and rerun."""

from __future__ import annotations

import json
import os
import re

import mlflow
import pytest

from pipeline import pipeline as chain_stage
from pipeline import registry, rerun
from pipeline.core.errors import ConfigError, StageError
from pipeline.core.strict import parse_overrides
from pipeline.stage.spec import names
from pipeline.training import probes

STAGES = names()

FAST = ["hw.micro_batch=4", "hw.grad_accum=1", "train.max_steps=3", "train.logging_steps=1", "train.eval_steps=100",
        "train.save_steps=100"]


@pytest.fixture(scope="module")
def chained(module_store):
    """One real pipeline run, its children launched through `mlflow run`, everything under this module's tmp folder."""
    tmp = module_store
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)  # the experiment's artifact root (./mlruns) lands here, not in the repository
    mp.setenv("ZH_ALIGN_EVAL_CACHE", str(tmp / "eval-base"))
    outputs = [f"{s}.output_dir={tmp / 'out' / s}" for s in STAGES]
    c = chain_stage.chain("cpu", parse_overrides([*FAST, *outputs]), {"align": "orpo"})
    result = chain_stage.run(c)
    yield {"tmp": tmp, "result": result, "client": mlflow.MlflowClient(), "overrides": [*FAST, *outputs]}
    mp.undo()


def test_five_finished_children_of_one_parent_linked_by_run_id(chained):
    client, result = chained["client"], chained["result"]
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "pipeline"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    by_stage = {run.data.tags["stage"]: run for run in children}
    assert sorted(by_stage) == sorted(STAGES) and len(children) == 5
    assert all(run.info.status == "FINISHED" for run in children)
    ids = {s: by_stage[s].info.run_id for s in STAGES}
    assert {s: parent.data.tags[f"child.{s}"] for s in STAGES} == ids
    assert by_stage["sft"].data.params["data.run_id"] == ids["prepare"]
    assert by_stage["align"].data.params["data.run_id"] == ids["prepare"]
    assert by_stage["align"].data.tags["start_from.run_id"] == ids["sft"]
    assert by_stage["evaluate"].data.tags["eval.target_run_id"] == ids["align"]
    merged = client.get_model_version_by_alias("zh-align-merged", "candidate")
    assert merged.run_id == ids["export"]
    orpo = client.get_model_version(*merged.tags["adapter"].removeprefix("models:/").split("/"))
    assert orpo.run_id == ids["align"] and orpo.tags["eval.gate"] in ("pass", "fail")
    assert merged.tags["data.run_id"] == ids["prepare"] and merged.tags["eval.gate"] == orpo.tags["eval.gate"]


def test_evaluate_gates_the_sft_adapter_too_and_reports_base_sft_aligned(chained):
    """evaluate judges the sft child's adapter beside the align child's: scores and CSV on the sft training run, a gate
    on its registered version, and a forgetting report that reads base → sft → aligned per task group."""
    client, ids = chained["client"], chained["result"].children
    evaluation = client.get_run(ids["evaluate"])
    assert evaluation.data.tags["eval.earlier_run_id"] == ids["sft"]
    assert evaluation.data.tags["earlier.eval.gate"] in ("pass", "fail")
    assert {"earlier/eval/zh_smoke/acc", "earlier/delta/zh_smoke/acc", "eval/zh_smoke/acc"} <= set(evaluation.data.metrics)
    sft_run = client.get_run(ids["sft"])
    assert sft_run.data.metrics["eval/zh_smoke/acc"] == evaluation.data.metrics["earlier/eval/zh_smoke/acc"]
    assert "eval/results.csv" in {a.path for a in client.list_artifacts(ids["sft"], "eval")}
    assert sft_run.data.tags["eval.gate"] == evaluation.data.tags["earlier.eval.gate"]
    (sft_version,) = client.search_model_versions(f"run_id = '{ids['sft']}'")
    assert sft_version.tags["eval.gate"] == evaluation.data.tags["earlier.eval.gate"]
    assert "eval.zh_smoke.acc" in sft_version.tags
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{ids['evaluate']}/eval/forgetting.json"))
    assert [(g["model"], g["source"]) for g in report["gates"]] == [
        ("earlier", f"models:/zh-align-sft/{sft_version.version}"), ("adapter", evaluation.data.tags["eval.target"])]
    (group,) = report["chain"]
    assert group["group"] == "zh_smoke" and [m["model"] for m in group["models"]] == ["earlier", "adapter"]
    assert group["models"][0]["acc"] == pytest.approx(evaluation.data.metrics["earlier/eval/zh_smoke/acc"])
    assert group["models"][1]["delta"] == pytest.approx(evaluation.data.metrics["delta/zh_smoke/acc"])
    rows = mlflow.artifacts.load_text(f"runs:/{ids['evaluate']}/eval/forgetting.csv").splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["base", "earlier", "adapter"]


def test_the_parent_carries_the_children_metrics_and_a_summary(chained):
    client, result = chained["client"], chained["result"]
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["prepare/rows.sft"] > 0 and metrics["sft/wall_seconds"] > 0
    assert {"sft/loss", "align/loss", "evaluate/eval/zh_smoke/acc", "evaluate/delta/zh_smoke/acc",
            "export/merge.max_abs_logit_diff"} <= set(metrics)
    summary = result.summary
    assert [c["status"] for c in summary["children"].values()] == ["FINISHED"] * 5
    assert summary["children"]["export"]["registered"][0].startswith("zh-align-merged/")
    assert set(summary["eval"]) == {"zh_smoke/acc", "zh_smoke/acc_norm"}
    assert set(summary["earlier"]["eval"]) == {"zh_smoke/acc", "zh_smoke/acc_norm"}
    assert "evaluate/earlier/eval/zh_smoke/acc" in metrics
    text = chain_stage.describe(result)
    assert "make pull MODEL=zh-align-merged@candidate" in text and "forgetting gate" in text
    gates = {s: next(iter(summary["children"][s]["gates"].values())) for s in ("sft", "align", "export")}
    assert set(gates.values()) <= {"pass", "fail"}  # both adapters gated; the merged model carries align's gate
    assert re.search(rf"zh-align-sft/\d+@candidate \(gate {gates['sft']}\)", text)
    assert "earlier adapter models:/zh-align-sft/" in text


def test_compare_tables_the_real_pipeline_run_with_its_own_metrics(chained, capsys):
    import csv

    from pipeline import compare

    out = chained["tmp"] / "compare"
    assert compare.main(["--runs", chained["result"].run_id, "--out", str(out)]) == 0
    with open(out / "compare.csv", encoding="utf-8") as f:
        (row,) = csv.DictReader(f)
    metrics = chained["client"].get_run(chained["result"].run_id).data.metrics
    for key in ("evaluate/eval/zh_smoke/acc", "evaluate/delta/zh_smoke/acc", "sft/loss", "align/loss",
                "sft/tokens_per_second", "align/tokens_per_second", "export/wall_seconds"):
        assert float(row[key.removeprefix("evaluate/")]) == pytest.approx(metrics[key]), key
    assert float(row["total/wall_seconds"]) == pytest.approx(sum(metrics[f"{s}/wall_seconds"] for s in STAGES))
    assert chained["result"].run_id[:8] in capsys.readouterr().out


def test_pull_of_the_merged_model_reproduces_the_logits_logged_at_export(chained, capsys):
    dest = chained["tmp"] / "pulled"
    assert registry.main(["pull", "--model", "zh-align-merged@candidate", "--dest", str(dest), "--hw", "cpu",
                          "--verify"]) == 0
    assert "verified: max |logit − logged at export|" in capsys.readouterr().out
    assert probes.check_probe_logits(dest) <= 1e-5
    record = json.loads((dest / probes.PROBE_FILE).read_text(encoding="utf-8"))
    assert any("你" in t for t in record["texts"]) and len(record["top_ids"][0]) == probes.TOP_K
    record["top_logits"][0][0] += 1.0  # a folder that is not the exported model is caught
    (dest / probes.PROBE_FILE).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(StageError, match="differ from those logged at export"):
        probes.check_probe_logits(dest)


def test_pull_refuses_an_adapter_of_another_base_naming_both(chained, capsys):
    """A model named (`SET="model=…"`) that is not the adapter's base: refused, naming both; none named: the adapter's
    recorded base, whatever HW's model is."""
    dest = chained["tmp"] / "pulled-adapter"
    assert registry.main(["pull", "--model", "zh-align-sft@candidate", "--dest", str(dest), "--hw", "4090",
                          "--set", "model=qwen2.5-7b-instruct"]) == 1
    err = capsys.readouterr().err
    assert "adapter of base 'tiny-qwen2'" in err and "Qwen/Qwen2.5-7B-Instruct" in err
    assert not dest.exists()  # refused before anything was written
    assert registry.main(["pull", "--model", "zh-align-sft@candidate", "--dest", str(dest), "--hw", "4090"]) == 0
    assert (dest / "adapter_config.json").is_file()


def test_rerun_of_the_sft_child_gives_the_identical_adapter(chained, capsys):
    sft_id = chained["result"].children["sft"]
    assert rerun.main(["--run-id", sft_id, "--out", str(chained["tmp"] / "rerun")]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^  {name}\s+identical$", out, re.M) for name in ("data_pool", "weights", "verdict"))
    client = chained["client"]
    (new,) = client.search_runs([client.get_run(sft_id).info.experiment_id],
                                filter_string=f"tags.rerun_of = '{sft_id}'")
    assert new.data.tags["rerun.weights"] == "true" and new.info.status == "FINISHED"
    assert client.get_model_version_by_alias("zh-align-sft", "rerun").run_id == new.info.run_id
    assert client.get_model_version_by_alias("zh-align-sft", "candidate").run_id == sft_id  # candidate stays


def test_rerun_of_the_evaluate_child_gives_the_same_scores_and_leaves_the_training_run_alone(chained, capsys):
    client, children = chained["client"], chained["result"].children
    history = client.get_metric_history(children["align"], "eval/zh_smoke/acc")
    assert rerun.main(["--run-id", children["evaluate"], "--out", str(chained["tmp"] / "rerun")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  scores\s+identical$", out, re.M) and "write_back off" in out
    assert "adapter pinned to zh-align-orpo/" in out and "earlier pinned to zh-align-sft/" in out
    assert len(client.get_metric_history(children["align"], "eval/zh_smoke/acc")) == len(history) == 1
    assert len(client.get_metric_history(children["sft"], "eval/zh_smoke/acc")) == 1


def test_rerun_of_the_pipeline_runs_the_chain_again_and_every_stage_comes_out_identical(chained, capsys):
    result, client = chained["result"], chained["client"]
    assert rerun.main(["--run-id", result.run_id, "--out", str(chained["tmp"] / "rerun")]) == 0
    out = capsys.readouterr().out
    for check in ("prepare.data_manifest", "sft.weights", "align.weights", "align.final_loss", "evaluate.scores",
                  "export.weights", "verdict"):
        assert re.search(rf"^  {re.escape(check)}\s+identical$", out, re.M), check
    (new,) = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                filter_string=f"tags.rerun_of = '{result.run_id}'")
    assert new.data.tags["stage"] == "pipeline" and new.data.tags["rerun.export.weights"] == "true"
    assert client.get_run(new.data.tags["child.sft"]).data.tags["rerun_of"] == result.children["sft"]
    assert str(chained["tmp"] / "rerun" / result.run_id / "sft") in \
        client.get_run(new.data.tags["child.sft"]).data.params["config.output_dir"]
    assert client.get_model_version_by_alias("zh-align-merged", "candidate").run_id == result.children["export"]


def test_rerun_refuses_an_unknown_run_and_a_changed_pool(chained, capsys):
    result = chained["result"]
    out = ["--out", str(chained["tmp"] / "rerun")]
    assert rerun.main(["--run-id", "0" * 32, "--dry-run", *out]) == 1
    assert "is not in sqlite:///" in capsys.readouterr().err
    pool = chained["tmp"] / "out" / "prepare" / "pref.jsonl"
    original = pool.read_bytes()
    try:
        pool.write_bytes(original + b"\n")
        manifest = pool.with_name("manifest.json")
        m = json.loads(manifest.read_text(encoding="utf-8"))
        saved = m["outputs"]["pref.jsonl"]["sha256"]
        m["outputs"]["pref.jsonl"]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(m), encoding="utf-8")
        assert rerun.main(["--run-id", result.children["align"], "--dry-run", *out]) == 1
        err = capsys.readouterr().err
        assert "now has sha256 000000000000…" in err and f"trained on {saved[:12]}" in err
    finally:
        pool.write_bytes(original)
        m["outputs"]["pref.jsonl"]["sha256"] = saved
        manifest.write_text(json.dumps(m), encoding="utf-8")


def test_dry_run_prints_every_stage_with_the_links_and_a_bad_key_stops_it(capsys):
    assert chain_stage.main(["--hw", "cpu", "--loss", "dpo"]) == 0
    page = capsys.readouterr().out
    assert [line.split()[1] for line in page.splitlines() if line.startswith("━━")] == ["pipeline", *STAGES]
    assert "align ← data.run_id=prepare, start_from=sft" in page and "LOSS=dpo" in page
    assert "evaluate ← adapter=align, earlier=sft" in page and "base → earlier → tuned" in page
    assert "start_from: <run id of the sft child>" in page
    assert chain_stage.main(["--hw", "cpu", "--set", "sft.lora.rr=8"]) == 2
    assert "`lora.rr`" in capsys.readouterr().err


def test_children_get_their_links_and_launch_choices():
    c = chain_stage.chain("cpu", [("train.max_steps", 3)], {"align": "dpo"}, accel="ddp")
    ids = {"prepare": "p1", "sft": "s1", "align": "a1"}
    align = c.parameters("align", ids)
    assert align["loss"] == "dpo" and align["accel"] == "ddp" and align["dry_run"] == "false"
    assert align["overrides"].split() == ["train.max_steps=3", "data.run_id=p1", "start_from=s1"]
    assert c.parameters("export", ids)["overrides"] == "adapter=a1" and "accel" not in c.parameters("export", ids)
    with pytest.raises(ConfigError, match="no stage has a key `lora_r`"):
        chain_stage.chain("cpu", [("lora_r", 8)], {})
    assert os.environ.get("MLFLOW_RUN_ID") is None


def test_a_failed_child_fails_the_parent_naming_the_stage_and_its_run(mlflow_store, tmp_path, capsys):
    c = chain_stage.chain("cpu", parse_overrides([f"prepare.output_dir={tmp_path / 'data'}",
                                                  "prepare.filters.min_chars=100000"]), {})
    with pytest.raises(StageError, match=r"stage prepare failed \(child run [0-9a-f]{32}, FAILED\)"):
        chain_stage.run(c)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("zh-align-test").experiment_id])
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FAILED" and child.info.status == "FAILED"
    assert child.data.tags["stage"] == "prepare" and child.info.run_id in parent.data.tags["error"]
    assert "sft" not in {r.data.tags["stage"] for r in runs}  # nothing after the failed stage started
    assert rerun.main(["--run-id", parent.info.run_id, "--dry-run", "--out", str(tmp_path / "rerun")]) == 1
    assert "is FAILED; only FINISHED runs are re-run (continue a failed or killed one with `make pipeline RESUME=<id>`)" in \
        capsys.readouterr().err


def test_resume_reuses_the_unchanged_children_and_runs_the_changed_stage(chained, capsys):
    earlier = chained["result"]
    c = chain_stage.chain("cpu", parse_overrides([*chained["overrides"], "export.logits_tolerance=1e-3"]), {"align": "orpo"},
                          resume=earlier.run_id)
    again = chain_stage.run(c)
    assert {s: again.children[s] for s in STAGES[:4]} == {s: earlier.children[s] for s in STAGES[:4]}
    assert again.children["export"] != earlier.children["export"]
    client = chained["client"]
    run = client.get_run(again.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == earlier.run_id
    assert {k for k in run.data.tags if k.startswith("reused.")} == {f"reused.{s}" for s in STAGES[:4]}
    assert client.get_run(again.children["export"]).data.params["overrides"].endswith(
        f"logits_tolerance=1e-3 adapter={earlier.children['align']}'")
    assert "(reused from the resumed run)" in capsys.readouterr().out
    with pytest.raises(StageError, match="that is a sft run, not a pipeline run"):
        chain_stage.run(chain_stage.chain("cpu", [], {}, resume=earlier.children["sft"]))
