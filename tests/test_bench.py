"""make bench on the CPU: the stage's real trainer and TRL's defaults on the tiny model, every field reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import bench
from pipeline.core.paths import ROOT
from pipeline.models import synthetic
from pipeline.stage.resolve import resolve

FIELDS = ("tokens_per_s", "step_s_median", "step_s_spread", "tokens_per_step", "mfu", "peak_rss_gib", "status")


@pytest.mark.parametrize("stage", ["sft", "orpo"])
def test_bench_reports_both_variants_and_the_ratio(stage, tmp_path, capsys):
    assert bench.main(["--hw", "cpu", "--stage", stage, "--steps", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    lines = [json.loads(x) for x in (tmp_path / "bench.jsonl").read_text(encoding="utf-8").splitlines()]
    baseline = "trl-defaults" if stage == "sft" else "trl-dpo-defaults"
    assert [x["variant"] for x in lines] == ["profile", baseline] == [x["variant"] for x in summary["results"]]
    for x in lines:
        assert x["status"] == "ok" and all(k in x for k in FIELDS) and x["steps_measured"] == 2
        assert x["tokens_per_s"] > 0 and x["tokens_per_step"] >= 4 * 900 * (1 if stage == "sft" else 2)
    profile = lines[0]
    assert profile["predicted_peak_gib"] > 0 and profile["checkpointing"] is False  # the cpu profile's settings
    assert summary["ratio_to_baseline"] == pytest.approx(lines[0]["tokens_per_s"] / lines[1]["tokens_per_s"], rel=1e-2)
    assert "ratio profile / baseline:" in printed and "tok/s" in printed


def test_row_lengths_follow_the_pool_and_stop_at_max_length(tmp_path):
    r = resolve("sft", hw="cpu")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"n_tokens": n}) + "\n" for n in (100, 300, 5000)),
                                        encoding="utf-8")
    drawn = synthetic.lengths(r, "sft", 50, tmp_path)
    assert set(drawn) == {100, 300, r.hw.max_length}
    assert synthetic.lengths(r, "sft", 3, None) == [r.hw.max_length] * 3


def test_a_synthetic_row_is_as_many_tokens_as_asked(tmp_path):
    r = resolve("sft", hw="cpu")
    tok = synthetic.word_tokenizer(r, tmp_path)
    (row,) = synthetic.synthetic_rows(r, "sft", 1, None)
    ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert len(ids) == r.hw.max_length and tok.unk_token_id not in ids[-50:]


def test_every_character_of_an_assistant_span_belongs_to_a_token(tmp_path):
    """TRL's training template marks the assistant turn from the newline after the role to the one after
    <|im_end|>; transformers 5.17 (on GPU machines) maps the span's first and last characters to tokens, and found
    none on the word tokenizer when it dropped newlines: an empty assistant mask, and the sft profile failed."""
    from transformers.utils.chat_template_utils import render_jinja_template
    from trl.chat_template_utils import get_training_chat_template

    tok = synthetic.word_tokenizer(resolve("sft", hw="cpu"), tmp_path)
    turns = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w100 w200"}]
    (text,), (spans,) = render_jinja_template(conversations=[turns], chat_template=get_training_chat_template(tok),
                                              return_assistant_tokens_mask=True)
    encoded = tok(text, add_special_tokens=False)
    assert spans and all(encoded.char_to_token(a) is not None and encoded.char_to_token(b - 1) is not None
                         for a, b in spans)
    masked = tok.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     chat_template=get_training_chat_template(tok))["assistant_masks"]
    assert sum(masked) == 5  # newline, w100, w200, <|im_end|>, newline


def test_variants_are_checked_and_a_qlora_profile_is_held_to_the_qlora_recipe(tmp_path, capsys):
    assert bench.main(["--hw", "cpu", "--variants", "profile,trl-fast", "--out", str(tmp_path)]) == 2
    assert "unknown --variants trl-fast; variants: profile, trl-defaults" in capsys.readouterr().err
    assert bench.baseline_of("sft", resolve("sft", hw="4090", overrides=[("hw.qlora", True)])) == "trl-qlora-recipe"
    assert bench.baseline_of("orpo", resolve("align", hw="4090", variant="orpo")) == "trl-dpo-defaults"


def test_the_bench_runs_where_mlflow_is_not_installed(tmp_path):
    """GPU machines may lack MLflow: the training path must not import it (only --log-mlflow does)."""
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "from pipeline import bench\n"
            f"sys.exit(bench.main(['--hw', 'cpu', '--stage', 'dpo', '--steps', '1', '--out', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(x)["status"] for x in (tmp_path / "bench.jsonl").read_text(encoding="utf-8").splitlines()] \
        == ["ok", "ok"]


def test_bench_gpu_runs_its_cases_and_judges_the_targets(tmp_path, monkeypatch):
    """tools/bench_gpu.py --cpu-check: two of its cases end to end on the cpu profile; the target rules by hand."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "tools" / "bench_gpu.py")
    bg = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bg)   # dataclasses look their module up
    spec.loader.exec_module(bg)
    assert bg.main(["--cpu-check", "--only", "sft-4090,orpo-4090", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench_gpu.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in results["cases"]] == ["sft-4090", "orpo-4090"]
    assert all(c["status"] == "exit 0" and c["summary"]["results"][0]["status"] == "ok" for c in results["cases"])
    assert results["environment"]["versions"]["trl"]

    def report(tps, reserved, allocated, ratio=None, mfu=None):
        return {"summary": {"ratio_to_baseline": ratio, "results": [
            {"variant": "profile", "status": "ok", "tokens_per_s": tps, "peak_reserved_gib": reserved,
             "peak_allocated_gib": allocated, "predicted_peak_gib": 20.0, "mfu": mfu}]}}

    sft, orpo = bg.CASES[0], bg.CASES[3]
    assert [t["result"] for t in bg.judge(sft, report(9000, 23.5, 20.0, ratio=1.3), {})] == ["met", "met"]
    assert [t["result"] for t in bg.judge(sft, report(9000, 24.5, 20.0, ratio=1.1), {})] == ["missed", "missed"]
    dpo = report(5000, 20, 19)
    assert bg.judge(orpo, report(4000, 22, 21), {"dpo-4090": dpo})[1]["result"] == "missed"
    cut = tmp_path / "cut"
    cut.mkdir()
    done = {"variant": "profile", "status": "ok", "tokens_per_s": 9.0, "hw": "4090", "model": "qwen2.5-7b-instruct"}
    (cut / "bench.jsonl").write_text(json.dumps(done) + "\n", encoding="utf-8")
    made = bg.finished(cut, sft)  # a timed-out case keeps what it measured, as a summary --log-results reads
    assert made["results"] == [done] and made["partial"] and made["stage"] == "sft" and made["mem_cap_gib"] == 24
    assert json.loads((cut / "summary.json").read_text(encoding="utf-8")) == made
    assert bg.finished(tmp_path / "none", sft) is None
    errored = {"case": "x", "status": "exit 0", "summary": {"results": [
        {"variant": "profile", "status": "oom"}, {"variant": "trl-defaults", "status": "error: RuntimeError: boom"}]}}
    assert bg.broken_cases([errored, {"case": "y", "status": "timeout"}]) == [
        ("x", "trl-defaults: error: RuntimeError: boom"), ("y", "timeout")]  # an OOM is a result, not a break
    assert bg.planner_check(report(1, 1, 25.0)) == {"predicted_gib": 20.0, "measured_gib": 25.0, "error": -0.2,
                                                    "within": False}


def test_results_from_a_machine_without_mlflow_are_logged_as_bench_runs_afterwards(tmp_path, mlflow_store, capsys):
    import mlflow

    out = tmp_path / "copied" / "sft-4090"
    assert bench.main(["--hw", "cpu", "--steps", "1", "--warmup", "0", "--variants", "profile", "--out", str(out)]) == 0
    assert bench.main(["--log-results", str(tmp_path / "copied")]) == 0
    assert "logged 1 bench run(s)" in capsys.readouterr().out
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'bench'", output_format="list")
    assert run.info.status == "FINISHED" and run.data.metrics["profile/tokens_per_s"] > 0
    assert run.data.params["variants.profile.status"] == "ok"
    assert bench.main(["--log-results", str(tmp_path / "nothing")]) == 1
    assert "no summary.json under" in capsys.readouterr().err
