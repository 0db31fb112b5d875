"""``make bench`` results as MLflow runs: one FINISHED `bench` run per summary, measured here (``--log-mlflow``) or on a
GPU machine without MLflow and logged afterwards (``--log-results DIR``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageError
from pipeline.core.paths import shown
from pipeline.tracking import runs


def log_run(summary: dict[str, Any], out: Path) -> str:
    """The results as a FINISHED `bench` run: each variant's numbers as metrics ``<variant>/<field>``, its settings and
    the device as params, the JSON files as artifacts; returns the run id."""
    results = summary["results"]
    config = {"bench": {k: v for k, v in summary.items() if k != "results"},
              "variants": {x["variant"]: {k: v for k, v in x.items() if not _number(v)} for x in results}}
    with runs.start_run("bench", config, hw=summary["hw"], model=summary["model"],
                        run_name=f"bench-{summary['stage']}-{summary['hw']}") as run:
        for x in results:
            runs.log_metrics({f"{x['variant']}/{k}": float(v) for k, v in x.items() if _number(v)})
        if summary.get("ratio_to_baseline") is not None:
            runs.log_metrics({"ratio_to_baseline": summary["ratio_to_baseline"]})
        runs.log_artifacts([f for f in (out / "bench.jsonl", out / "summary.json") if f.is_file()], "bench")
        return run.info.run_id


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def log_results(folder: Path) -> str:
    """Every ``summary.json`` under ``folder`` as a `bench` run (results measured where MLflow was not installed)."""
    found = sorted(folder.rglob("summary.json"))
    if not found:
        raise StageError(f"no summary.json under {shown(folder)}; give the --out folder of make bench or the OUT of "
                         f"make bench-gpu")
    ids = [log_run(json.loads(f.read_text(encoding="utf-8")), f.parent) for f in found]
    return f"logged {len(ids)} bench run(s) from {shown(folder)}: {', '.join(ids)}"
