"""rerun: `make rerun RUN_ID=…` — run a finished stage run again from what it logged, and say whether it came out the
same.

``python -m pipeline.rerun --run-id ID [--dry-run] [--out DIR]``. From the run's ``resolved_config.yaml``:
- the stage config is written to ``outputs/rerun/<id>/<stage>.yaml``, its ``output_dir`` moved to
  ``outputs/rerun/<id>/out`` (the original outputs are neither overwritten nor resumed from);
- the hardware profile is re-applied as ``hw.*`` overrides where the profile file has changed since;
- the model definition must be unchanged (else refused, naming the keys);
- registered versions get the alias ``rerun``, not the original's (``candidate`` stays where it is);
- evaluate does not write its scores back onto the training run (``write_back: false``);
- a start point that was an alias is pinned to the version the run used (the alias may have moved since);
- sft and align refuse when the pool no longer has the sha256 the run trained on (``data.sha256``).
The rerun is a new run in the same experiment, tagged ``rerun_of``. Then it reports, and tags the new run with, whether
the data manifest digest (prepare), the pool digest (sft, align), the registered weights (sft, align, export: sha256
of each safetensors file) and the scores (evaluate) are identical. On CPU with the tiny model every stage is
deterministic, so anything but "identical" there is a finding.

A pipeline run is re-run whole: a new pipeline run from the overrides it logged (``pipeline.overrides``), its
children's outputs under ``outputs/rerun/<id>/<stage>``, then every stage's checks side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import ROOT, shown
from pipeline.core.profiles import load_model, load_profile
from pipeline.core.strict import parse_overrides, yaml_value
from pipeline.data.prepared import DataRef, pool_folder
from pipeline.stage import cli
from pipeline.stage.spec import get, names, stages
from pipeline.tracking import runs
from pipeline.tracking.preflight import check_store

RERUN_ALIAS = "rerun"
RERUN_DIR = ROOT / "outputs" / "rerun"


@dataclass
class Rerun:
    """What to launch: the stage, the config file written for it, overrides, and what the original run logged."""
    run_id: str
    stage: str
    hw: str
    folder: Path                # outputs/rerun/<run id>/: the config written for it, its outputs, rerun.json
    overrides: list[tuple[str, Any]]
    experiment_id: str          # the original's experiment: the rerun lands beside it
    notes: list[str] = field(default_factory=list)
    variants: dict[str, str] = field(default_factory=dict)  # a pipeline's variant flags as it logged them (loss)

    def parameters(self) -> dict[str, str]:
        overrides = " ".join(shlex.quote(f"{k}={yaml_value(v)}") for k, v in self.overrides)
        if self.stage == "pipeline":
            return {"hw": self.hw, "dry_run": "false", "overrides": overrides, **self.variants, "accel": "",
                    "resume": ""}
        return get(self.stage).parameters(hw=self.hw, overrides=overrides,
                                          config=shown(self.folder / f"{self.stage}.yaml"))


def prepare_rerun(run_id: str, out: Path = RERUN_DIR) -> Rerun:
    """Check the run can be re-run as it was and write its config; raise StageError saying why not."""
    run = runs.get_run(run_id)
    stage, status = run.data.tags.get("stage"), run.info.status
    if stage not in (*names(), "pipeline"):
        raise StageError(f"run {run_id} is a {stage or 'untagged'} run; only the runs of {', '.join(names())} and "
                         f"pipeline runs can be re-run")
    if status != "FINISHED":
        how = "`make pipeline RESUME=<id>`" if stage == "pipeline" else "`SET=\"train.resume=auto\"` (training stages)"
        raise StageError(f"run {run_id} ({stage}) is {status}; only FINISHED runs are re-run (continue a failed or "
                         f"killed one with {how})")
    if stage == "pipeline":
        return _pipeline_rerun(run, out)
    spec = get(stage)
    logged = yaml.safe_load(runs.run_artifact_text(run_id, "resolved_config.yaml"))
    cfg, notes = dict(logged["config"]), []
    folder = out / run_id
    cfg["output_dir"] = shown(folder / "out")
    if "register" in cfg:  # a new version, but the aliases users rely on (candidate, champion) stay where they are
        cfg["register"] = {**cfg["register"], "alias": RERUN_ALIAS}
        notes.append(f"registers a new version of {cfg['register']['name']} with alias @{RERUN_ALIAS}")
    for key, (value, why) in spec.rerun_sets.items():  # e.g. a re-measurement leaves what the first run wrote
        if cfg.get(key) != value:
            cfg[key] = value
            notes.append(f"{key} {why}")
    for key, tag in spec.pinned.items():
        used = run.data.tags.get(tag, "")
        if used.startswith("models:/"):
            cfg[key] = used.removeprefix("models:/")
            notes.append(f"{key} pinned to {cfg[key]} (the version the run used)")
    _check_model(logged["model"], cfg["model"])
    overrides = _profile_overrides(logged["hw"], notes)
    if spec.pool:
        _check_pool(cfg["data"], spec.pool, run.data.params.get("data.sha256", ""), run_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return Rerun(run_id, stage, logged["hw"]["name"], folder, overrides, run.info.experiment_id, notes)


def _pipeline_rerun(run: Any, out: Path) -> Rerun:
    """The whole chain again from the overrides the pipeline run logged, into outputs/rerun/<id>/<stage>, its
    registered versions aliased `rerun`, the profile as the run logged it."""
    run_id, params = run.info.run_id, run.data.params
    if "pipeline.overrides" not in params:
        raise StageError(f"pipeline run {run_id} did not log its overrides (made by an older version); re-run its "
                         f"children one by one: " + ", ".join(f"{k.removeprefix('child.')} {v}"
                                                              for k, v in run.data.tags.items()
                                                              if k.startswith("child.")))
    folder, notes = out / run_id, []
    first = stages()[0].name
    logged = yaml.safe_load(runs.run_artifact_text(run.data.tags[f"child.{first}"], "resolved_config.yaml"))
    registering = [s.name for s in stages() if "register" in {f.name for f in dataclasses.fields(s.config)}]
    overrides = [*parse_overrides(json.loads(params["pipeline.overrides"])), *_profile_overrides(logged["hw"], notes),
                 *((f"{s}.output_dir", shown(folder / s)) for s in names()),
                 *((f"{s}.register.alias", RERUN_ALIAS) for s in registering)]
    notes.append(f"outputs under {shown(folder)}/<stage>; registered versions get the alias @{RERUN_ALIAS}")
    then, now = run.data.tags.get("git.sha", "?"), runs.git_state()["git.sha"]
    if then != now:
        notes.append(f"the code has changed since: git {then[:10]} → {now[:10]}")
    folder.mkdir(parents=True, exist_ok=True)
    variants = {flag: params.get(f"pipeline.{flag}", "") for flag in {s.variant_flag for s in stages() if s.variant_flag}}
    return Rerun(run_id, "pipeline", run.data.tags["hw"], folder, overrides, run.info.experiment_id, notes, variants)


def _check_model(logged: dict[str, Any], name: str) -> None:
    now = {k: v for k, v in dataclasses.asdict(load_model(name)).items() if k != "source_file"}
    changed = sorted(k for k in set(now) | set(logged) if now.get(k) != logged.get(k))
    if changed:
        raise StageError(f"the model definition {name} has changed since the run ({', '.join(changed)}); a rerun "
                         f"would train a different model — restore configs/models/{name}.yaml (git log shows when)")


def _profile_overrides(logged: dict[str, Any], notes: list[str]) -> list[tuple[str, Any]]:
    now = {k: v for k, v in dataclasses.asdict(load_profile(logged["name"])).items() if k != "source_file"}
    changed = [(k, logged[k]) for k in logged if k != "name" and now.get(k) != logged[k]]
    if changed:
        notes.append("profile " + logged["name"] + " changed since; re-applied as logged: "
                     + ", ".join(f"{k}={v}" for k, v in changed))
    return [(f"hw.{k}", v) for k, v in changed]


def _check_pool(data: dict[str, Any], kind: str, digest: str, run_id: str) -> None:
    folder, _ = pool_folder(DataRef(**data))
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    now = manifest["outputs"][f"{kind}.jsonl"]["sha256"]
    if now != digest:
        source = f"prepare run {data['run_id']}" if data.get("run_id") else f"`data.path` {data.get('path')}"
        raise StageError(f"the pool of {source} ({folder / f'{kind}.jsonl'}) now has sha256 {now[:12]}…, but run "
                         f"{run_id} trained on {digest[:12] or '?'}…; prepare that data again into {folder} (same "
                         f"config and sources) before re-running")


def compare(old_id: str, new_id: str, stage: str) -> dict[str, Any]:
    """What came out the same, by the stage's declared checks: {check: {"identical": bool, "before": …, "after": …}}."""
    old, new = runs.get_run(old_id), runs.get_run(new_id)
    checks: dict[str, Any] = {}
    for name, fingerprint in get(stage).checks.items():
        before, after = fingerprint(old), fingerprint(new)
        checks[name] = {"identical": before == after, "before": before, "after": after}
    return checks


def compare_pipelines(old_id: str, new_id: str) -> dict[str, Any]:
    """Each stage's checks, prefixed `<stage>.`; each new child is tagged `rerun_of` its counterpart."""
    old, new = (runs.get_run(i).data.tags for i in (old_id, new_id))
    checks: dict[str, Any] = {}
    for stage in names():
        before, after = old[f"child.{stage}"], new[f"child.{stage}"]
        checks.update({f"{stage}.{k}": c for k, c in compare(before, after, stage).items()})
        runs.log_to_run(after, {}, {"rerun_of": before}, [], "")
    return checks


def report(rerun: Rerun, new_id: str, checks: dict[str, Any]) -> str:
    lines = [f"rerun of {rerun.stage} run {rerun.run_id} → run {new_id}", *(f"  note: {n}" for n in rerun.notes)]
    width = max(len(name) for name in [*checks, "verdict"])
    for name, c in checks.items():
        if c["identical"]:
            lines.append(f"  {name:<{width}}  identical")
        else:
            lines.append(f"  {name:<{width}}  DIFFERENT: {_short(c['before'])} → {_short(c['after'])}")
    same = all(c["identical"] for c in checks.values())
    lines.append(f"  {'verdict':<{width}}  " + ("identical" if same else "different (see above)"))
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", required=True,
                        help=f"a FINISHED run of {', '.join(names())}, or of the pipeline")
    parser.add_argument("--dry-run", action="store_true", help="check and show what would run; launch nothing")
    parser.add_argument("--out", type=Path, default=RERUN_DIR, help="where <run id>/ goes (default: outputs/rerun)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return cli.guarded(lambda: execute(checked_run_id(args.run_id), args.out.resolve(), args.dry_run))


def checked_run_id(text: str) -> str:
    """RUN_ID as given, refused when empty; the store it is looked up in checked first."""
    if not text.strip():
        raise ConfigError(["RUN_ID is empty; `make rerun RUN_ID=<run id>` with the id of a FINISHED stage or pipeline "
                           "run (`make ui`: the run's page, or the pipeline's printed summary)"])
    check_store()
    return text.strip()


def execute(run_id: str, out: Path, dry_run: bool) -> None:
    """Show the rerun; unless a dry run, launch it, compare, tag the new run and print the report."""
    rerun = prepare_rerun(run_id, out)
    params = rerun.parameters()
    print(f"re-running {rerun.stage} run {rerun.run_id}: mlflow run . -e {rerun.stage} "
          + " ".join(f"-P {shlex.quote(f'{k}={v}')}" for k, v in params.items()))
    for note in rerun.notes:
        print(f"  note: {note}")
    if dry_run:
        return
    new_id, status = runs.run_entry_point(rerun.stage, params, experiment_id=rerun.experiment_id,
                                             run_name=f"{rerun.stage}-{rerun.hw}-rerun")
    if status != "FINISHED":
        raise StageError(f"the rerun {new_id} ended {status}: "
                         f"{runs.get_run(new_id).data.tags.get('error', 'see its logs/ artifact')}")
    checks = compare_pipelines(rerun.run_id, new_id) if rerun.stage == "pipeline" else \
        compare(rerun.run_id, new_id, rerun.stage)
    tags = {"rerun_of": rerun.run_id, **{f"rerun.{k}": str(c["identical"]).lower() for k, c in checks.items()}}
    record = rerun.folder / "rerun.json"
    record.write_text(json.dumps({"rerun_of": rerun.run_id, "run_id": new_id, "notes": rerun.notes,
                                  "checks": checks}, ensure_ascii=False, indent=2), encoding="utf-8")
    runs.log_to_run(new_id, {}, tags, [record], "rerun")
    print(report(rerun, new_id, checks))


if __name__ == "__main__":
    sys.exit(main())
