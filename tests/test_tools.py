"""The developer harnesses in tools/ still run against the package: gpu_smoke's CPU check, bench_data on a few rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.core.paths import ROOT


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZH_ALIGN_EVAL_CACHE": str(tmp_path / "eval-cache")}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_smoke_cpu_check_trains_and_aligns_through_the_stages(tmp_path):
    done = _run(["tools/gpu_smoke.py", "--cpu-check", "--out", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text(encoding="utf-8"))
    assert report["ok"] and set(report["cases"]) == {"lora_bf16", "dpo"}
    for case in report["cases"].values():
        assert all(case["checks"].values()) and case["run"]["status"] == "FINISHED"


def test_bench_data_cleans_like_the_naive_loop_and_counts_tokens_like_encode_batch(tmp_path):
    out = tmp_path / "bench.json"
    done = _run(["tools/bench_data.py", "--rows", "2000", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["rows"] == 2000 and report["targets"]["same_rows_as_naive"]["pass"]
    assert report["cleaning_path"]["kept"] == report["naive"]["kept"] > 0
    tokens, e2e = report["token_pass"], report["end_to_end"]
    assert tokens["rows"] == report["cleaning_path"]["kept"] and tokens["same_lengths"]
    assert tokens["tokens"] > 100 * tokens["rows"]  # the system prompt alone is 60 of Qwen2.5's tokens
    assert tokens["stage"]["rows_per_s"] > 0 and tokens["bare"]["tokens_per_s"] > 0
    assert e2e["rows"] == 2000 and e2e["outputs"]["sft.jsonl"] > 1000 and e2e["outputs"]["pref.jsonl"] > 100
    assert e2e["peak_rss"]["all_pss"] > 0 and set(report["targets"]) >= {"token_ratio", "e2e_seconds_per_1m",
                                                                         "e2e_peak_pss_all", "e2e_peak_rss_all"}
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cores_usable"] >= 1 and machine["versions"]["tokenizers"]
    assert "tools/bench_data.py --rows 2000" in machine["command"] and machine["date"].startswith("20")
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    assert any("PASS" in x or "FAIL" in x for x in lines) and len(lines) < 80  # no progress-bar lines in the log


def test_the_memory_sampler_keeps_to_its_share_of_a_core(monkeypatch):
    import time

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import bench_data

    with bench_data.peak_memory(every=0.0, share=0.05) as peak:  # every=0: without the share it would spin
        time.sleep(1.0)
    assert peak["main"] > 0 and peak["all_pss"] > 0
    assert peak["sampler_cpu_s"] <= 0.05 * 1.0 + 0.05  # its share of the second, and one sample over


def test_gpu_box_pins_the_tested_versions_and_refuses_to_run_without_its_wheels(tmp_path):
    """tools/gpu_box.sh carries the versions constraints.txt pins (the ones the CPU tests ran), and says what to do
    when the wheels did not travel."""
    import re

    script = (ROOT / "tools" / "gpu_box.sh").read_text(encoding="utf-8")
    pins = dict(re.findall(r"^(trl|datasets|bitsandbytes|liger-kernel)==([\w.]+)", (ROOT / "constraints.txt")
                           .read_text(encoding="utf-8"), re.M))
    assert len(pins) == 4 and all(f"{name}=={version}" in script for name, version in pins.items())
    env = {**os.environ, "WHEELS": str(tmp_path / "none")}
    done = subprocess.run(["bash", "tools/gpu_box.sh", "bench", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "run 'bash tools/gpu_box.sh wheels' first and carry it" in done.stderr
    usage = subprocess.run(["bash", "tools/gpu_box.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "bash tools/gpu_box.sh bench [OUT]" in usage.stderr
