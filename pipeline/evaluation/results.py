"""lm-eval's results as this project reports them: scores by ``<task>/<metric>``, CSV rows, the JSON-safe results and
per-item samples written to the output folder, task groups with their leaf tasks, per-item correctness for the
forgetting gate, and the chart of the base and each judged model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.core.resolved import Resolved


def jsonable(results: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: results[k] for k in ("results", "groups", "group_subtasks", "n-samples",
                                                           "samples", "versions", "n-shot", "configs")
                                  if k in results}, default=str))


def metric(key: str) -> str | None:
    """`acc,none` → `acc`; `acc,flt` → `acc_flt`; stderr and alias keys → None."""
    if "," not in key or "_stderr" in key:
        return None
    name, filt = key.split(",", 1)
    return name if filt == "none" else f"{name}_{filt}"


def scores(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            name = metric(key)
            if name and isinstance(value, (int, float)):
                out[f"{task}/{name}"] = float(value)
    return out


def csv_rows(results: dict[str, Any], r: Resolved, adapter: str) -> list[dict[str, Any]]:
    """One row per task and metric, with the settings that moved the score."""
    cfg = r.cfg
    rows = []
    for task, values in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in values.items():
            name = metric(key)
            if name and isinstance(value, (int, float)):
                stderr = values.get(key.replace(",", "_stderr,", 1))
                rows.append({"task": task, "metric": name, "value": value,
                             "stderr": stderr if isinstance(stderr, (int, float)) else "", "n": n or "",
                             "model": r.model.ref, "adapter": adapter, "fewshot": cfg.num_fewshot,
                             "chat_template": cfg.apply_chat_template})
    return rows


def write(out: Path, results: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    res = jsonable(results)
    samples = res.pop("samples", {})
    (out / "results.json").write_text(json.dumps(res, ensure_ascii=False, indent=2), encoding="utf-8")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for task, items in samples.items():
            for item in items:
                f.write(json.dumps({"task": task, **item}, ensure_ascii=False, default=str) + "\n")
    write_csv(out / "results.csv", rows)
    return [out / "results.json", out / "results.csv", out / "samples.jsonl"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def groups(results: dict[str, Any]) -> dict[str, list[str]]:
    """Task group → its leaf tasks (a task outside any group is its own group)."""
    subtasks = results.get("group_subtasks", {})
    leaves = {t for subs in subtasks.values() for t in subs}
    groups = {g: [t for t in subs if t not in subtasks] or [g] for g, subs in subtasks.items() if g not in leaves}
    for task in results.get("results", {}):
        if task not in leaves and task not in groups:
            groups[task] = [task]
    return groups


def items(results: dict[str, Any], tasks: list[str]) -> dict[Any, float]:
    """(task, doc_id) → 1/0 correctness from lm-eval's logged samples."""
    out = {}
    for task in tasks:
        for s in results.get("samples", {}).get(task, []):
            if "acc" in s:
                out[(task, s["doc_id"])] = float(s["acc"])
    return out


def chart(out: Path, chain: list[Any]) -> Path:
    """Accuracy per task group: the base, then each judged model of the chain (``forgetting.Verdict``) in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [p.group for p in chain[-1].pairs]
    series = [("base", {p.group: p.base_acc for p in chain[-1].pairs})]
    series += [(v.label, {p.group: p.tuned_acc for p in v.pairs}) for v in chain]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(series) * len(groups)), 3.5))
    for i, (label, acc) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))],
               [acc.get(g, 0.0) for g in groups], width=width, label=label)
    p_values = {p.group: p.p_value for p in chain[-1].pairs}
    ax.set_xticks(list(range(len(groups))), [f"{g}\np={p_values[g]:.2g}" for g in groups], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(" → ".join(label for label, _ in series) + " per task group")
    ax.legend()
    fig.tight_layout()
    path = out / "base_vs_tuned.png"
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
