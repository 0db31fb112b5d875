"""bench_gpu: every profile's speed and memory on one H100/H200, against its baseline and the planner, in ≤ 8 minutes.

A developer harness (``tools/``, not part of the package): ``make bench-gpu OUT=dir`` =
``python tools/bench_gpu.py --out DIR [--budget-s 470] [--only name,…] [--cpu-check]``.

It runs ``python -m pipeline.bench`` once per case below, each in its own process (a clean CUDA allocator, and one
case's crash or OOM leaves the others running), in priority order, each case's variants in priority order too; a
case that would start after the budget is reported as skipped. Every case's ``summary.json`` lands in
``DIR/<case>/``, and ``DIR/bench_gpu.json`` gathers them with the targets of issue 14 met or missed and the planner's
predicted peak beside each measured one. Imports stay lean (torch, transformers, peft, trl, datasets; bitsandbytes
for the QLoRA case, liger-kernel for the Liger profiles; no MLflow), so the wheels can travel to a machine without a
network. ``--cpu-check`` runs the same cases on the cpu profile with the tiny model for one step (QLoRA and the caps
left out), so the harness is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLANNER_TOLERANCE = 0.15


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    hw: str
    cap: float | None                      # GiB: the card the profile is for, emulated on the big one
    sets: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()         # default: the profile, then its baseline
    targets: tuple[str, ...] = field(default=())


CASES = (
    Case("sft-4090", "sft", "4090", 24, targets=("fits", "ratio>=1.25")),
    # QLoRA for the small footprint: every layer recomputes (auto would spend the 24 GiB on speed instead)
    Case("sft-4090-qlora", "sft", "4090", 24, ("hw.qlora=true", "hw.checkpoint_layers=null"),
         targets=("reserved<=10", "ratio>=2")),
    Case("dpo-4090", "dpo", "4090", 24, targets=("fits", "ratio>=1.25")),
    Case("orpo-4090", "orpo", "4090", 24, variants=("profile",), targets=("fits", "tok/s>=dpo-4090")),
    Case("sft-5090", "sft", "5090", 32, targets=("fits",)),
    Case("sft-h100", "sft", "h100", None, variants=("profile",), targets=("mfu>=0.45",)),
)


def run_case(case: Case, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder = out / case.name
    cmd = [sys.executable, "-m", "pipeline.bench", "--stage", case.stage, "--out", str(folder)]
    if args.cpu_check:
        cmd += ["--hw", "cpu", "--steps", "1", "--warmup", "0"]
    else:
        cmd += ["--hw", case.hw, *(["--mem-cap-gib", str(case.cap)] if case.cap else [])]
        for s in case.sets:
            cmd += ["--set", s]
    if case.variants:
        cmd += ["--variants", ",".join(case.variants)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.case_timeout_s)
        status, tail = f"exit {proc.returncode}", (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as err:
        status, tail = f"timed out after {args.case_timeout_s} s", str(err.stdout or "")[-2000:]
    summary = finished(folder, case)
    return {"case": case.name, "command": " ".join(cmd[1:]), "status": status, "wall_s": round(time.perf_counter() -
            start, 1), "summary": summary, "tail": tail if status != "exit 0" else ""}


def finished(folder: Path, case: Case) -> dict[str, Any] | None:
    """A case's summary.json; for a case cut short (timed out, crashed), one made of the variants it finished — the
    lines bench.jsonl gets as each ends — and written beside them, so `--log-results` takes it too (no ratio: the
    baseline may be missing)."""
    summary, lines = folder / "summary.json", folder / "bench.jsonl"
    if summary.is_file():
        return json.loads(summary.read_text(encoding="utf-8"))
    results = [json.loads(x) for x in lines.read_text(encoding="utf-8").splitlines() if x] if lines.is_file() else []
    if not results:
        return None
    made = {"stage": case.stage, "hw": results[0]["hw"], "model": results[0]["model"], "mem_cap_gib": case.cap,
            "data": None, "ratio_to_baseline": None, "partial": True, "results": results}
    summary.write_text(json.dumps(made, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return made


def profile_result(report: dict[str, Any]) -> dict[str, Any]:
    summary = report.get("summary") or {}
    return next((x for x in summary.get("results", []) if x["variant"] == "profile"), {})


def judge(case: Case, report: dict[str, Any], reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the case: met, missed (by how much) or not measured."""
    ours = profile_result(report)
    ratio = (report.get("summary") or {}).get("ratio_to_baseline")
    out = []
    for target in case.targets:
        measured, wanted = None, None
        if target == "fits":
            measured, wanted = ours.get("peak_reserved_gib"), case.cap
            met = ours.get("status") == "ok" and measured is not None and measured <= wanted
        elif target.startswith("reserved<="):
            measured, wanted = ours.get("peak_reserved_gib"), float(target.split("<=")[1])
            met = measured is not None and measured <= wanted
        elif target.startswith("ratio>="):
            measured, wanted = ratio, float(target.split(">=")[1])
            met = measured is not None and measured >= wanted
        elif target.startswith("mfu>="):
            measured, wanted = ours.get("mfu"), float(target.split(">=")[1])
            met = measured is not None and measured >= wanted
        else:  # tok/s>=<other case>: the profile at least as fast as the other case's profile
            other = profile_result(reports.get(target.split(">=")[1], {}))
            measured, wanted = ours.get("tokens_per_s"), other.get("tokens_per_s")
            met = measured is not None and wanted is not None and measured >= wanted
        out.append({"target": target, "measured": measured, "wanted": wanted,
                    "result": "met" if met else "not measured" if measured is None else "missed"})
    return out


def planner_check(report: dict[str, Any]) -> dict[str, Any] | None:
    ours = profile_result(report)
    measured, predicted = ours.get("peak_allocated_gib"), ours.get("predicted_peak_gib")
    if not measured or not predicted:
        return None
    error = (predicted - measured) / measured
    return {"predicted_gib": predicted, "measured_gib": measured, "error": round(error, 3),
            "within": abs(error) <= PLANNER_TOLERANCE}


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench-gpu", help="folder for the results")
    parser.add_argument("--budget-s", type=float, default=470, help="no case starts after this many seconds")
    parser.add_argument("--case-timeout-s", type=float, default=150, help="a case running longer is stopped")
    parser.add_argument("--only", default="", help="comma-separated case names (default: all, in order)")
    parser.add_argument("--cpu-check", action="store_true", help="the cases on the cpu profile, one step each")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in CASES if not args.only or c.name in args.only.split(",")]
    if args.cpu_check:
        chosen = [Case(c.name, c.stage, c.hw, c.cap, (), c.variants, c.targets) for c in chosen]
    start, reports, results = time.perf_counter(), {}, {"environment": environment(), "cases": []}
    for case in chosen:
        if time.perf_counter() - start > args.budget_s:
            results["cases"].append({"case": case.name, "status": f"skipped: past the {args.budget_s:g} s budget"})
            continue
        report = run_case(case, out, args)
        reports[case.name] = report
        report["targets"], report["planner"] = judge(case, report, reports), planner_check(report)
        results["cases"].append(report)
        (out / "bench_gpu.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(line(report), flush=True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "bench_gpu.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"{len(reports)} of {len(chosen)} cases in {results['wall_s']:.0f} s; results in {out / 'bench_gpu.json'}")
    broken = broken_cases(reports.values())
    for name, why in broken:
        print(f"BROKEN {name}: {why}", file=sys.stderr)
    return 1 if broken else 0  # an OOM is a result; a crash or an error in a variant is a bug to fix first


def broken_cases(reports: Any) -> list[tuple[str, str]]:
    """(case, why) for every case whose process failed or whose variant ended in an error (not an OOM)."""
    broken = []
    for report in reports:
        if report["status"] != "exit 0":
            broken.append((report["case"], report["status"]))
        for result in (report.get("summary") or {}).get("results", []):
            if result["status"].startswith("error"):
                broken.append((report["case"], f"{result['variant']}: {result['status'][:300]}"))
    return broken


def line(report: dict[str, Any]) -> str:
    ours = profile_result(report)
    targets = "; ".join(f"{t['target']} {t['result']} ({t['measured']})" for t in report["targets"])
    planned = report["planner"]
    planner = f"planner {planned['error']:+.0%}" if planned else "planner -"
    return (f"{report['case']:<16} {report['status']:<10} {report['wall_s']:>6.0f} s  "
            f"{ours.get('tokens_per_s', '-')} tok/s  {planner}  {targets}")


if __name__ == "__main__":
    sys.exit(main())
