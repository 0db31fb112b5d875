"""evaluate: lm-evaluation-harness on cmmlu / ceval-valid / hellaswag / winogrande, tuned vs base.

The model under test is the base + an adapter (run id, `name@alias`, `name/version` or folder; a QLoRA adapter is
evaluated on the bf16 base, as export ships it) or a merged folder. Tasks with a local copy (`mirrors`, the shipped
`zh_smoke`) run from generated task YAMLs. Results land on the eval run and on the training run the adapter came from;
with `compare_base` the base runs too (cached), and the forgetting report gates on a paired test per task group.
`earlier` names an earlier adapter of the same line (the SFT adapter an aligned one started from): it runs beside the
adapter on the same tasks and base, gets its own deltas, gate and write-back, and the report shows base → earlier →
adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.core.strict import Key, at_least
from pipeline.evaluation import evalsets, forgetting
from pipeline.evaluation import mirrors as mirror_sources
from pipeline.evaluation import results as R
from pipeline.evaluation.forgetting import GateConfig
from pipeline.hardware import planner
from pipeline.models.loading import DTYPES, base_model_path, load_tokenizer, require_safetensors, same_base
from pipeline.stage import cli
from pipeline.stage.dryrun import Item, Plan, adapter_base_input, dir_output, model_ref_input
from pipeline.stage.resolve import on_adapter_base
from pipeline.stage.spec import Stage
from pipeline.tracking import fingerprints, lineage, model_registry, runs

log = logging.getLogger("pipeline.evaluate")
BASE_CACHE = ".cache/eval-base"  # or $ZH_ALIGN_EVAL_CACHE


@dataclass
class EvaluateConfig:
    model: str = "qwen2.5-7b-instruct"
    adapter: str | None = "zh-align-sft@candidate"
    earlier: str | None = None           # an earlier adapter of the same line, judged beside `adapter`
    tasks: list[str] = field(default_factory=lambda: ["cmmlu", "ceval-valid", "hellaswag", "winogrande"])
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: str = "auto"
    apply_chat_template: bool = False
    system_prompt: bool = False
    mirrors: dict[str, str] = field(default_factory=dict)
    compare_base: bool = True
    gate: GateConfig = field(default_factory=GateConfig)
    write_back: bool = True              # scores onto the training run and gate tags onto its registered version
    output_dir: str = "outputs/eval/default"

    def check(self, key: Key) -> list[str]:
        """What lm-eval would refuse only ~20 s into the run: no tasks, an unknown task, a batch size it cannot read,
        a mirror of a task without a local layout."""
        problems = [f"{key('tasks')} is empty; name at least one task, e.g. tasks=[zh_smoke] or "
                    f"tasks=[cmmlu, hellaswag]"] if not self.tasks else []
        problems += [f"{key('tasks')}: {p}" for p in evalsets.unknown_tasks(self.tasks, self.mirrors)]
        if not re.fullmatch(r"auto(:[1-9][0-9]*)?|[1-9][0-9]*", str(self.batch_size)):
            problems.append(f"{key('batch_size')} is {self.batch_size!r}; use a positive integer, auto, or auto:N "
                            f"(auto with N tries)")
        problems += [f"{key('mirrors')}: no local layout for task {t!r}; mirrors are read for "
                     f"{', '.join(evalsets.LAYOUTS)}" for t in self.mirrors if t not in evalsets.LAYOUTS]
        if self.earlier and not self.adapter:
            problems.append(f"{key('earlier')} is {self.earlier!r} but `adapter` is null (the base alone); the earlier "
                            f"adapter is judged beside an adapter: set `adapter`, or `earlier: null`")
        return problems + at_least(key, self, ("limit",), nullable=True) + at_least(key, self, ("num_fewshot",), 0,
                                                                                   nullable=True)


def plan(r: Resolved) -> Plan:
    r = _on_adapter_base(r, registry=False)
    cfg = r.cfg
    sources = mirror_sources.load().sources
    mirrors = [Item(f"mirror of {task}", folder, mirror_sources.status(task, folder, task in sources)[0],
                    check=lambda task=task, folder=folder: evalsets.mirror_problem(task, folder))
               for task, folder in cfg.mirrors.items()]
    hub = [Item(f"task {task}", "lm-eval's own hub dataset", "downloaded by lm-eval at run time")
           for task in cfg.tasks if task not in cfg.mirrors and task != "zh_smoke"]
    return Plan(r, facts=[
        ("tasks", ", ".join(cfg.tasks)),
        ("settings", f"few-shot {'task default' if cfg.num_fewshot is None else cfg.num_fewshot}, "
                     f"limit {cfg.limit or 'none'}, batch size {cfg.batch_size}, chat template "
                     f"{'on' if cfg.apply_chat_template else 'off'}, system prompt "
                     f"{'the model definition' if cfg.system_prompt else 'none'}, dtype {r.hw.precision}"),
        ("compare", _compared(cfg)),
    ], inputs=[model_ref_input("adapter under test", cfg.adapter, "sft", r),
               *([model_ref_input("earlier adapter (evaluated and gated too)", cfg.earlier, "sft", r, "earlier")]
                 if cfg.earlier else []), adapter_base_input(r, cfg.adapter), *mirrors, *hub],
       outputs=[dir_output(cfg.output_dir, "results.json + results.csv"
                           + (" + forgetting report (json, csv, chart)" if cfg.compare_base else "")
                           + (" + earlier/ (the earlier adapter's results)" if cfg.earlier else "")),
                Item("write-back", "eval/… metrics onto the training run, eval.* tags onto its registered version"
                     + (" — for each of the two adapters" if cfg.earlier else ""),
                     "on" if cfg.write_back else "off (write_back: false)")],
       estimate=planner.evaluation(r.hw, r.model, cfg.tasks, limit=cfg.limit,
                                   compare_base=cfg.compare_base and cfg.adapter is not None,
                                   earlier=bool(cfg.earlier)))


def _compared(cfg: EvaluateConfig) -> str:
    if not cfg.compare_base:
        return "tuned only" + (" (the earlier adapter too, no gate)" if cfg.earlier else "")
    if cfg.earlier:
        return "base → earlier → tuned (forgetting report; each adapter gated against the base)"
    return "tuned vs base (forgetting report)"


@dataclass
class EvalResult:
    output_dir: str
    scores: dict[str, float]          # eval/<task>/<metric>
    gate: str | None
    earlier_gate: str | None = None   # the earlier adapter's gate (None: no earlier adapter, or no base compared)
    report: list[str] = field(default_factory=list)  # the forgetting report for people: base → … per task group

    def __str__(self) -> str:
        earlier = f", earlier adapter's gate {self.earlier_gate}" if self.earlier_gate else ""
        return "\n  ".join([f"{len(self.scores)} scores, gate {self.gate or 'n/a'}{earlier} → {self.output_dir}",
                            *self.report])


@dataclass
class _Judged:
    """One adapter of the run: what it is, its scores, its files and its verdict against the base."""
    target: dict[str, Any]
    scores: dict[str, float]
    files: list[Path]
    verdict: forgetting.Verdict | None


def run(r: Resolved) -> EvalResult:
    r = _on_adapter_base(r)
    cfg = r.cfg
    out = repo_path(cfg.output_dir)
    if cfg.apply_chat_template:
        _check_template(r)
    target = _target(r, cfg.adapter, "adapter")
    earlier = _target(r, cfg.earlier, "earlier") if cfg.earlier else None
    with tempfile.TemporaryDirectory(prefix="zh-align-tasks-") as tmp:
        mirrors = {**cfg.mirrors, **({"zh_smoke": str(evalsets.ZH_SMOKE)} if "zh_smoke" in cfg.tasks else {})}
        for task, folder in mirrors.items():
            _checked(evalsets.check_mirror, task, str(repo_path(folder)))
        mirrored = evalsets.write_task_yamls({t: str(repo_path(f)) for t, f in mirrors.items()}, Path(tmp))
        tasks = [t for t in cfg.tasks if t not in mirrors] + mirrored
        manager = _task_manager(tmp)
        _checked(evalsets.check_tasks, tasks, manager, mirrored)
        key = _cache_key(r, tmp)
        tags = {"eval.target": target["source"], "eval.target_run_id": target["run_id"] or ""}
        if earlier:
            tags |= {"eval.earlier": earlier["source"], "eval.earlier_run_id": earlier["run_id"] or ""}
        with runs.start_run(STAGE.name, r.as_dict(), hw=r.hw.name, model=r.model.name, tags=tags,
                            system_metrics=True):
            tested = target["folder"] or target["merged"]
            base = _base(r, tasks, manager, key) if cfg.compare_base and tested else None
            out.mkdir(parents=True, exist_ok=True)
            chain = [("earlier", earlier, out / "earlier")] if earlier else []
            if not earlier:  # a previous run's earlier adapter, not this run's: gone, so the folder says one thing
                shutil.rmtree(out / "earlier", ignore_errors=True)
            judged = [_judge(r, label, t, tasks, manager, base, folder)
                      for label, t, folder in [*chain, ("adapter", target, out)]]
            verdicts = [j.verdict for j in judged if j.verdict]
            if verdicts:
                runs.log_artifacts(_report(out, verdicts), "eval")
            if cfg.write_back:
                for j in judged:
                    _write_back(j)
    main = judged[-1]
    return EvalResult(cfg.output_dir, main.scores, main.verdict.gate if main.verdict else None,
                      judged[0].verdict.gate if earlier and judged[0].verdict else None,
                      forgetting.lines(verdicts) if verdicts else [])


def _judge(r: Resolved, label: str, target: dict[str, Any], tasks: list[str], manager: Any,
           base: dict[str, Any] | None, out: Path) -> _Judged:
    """lm-eval on one adapter; its scores, CSV and samples written and logged (the earlier adapter's under the
    prefix ``earlier/``), then its deltas against the base, the paired test per task group and its gate."""
    prefix = "" if label == "adapter" else f"{label}/"
    tuned = _lm_eval(r, tasks, manager, target["folder"], target["merged"])
    out.mkdir(parents=True, exist_ok=True)
    scores, rows = R.scores(tuned), R.csv_rows(tuned, r, target["source"])
    files = R.write(out, tuned, rows)
    runs.log_metrics({f"{prefix}eval/{k}": v for k, v in scores.items()})
    if rows:
        runs.log_table({k: [row[k] for row in rows] for k in rows[0]},
                       f"{label}_results_table.json" if prefix else "results_table.json")
    runs.log_artifacts(files, f"eval/{label}" if prefix else "eval")
    if base is None:
        return _Judged(target, scores, files, None)
    before = R.scores(base)
    runs.log_metrics({f"{prefix}delta/{k}": v - before[k] for k, v in scores.items() if k in before})
    pairs = [forgetting.paired(g, R.items(base, subs), R.items(tuned, subs)) for g, subs in R.groups(tuned).items()]
    verdict = forgetting.judge(label, target["source"], pairs, r.cfg.gate)
    runs.set_tags({f"{prefix.replace('/', '.')}{k}": v for k, v in verdict.tags().items()})
    return _Judged(target, scores, files, verdict)


def _report(out: Path, verdicts: list[forgetting.Verdict]) -> list[Path]:
    """The forgetting report of the chain (base → earlier → adapter): JSON, CSV and chart, and in the log."""
    (out / "forgetting.json").write_text(json.dumps(forgetting.report(verdicts), ensure_ascii=False, indent=2),
                                         encoding="utf-8")
    for line in forgetting.lines(verdicts):
        log.info("forgetting: %s", line)
    return [out / "forgetting.json", R.write_csv(out / "forgetting.csv", forgetting.rows(verdicts)),
            R.chart(out, verdicts)]


def _checked(fn: Any, *args: Any) -> None:
    """A config-level problem found by lm-eval's side (unknown task, bad mirror) → a clean error, nothing written."""
    try:
        fn(*args)
    except ValueError as err:
        raise ConfigError([str(err)]) from err


def _check_template(r: Resolved) -> None:
    if not getattr(load_tokenizer(r.model), "chat_template", None):
        raise ConfigError([f"{r.config_path}: `apply_chat_template` is true but the tokenizer of {r.model.ref} has no "
                           f"chat template; set `apply_chat_template: false`"])


def _task_manager(include: str) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def _on_adapter_base(r: Resolved, registry: bool = True) -> Resolved:
    """``r`` on the adapter's recorded base (:func:`on_adapter_base`); the earlier adapter must share it."""
    r = on_adapter_base(r, r.cfg.adapter, registry=registry)
    recorded = lineage.recorded_base(r.cfg.earlier, registry)
    if recorded and not same_base(recorded, r.model):
        raise ConfigError([f"`earlier` {r.cfg.earlier!r} is an adapter of base {recorded!r}, but `adapter` "
                           f"{r.cfg.adapter!r} is one of {r.model.name}: both are scored against one base; give an "
                           f"earlier adapter of {r.model.name}"])
    return r


def _target(r: Resolved, ref: str | None, key: str) -> dict[str, Any]:
    """What is under test (``key``: the config key naming it): {folder (adapter) or None (the base alone), source,
    run_id, version, name}."""
    none = {"folder": None, "merged": None, "run_id": None, "version": None, "name": None}
    if not ref:
        return {**none, "source": "base"}
    folder = repo_path(ref)
    if (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        return {**none, "merged": folder, "source": str(folder)}  # a merged model: evaluated as it is
    found = lineage.find_adapter(ref, stage="sft", model=r.model.name, hw=r.hw.name, key=key)
    source = found["source"]
    name = source.removeprefix("models:/").split("/")[0] if source.startswith("models:/") else None
    return {**found, "merged": None, "name": name}


def _model_args(r: Resolved, adapter: Path | None, merged: Path | None = None) -> dict[str, Any]:
    path, revision = (str(merged), None) if merged else base_model_path(r.model)
    dtype = DTYPES["bf16" if r.hw.qlora else r.hw.precision]  # a QLoRA adapter is judged on the bf16 base
    args: dict[str, Any] = {"pretrained": path, "dtype": dtype}
    if revision:
        args["revision"] = revision
    if adapter:
        require_safetensors(adapter)
        args["peft"] = str(adapter)
    if r.model.trust_remote_code:  # off unless the model definition turns it on (lm-eval's default is off)
        args["trust_remote_code"] = r.model.trust_remote_code
    return args


def _lm_eval(r: Resolved, tasks: list[str], manager: Any, adapter: Path | None,
             merged: Path | None = None) -> dict[str, Any]:
    import lm_eval

    cfg = r.cfg
    batch = int(cfg.batch_size) if str(cfg.batch_size).isdigit() else cfg.batch_size
    return lm_eval.simple_evaluate(
        model="hf", model_args=_model_args(r, adapter, merged), tasks=tasks, task_manager=manager,
        num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=batch, device="cuda" if r.hw.device == "cuda" else "cpu",
        log_samples=True, apply_chat_template=cfg.apply_chat_template,
        system_instruction=r.model.system_prompt if cfg.system_prompt else None)


def _cache_key(r: Resolved, tasks_dir: str) -> str:
    """Everything that changes a base score: base + revision, lm-eval version, task YAMLs, few-shot, chat template,
    system prompt, dtype, limit, tasks."""
    from importlib import metadata

    cfg = r.cfg
    yamls = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tasks_dir).rglob("*.yaml"))}
    key = {"base": _model_args(r, None), "lm_eval": metadata.version("lm_eval"), "yamls": yamls, "tasks": cfg.tasks,
           "fewshot": cfg.num_fewshot, "chat": cfg.apply_chat_template,
           "system": r.model.system_prompt if cfg.system_prompt else None, "limit": cfg.limit}
    if r.model.tiny is not None:  # the tiny base's folder name carries the hash of everything that builds it
        key["base"] = {**key["base"], "pretrained": Path(key["base"]["pretrained"]).name}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base(r: Resolved, tasks: list[str], manager: Any, key: str) -> dict[str, Any]:
    cache = Path(os.environ.get("ZH_ALIGN_EVAL_CACHE") or repo_path(BASE_CACHE)) / f"{r.model.name}-{key}.json"
    if cache.exists():
        log.info("base scores from the cache: %s", cache)
        return json.loads(cache.read_text(encoding="utf-8"))
    base = R.jsonable(_lm_eval(r, tasks, manager, None))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(base, ensure_ascii=False), encoding="utf-8")
    return base


def _write_back(judged: _Judged) -> None:
    """An adapter's scores, CSV and gate tags onto the training run it came from, and onto its registered version."""
    target, tags = judged.target, judged.verdict.tags() if judged.verdict else {}
    if target["run_id"]:
        runs.log_to_run(target["run_id"], {f"eval/{k}": v for k, v in judged.scores.items()}, tags,
                        [f for f in judged.files if f.suffix == ".csv"], "eval")
    if target.get("name") and target.get("version"):
        version_tags = {f"eval.{k.replace('/', '.')}": f"{v:.4f}" for k, v in judged.scores.items()}
        model_registry.set_model_version_tags(target["name"], target["version"], {**version_tags, **tags})


STAGE = Stage("evaluate", EvaluateConfig, plan, run, __doc__.split("\n\n")[0],
              links={"adapter": "align", "earlier": "sft"}, key_metrics=("eval/", "delta/", "earlier/"),
              pinned={"adapter": "eval.target", "earlier": "eval.earlier"}, checks={"scores": fingerprints.scores},
              rerun_sets={"write_back": (False, "off: the training runs and their registered versions keep their "
                                                 "scores")})


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
