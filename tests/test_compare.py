"""`make compare`: the table holds each run's own metrics (pipeline runs under the names the parent run copies from its
children, a single stage's run under its stage), the newest FINISHED pipeline runs by default, a chart and a `compare`
run with the files. The runs here are logged through MlflowClient with the metric names the pipeline writes; the
real pipeline run is compared in tests/test_pipeline.py."""

from __future__ import annotations

import csv
import time

import mlflow
import pytest

from pipeline import compare

PIPELINE = {"evaluate/eval/zh_smoke/acc": 0.5, "evaluate/delta/zh_smoke/acc": 0.125, "evaluate/eval/cmmlu/acc": 0.25,
            "evaluate/delta/cmmlu/acc": -0.03, "sft/tokens_per_second": 1234.5, "align/tokens_per_second": 987.0,
            "prepare/wall_seconds": 10.0, "sft/wall_seconds": 60.0, "align/wall_seconds": 40.0,
            "evaluate/wall_seconds": 20.0, "export/wall_seconds": 5.0, "export/merge.max_abs_logit_diff": 1e-6,
            "prepare/rows.sft": 120}


def _run(client, experiment_id: str, stage: str, metrics: dict, status: str = "FINISHED", name: str = "",
         losses: dict | None = None) -> str:
    run = client.create_run(experiment_id, run_name=name or f"{stage}-cpu", tags={"stage": stage, "model": "tiny-qwen2"})
    run_id = run.info.run_id
    for key, values in (losses or {}).items():  # a history: the table shows the last value
        for step, value in enumerate(values):
            client.log_metric(run_id, key, value, step=step)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    time.sleep(0.01)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def logged(module_store):
    """Pipeline runs (an old one, a FAILED one, a new one) and an sft run in this module's store."""
    client = mlflow.MlflowClient(f"sqlite:///{module_store / 'mlflow.db'}")
    exp = client.create_experiment("zh-align-module", artifact_location=str(module_store / "mlruns"))
    old = _run(client, exp, "pipeline", PIPELINE, name="old", losses={"sft/loss": [2.0, 1.5]})
    failed = _run(client, exp, "pipeline", PIPELINE, status="FAILED", name="failed")
    new = _run(client, exp, "pipeline", {**PIPELINE, "evaluate/eval/zh_smoke/acc": 0.75}, name="new",
               losses={"sft/loss": [1.9, 1.2], "align/loss": [0.9, 0.7]})
    sft = _run(client, exp, "sft", {"tokens_per_second": 2000.0}, losses={"loss": [2.5, 1.75]})
    return {"client": client, "old": old, "failed": failed, "new": new, "sft": sft}


def _table(path) -> dict[str, dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return {row["run_id"]: row for row in csv.DictReader(f)}


def test_the_newest_finished_pipeline_runs_with_their_own_metrics(logged, tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    table = _table(tmp_path / "out" / "compare.csv")
    assert list(table) == [logged["new"], logged["old"]]  # newest first; the FAILED run left out
    client = logged["client"]
    for run_id, row in table.items():
        metrics = client.get_run(run_id).data.metrics
        for key, value in metrics.items():
            column = key.removeprefix("evaluate/")
            if column in row:
                assert float(row[column]) == pytest.approx(value), (run_id, key)
        assert float(row["total/wall_seconds"]) == pytest.approx(135.0)
    assert float(table[logged["new"]]["sft/loss"]) == 1.2 and float(table[logged["old"]]["sft/loss"]) == 1.5
    assert table[logged["old"]]["align/loss"] == ""  # a metric the run does not have stays empty
    new = table[logged["new"]]
    assert float(new["eval/zh_smoke/acc"]) == 0.75 and float(new["delta/cmmlu/acc"]) == -0.03
    assert "export/merge.max_abs_logit_diff" not in row and "prepare/rows.sft" not in row  # not a compared number
    header = next(line for line in printed.splitlines() if line.startswith("| run"))
    assert header.index("eval/cmmlu/acc") < header.index("delta/cmmlu/acc") < header.index("align/loss") \
        < header.index("align/tokens_per_second") < header.index("align/wall_seconds")
    assert f"| {logged['new'][:8]} | new | pipeline |" in printed and "| 0.75 |" in printed
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "compare.md").read_text(encoding="utf-8").startswith("| run | name |")


def test_given_runs_mix_a_pipeline_and_a_stage_run_and_a_compare_run_keeps_the_files(logged, tmp_path, capsys):
    assert compare.main(["--runs", f"{logged['sft']} {logged['old']}", "--out", str(tmp_path)]) == 0
    table = _table(tmp_path / "compare.csv")
    assert list(table) == [logged["sft"], logged["old"]]
    sft = table[logged["sft"]]
    assert float(sft["sft/loss"]) == 1.75 and float(sft["sft/tokens_per_second"]) == 2000
    assert float(sft["sft/wall_seconds"]) >= 0 and sft["eval/zh_smoke/acc"] == ""
    client = logged["client"]
    run = client.get_run(capsys.readouterr().out.rsplit("logged as run ", 1)[1].strip())
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "compare"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "compare")}
    assert {"compare/compare.csv", "compare/compare.md", "compare/compare.png"} <= files


def test_no_runs_or_an_unknown_run_is_named(logged, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "zh-align-empty")
    assert compare.main(["--out", str(tmp_path)]) == 1
    assert "no FINISHED pipeline run in experiment zh-align-empty" in capsys.readouterr().err
    assert compare.main(["--runs", "0" * 32, "--out", str(tmp_path)]) == 1
    assert f"run '{'0' * 32}' is not in" in capsys.readouterr().err
    assert compare.main(["--last", "0"]) == 2
