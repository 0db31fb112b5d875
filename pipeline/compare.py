"""compare: `make compare` — runs side by side: eval scores, deltas against the base, final loss, tokens/s, wall time.

``python -m pipeline.compare [--runs "ID ID …"] [--last N] [--out DIR]``
Without ``--runs``: the newest N (5) FINISHED pipeline runs of the experiment. A pipeline run is read from the metrics
its parent run copied from its children (``evaluate/eval/…``, ``evaluate/delta/…``, ``sft/loss``,
``align/tokens_per_second``, ``<stage>/wall_seconds``); a single stage's run (an sft, align or evaluate run) from its
own metrics under its stage's name. Writes ``compare.csv``, ``compare.md`` and ``compare.png`` into DIR
(``outputs/compare``), logs them as artifacts of a small `compare` run and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path, shown
from pipeline.stage.cli import guarded, setup_logging
from pipeline.tracking import lineage, runs

LAST = 5
# the column groups, in table order: (title, what a column name starts with, what it ends with)
GROUPS = (("eval score", "eval/", ""), ("Δ vs base", "delta/", ""), ("final loss", "", "/loss"),
          ("tokens/s", "", "/tokens_per_second"), ("wall s", "", "/wall_seconds"))


@dataclass
class Row:
    run_id: str
    name: str
    kind: str                      # pipeline, or the stage of a single run
    started: str
    values: dict[str, float]       # column → value


def read(run_id: str) -> Row:
    """One run's comparable numbers, under the names a pipeline's parent run uses."""
    run = runs.get_run(run_id)
    stage = run.data.tags.get("stage", "")
    m = dict(run.data.metrics)
    if stage == "pipeline":
        values = {k.removeprefix("evaluate/"): v for k, v in m.items() if k.startswith(("evaluate/eval/",
                                                                                      "evaluate/delta/"))}
        values.update({k: v for k, v in m.items() if k.endswith(("/loss", "/tokens_per_second", "/wall_seconds"))
                       and k.count("/") == 1})
    elif stage:
        values = {k: v for k, v in m.items() if k.startswith(("eval/", "delta/"))}
        values.update({f"{stage}/{k}": v for k, v in m.items() if k in ("loss", "tokens_per_second")})
        if run.info.end_time:
            values[f"{stage}/wall_seconds"] = (run.info.end_time - run.info.start_time) / 1000
    else:
        raise StageError(f"run {run_id} has no `stage` tag: it was not made by this project; give pipeline or stage "
                         f"run ids")
    walls = [v for k, v in values.items() if k.endswith("/wall_seconds")]
    if walls:
        values["total/wall_seconds"] = sum(walls)
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    return Row(run_id, run.info.run_name or "", stage, started, {k: float(v) for k, v in values.items()})


def columns(rows: list[Row]) -> list[str]:
    """Every metric any row has, grouped as GROUPS orders them, alphabetical within a group."""
    found = {k for row in rows for k in row.values}
    ordered: list[str] = []
    for _, head, tail in GROUPS:
        ordered += sorted(k for k in found - set(ordered) if k.startswith(head) and k.endswith(tail))
    return ordered


def _cell(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def markdown(rows: list[Row], cols: list[str]) -> str:
    head = ["run", "name", "kind", "started (UTC)", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * len(cols)) + "|"]
    for row in rows:
        cells = [row.run_id[:8], row.name, row.kind, row.started, *(_cell(row.values.get(c)) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], cols: list[str], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["run_id", "name", "kind", "started_utc", *cols])
        for row in rows:
            out.writerow([row.run_id, row.name, row.kind, row.started, *(row.values.get(c, "") for c in cols)])


def chart(rows: list[Row], cols: list[str], path: Path) -> None:
    """One panel per column group that has numbers: a bar per run and column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [c for c in cols if c.startswith(head) and c.endswith(tail)]) for title, head, tail in GROUPS]
    panels = [(title, group) for title, group in panels if group]
    if not panels:
        panels = [("no comparable metrics", [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * max(len(g) for _, g in panels) * len(rows)),
                                                       2.6 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, (title, group) in zip(axes[:, 0], panels, strict=True):
        for i, row in enumerate(rows):
            xs = [j + i * width for j in range(len(group))]
            ax.bar(xs, [row.values.get(c, float("nan")) for c in group], width, label=f"{row.run_id[:8]} {row.name}")
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(group))], group, fontsize=8)
        ax.set_title(title, fontsize=10)
        if title.startswith("Δ"):
            ax.axhline(0, color="black", linewidth=0.6)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(ids: list[str], last: int, out: Path) -> str:
    if last < 1:
        raise ConfigError([f"--last must be at least 1; got {last}"])
    ids = ids or lineage.latest_runs("pipeline", last)
    if not ids:
        raise StageError(f"no FINISHED pipeline run in experiment {runs.experiment_name()} ({runs.tracking_uri()}); "
                         f"run `make pipeline HW=cpu DRY_RUN=0` (or `make demo`) first, or give RUNS=\"id1 id2\"")
    rows = [read(run_id) for run_id in ids]
    cols = columns(rows)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, cols)
    files = [out / "compare.csv", out / "compare.md", out / "compare.png"]
    write_csv(rows, cols, files[0])
    files[1].write_text(table, encoding="utf-8")
    chart(rows, cols, files[2])
    models = sorted({runs.get_run(r.run_id).data.tags.get("model", "?") for r in rows})
    with runs.start_run("compare", {"runs": ids, "columns": cols}, hw="-", model=",".join(models),
                        run_name=f"compare-{len(rows)}") as run:
        runs.log_artifacts(files, "compare")
        runs.log_table({"run_id": [r.run_id for r in rows], **{c: [r.values.get(c) for r in rows] for c in cols}},
                       "compare/table.json")
        run_id = run.info.run_id if run else "?"
    return f"{table}\nwritten to {shown(out)}/ (compare.csv, compare.md, compare.png); logged as run {run_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="", help="run ids separated by spaces (default: the newest pipeline runs)")
    parser.add_argument("--last", type=int, default=LAST, help=f"how many pipeline runs without --runs ({LAST})")
    parser.add_argument("--out", default="outputs/compare", help="where the table and the chart are written")
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(lambda: print(compare(args.runs.split(), args.last, repo_path(args.out))))


if __name__ == "__main__":
    sys.exit(main())
