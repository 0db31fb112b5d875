"""gpu_smoke: the real sft path on a CUDA GPU, in about three minutes, with every number in one JSON file.

A developer harness (``tools/``, not part of the package): it wraps internals of the stages to see what they applied.

``python tools/gpu_smoke.py --out DIR`` builds an offline random Qwen2 bigger than the test model (hidden 1024,
8 layers, 16/4 heads, ffn 2816; the tiny tokenizer), prepares the smoke pool, and runs ``pipeline.sft`` on the 4090
profile for 8 steps three times — bf16 LoRA with activation checkpointing, QLoRA (NF4), and Liger — then
``pipeline.align`` from the registered sft adapter with DPO (bf16) and ORPO (QLoRA), then forces a CUDA
out-of-memory error through ``pipeline.sft.main`` and checks the hint on stderr and the FAILED run in MLflow.
Each case records its wall time, the MLflow run (status, metric keys, tokens/s, peak memory), the registered model
version and what was really applied (Liger-patched modules, 4-bit layers, checkpointing); one failing case leaves
the others running. Results go to ``DIR/gpu_smoke.json`` and a short table to stdout; exit 0 when every check holds.

``--cpu-check`` runs the same code on the cpu profile with the tiny model's shape for 2 steps (bf16 LoRA and DPO),
so the script can be verified without a GPU. Nothing is written to the repository: the MLflow store, the pool, the
model and the adapters live in a temporary folder (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.paths import CONFIGS
from pipeline.core.profiles import ModelDef, load_model
from pipeline.core.strict import parse_overrides
from pipeline.models.loading import LoraConfig
from pipeline.stage import resolve as resolving
from pipeline.stage.resolve import resolve

SMOKE_MODEL = "smoke-qwen2"
SMOKE_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "max_window_layers": 8,
               "num_attention_heads": 16, "num_key_value_heads": 4, "initializer_range": 0.02}
REGISTERED = "zh-align-gpu-smoke"
EXPERIMENT = "zh-align-gpu-smoke"
METRICS = ("loss", "grad_norm", "learning_rate", "tokens_per_second", "epoch", "eval_loss")
CUDA_METRICS = ("peak_memory_allocated_gib", "peak_memory_reserved_gib")
OOM_HINT = ("CUDA ran out of memory with profile", "hw.micro_batch")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub",
            "safetensors", "bitsandbytes", "liger-kernel", "triton", "mlflow", "mlflow-skinny", "mlflow-tracing",
            "sqlalchemy", "alembic", "pydantic", "pyarrow", "fsspec", "numpy", "pandas", "typing-extensions")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "GIT_PYTHON_REFRESH": "quiet"}


@dataclasses.dataclass
class Smoke:
    """Where this smoke run works and what it runs on."""
    work: Path
    model: ModelDef
    hw: str
    steps: int
    cuda: bool
    pool: Path | None = None


# ----------------------------------------------------------------------------------------------------------------
# Step 1: the model definition (a tiny-qwen2 twin with its own architecture file)
# ----------------------------------------------------------------------------------------------------------------
def smoke_model(work: Path, cpu_check: bool) -> ModelDef:
    """tiny-qwen2's definition pointing at an architecture file in ``work``: the smoke shape, or (``cpu_check``)
    the tiny shape unchanged. Built and cached by ``pipeline.models.tiny`` like any tiny model."""
    tiny = load_model("tiny-qwen2")
    arch = tiny.architecture_config()
    if not cpu_check:
        arch.update(SMOKE_SHAPE)
    path = work / "model" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arch, indent=2) + "\n", encoding="utf-8")
    return dataclasses.replace(tiny, name=SMOKE_MODEL, architecture=str(path), source_file=f"{path} (gpu_smoke)")


@contextlib.contextmanager
def replaced(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``make(original)`` for the duration, then restored."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def model_known(model: ModelDef):
    """Let ``resolve`` (and so every stage's ``main``) find ``model`` by name, as if it were in configs/models/."""
    return replaced(resolving, "load_model", lambda original: lambda name: model if name == model.name else original(name))


def build_model(s: Smoke) -> dict[str, Any]:
    from pipeline.models.tiny import tiny_model_dir

    start = time.perf_counter()
    folder = tiny_model_dir(s.model)
    arch = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = folder / "model.safetensors"
    return {"folder": str(folder), "build_s": round(time.perf_counter() - start, 2),
            "shape": {k: arch[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "params_m": round(weights.stat().st_size / 4 / 1e6, 1)}  # saved in fp32


# ----------------------------------------------------------------------------------------------------------------
# Step 2: the smoke pool
# ----------------------------------------------------------------------------------------------------------------
def prepare_pool(s: Smoke) -> dict[str, Any]:
    from pipeline import prepare

    out = s.work / "data"
    r = resolve("prepare", hw="cpu", overrides=parse_overrides([f"output_dir={out}", f"model={s.model.name}"]))
    start = time.perf_counter()
    result = prepare.run(r)
    s.pool = out
    return {"wall_s": round(time.perf_counter() - start, 2), "rows": result.rows, "folder": str(out)}


# ----------------------------------------------------------------------------------------------------------------
# Step 3: sft runs, each with what it really applied and what MLflow holds
# ----------------------------------------------------------------------------------------------------------------
def sft_sets(s: Smoke, name: str, extra: list[str]) -> list[str]:
    half = max(1, s.steps // 2)
    return [f"data.path={s.pool}", f"output_dir={s.work / 'sft' / name}", f"model={s.model.name}",
            f"train.max_steps={s.steps}", "train.logging_steps=1", f"train.eval_steps={half}",
            f"train.save_steps={s.steps}", f"register.name={REGISTERED}", "hw.micro_batch=4", "hw.grad_accum=1",
            "hw.max_length=1024", *extra]


def trainer_hook(box: dict[str, Any], on_ready: Callable[[Any], None] | None = None):
    """Wrap ``sft.build_trainer`` to keep the trainer it builds in ``box["trainer"]`` (and run ``on_ready`` on it)."""
    from pipeline import sft

    def make(original: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
        def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
            trainer, tokenizer = original(*args, **kwargs)
            box["trainer"] = trainer
            if on_ready:
                on_ready(trainer)
            return trainer, tokenizer
        return wrapped

    return replaced(sft, "build_trainer", make)


def applied(trainer: Any) -> dict[str, Any]:
    """Liger-patched modules, 4-bit layers, checkpointing and dtypes of the model the trainer holds (after
    training: the Trainer turns checkpointing on in ``train()``)."""
    model = trainer.model
    mods = list(model.modules())
    liger = sum(1 for m in mods if getattr(getattr(m, "forward", None), "__module__", "").startswith("liger_kernel"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"use_liger_kernel": bool(getattr(trainer.args, "use_liger_kernel", False)),
            "liger_modules": liger,
            "linear4bit_modules": sum(1 for m in mods if type(m).__module__.startswith("bitsandbytes")
                                      and type(m).__name__ == "Linear4bit"),
            "gradient_checkpointing": any(getattr(base, n) for n in ("is_activation_checkpointing",
                                          "is_gradient_checkpointing") if hasattr(type(base), n)),
            "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 3),
            "trainable_dtype": str(trainable[0].dtype) if trainable else None,
            "frozen_dtypes": sorted({str(p.dtype) for p in frozen}), "device": str(next(model.parameters()).device)}


def latest_run(since: float = 0.0) -> Any:
    """The newest run of the smoke experiment, if it started after ``since`` (a ``time.time()``)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], order_by=["attribute.start_time DESC"], max_results=1)
    return runs[0] if runs and runs[0].info.start_time >= since * 1000 else None


def run_facts(run: Any, cuda: bool) -> dict[str, Any]:
    """Status, metric keys (and the missing ones), tokens/s and peak memory of one MLflow run."""
    import mlflow

    client = mlflow.MlflowClient()
    m = run.data.metrics
    history = {k: [x.value for x in client.get_metric_history(run.info.run_id, k)]
               for k in ("tokens_per_second", *CUDA_METRICS) if k in m}
    tps = history.get("tokens_per_second", [])
    want = METRICS + (CUDA_METRICS if cuda else ())
    return {"run_id": run.info.run_id, "status": run.info.status, "metric_keys": sorted(m),
            "missing_metrics": [k for k in want if k not in m], "loss": m.get("loss"), "eval_loss": m.get("eval_loss"),
            "tokens_per_second_last": m.get("tokens_per_second"),
            "tokens_per_second_mean_after_first": sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else None,
            "peak_memory_allocated_gib": max(history.get(CUDA_METRICS[0], [0.0]) or [0.0]),
            "peak_memory_reserved_gib": max(history.get(CUDA_METRICS[1], [0.0]) or [0.0]),
            "error_tag": run.data.tags.get("error")}


def registered(run_id: str, name: str = REGISTERED) -> dict[str, Any] | None:
    import mlflow

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if not versions:
        return None
    v = versions[0]
    return {"name": v.name, "version": int(v.version), "status": v.status, "tags_hw": v.tags.get("hw"),
            "start_from": v.tags.get("start_from"),
            "alias_points_here": client.get_model_version_by_alias(name, "candidate").version == v.version}


def sft_case(s: Smoke, name: str, extra: list[str], expect: dict[str, Any]) -> dict[str, Any]:
    """One sft run through ``pipeline.sft.run``; ``expect`` maps keys of :func:`applied` to the wanted value."""
    from pipeline import sft

    box: dict[str, Any] = {}
    r = resolve("sft", config=CONFIGS / "smoke" / "sft.yaml", hw=s.hw, overrides=parse_overrides(sft_sets(s, name, extra)))
    start = time.perf_counter()
    with trainer_hook(box):
        result = sft.run(r)
    wall = time.perf_counter() - start
    trainer = box.pop("trainer")
    seen = applied(trainer)
    runtime = [h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h]
    del trainer
    run = run_facts(latest_run(), s.cuda)
    reg = registered(run["run_id"])
    checks = {"finished": run["status"] == "FINISHED", "steps": result.steps == s.steps,
              "loss_finite": result.final_loss is not None and math.isfinite(result.final_loss),
              "on_device": seen["device"].startswith("cuda" if s.cuda else "cpu"),
              "metrics": not run["missing_metrics"], "registered": bool(reg and reg["alias_points_here"]),
              **{f"applied.{k}": want(seen.get(k)) if callable(want) else seen.get(k) == want
                 for k, want in expect.items()}}
    return {"wall_s": round(wall, 2), "train_runtime_s": runtime[-1] if runtime else None, "steps": result.steps,
            "final_loss": result.final_loss, "run": run,
            "registered": reg, "applied": seen, "checks": checks}


def align_case(s: Smoke, loss: str, extra: list[str]) -> dict[str, Any]:
    """One align run (``pipeline.align.run``) from the newest registered smoke sft adapter."""
    from pipeline import align

    name = f"{REGISTERED}-{loss}"
    sets = [x for x in sft_sets(s, loss, extra) if not x.startswith("register.name=")]
    r = resolve("align", config=CONFIGS / "smoke" / "align" / f"{loss}.yaml", hw=s.hw, variant=loss,
                overrides=parse_overrides([*sets, f"register.name={name}", f"start_from={REGISTERED}@candidate"]))
    start = time.perf_counter()
    result = align.run(r)
    wall = time.perf_counter() - start
    run = run_facts(latest_run(), s.cuda)
    reg = registered(run["run_id"], name)
    metrics = set(run["metric_keys"])
    checks = {"finished": run["status"] == "FINISHED", "steps": result.steps == s.steps,
              "loss_finite": result.final_loss is not None and math.isfinite(result.final_loss),
              "metrics": not run["missing_metrics"], "registered": bool(reg and reg["alias_points_here"]),
              "preference_metrics": {"rewards/margins", "rewards/accuracies", "length_penalty"} <= metrics,
              "started_from_sft": result.start.startswith(f"models:/{REGISTERED}/")}
    return {"wall_s": round(wall, 2), "steps": result.steps, "final_loss": result.final_loss, "run": run,
            "registered": reg, "checks": checks}


# ----------------------------------------------------------------------------------------------------------------
# Step 4: a forced out-of-memory error through the stage's CLI
# ----------------------------------------------------------------------------------------------------------------
def cap_memory(margin_mib: int) -> Callable[[Any], None]:
    """An ``on_ready`` that caps this process's CUDA memory at what it holds now (model on the GPU) + a margin."""
    import torch

    def cap(trainer: Any) -> None:
        trainer.model.to(trainer.args.device)  # the Trainer has already moved it; make sure before measuring
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + margin_mib * 2 ** 20) / total)

    return cap


def oom_case(s: Smoke) -> dict[str, Any]:
    import torch

    from pipeline import sft

    sets = sft_sets(s, "oom", ["hw.micro_batch=32", "hw.activation_checkpointing=false", "hw.liger=false"])
    argv = ["--config", str(CONFIGS / "smoke" / "sft.yaml"), "--hw", s.hw, "--dry-run", "false",
            *(x for kv in sets for x in ("--set", kv))]
    err, box = io.StringIO(), {}
    start, since = time.perf_counter(), time.time()
    try:
        with trainer_hook(box, cap_memory(64)), contextlib.redirect_stderr(err):
            code = sft.main(argv)
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)
        box.clear()
        release()
    found = latest_run(since)
    run = run_facts(found, s.cuda) if found else {"run_id": None, "status": "no run started", "error_tag": None}
    stderr = err.getvalue()
    tag = run["error_tag"] or ""
    checks = {"exit_1": code == 1, "stderr_hint": all(h in stderr for h in OOM_HINT),
              "run_failed": run["status"] == "FAILED", "error_tag_hint": all(h in tag for h in OOM_HINT)}
    said = [line[line.index("error: "):] for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    return {"wall_s": round(time.perf_counter() - start, 2), "exit_code": code, "stderr_errors": said[-3:],
            "run": {k: run[k] for k in ("run_id", "status", "error_tag")}, "checks": checks}


# ----------------------------------------------------------------------------------------------------------------
# Running the cases, each on its own
# ----------------------------------------------------------------------------------------------------------------
def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one case; an exception becomes ``{"error", "traceback"}`` and a failed check, never a stop."""
    print(f"--- {name}", flush=True)
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - a smoke report records every failure and goes on
        out = {"wall_s": round(time.perf_counter() - start, 2), "error": f"{type(err).__name__}: {err}"[:2000],
               "traceback": traceback.format_exc()[-4000:], "checks": {"ran": False}}
    finally:
        with contextlib.suppress(Exception):
            release()
    out["ok"] = all(out.get("checks", {}).values())
    return out


def cases(s: Smoke, cpu_check: bool) -> dict[str, Callable[[], dict[str, Any]]]:
    """The sft cases (overrides on top of checkpointing on, Liger and QLoRA off; what must be applied) + the OOM."""
    base = ["hw.activation_checkpointing=true", "hw.liger=false", "hw.qlora=false"]
    quantised = len(LoraConfig().target_modules) * SMOKE_SHAPE["num_hidden_layers"]  # lm_head stays bf16
    specs = {"lora_bf16": ([], {"gradient_checkpointing": True, "liger_modules": 0, "linear4bit_modules": 0}),
             "qlora": (["hw.qlora=true"], {"gradient_checkpointing": True, "linear4bit_modules": quantised}),
             "liger": (["hw.liger=true"], {"use_liger_kernel": True, "liger_modules": bool})}
    if cpu_check:
        specs = {"lora_bf16": specs["lora_bf16"]}
    todo: dict[str, Callable[[], dict[str, Any]]] = {
        name: functools.partial(sft_case, s, name, base + extra, expect) for name, (extra, expect) in specs.items()}
    todo["dpo"] = functools.partial(align_case, s, "dpo", base)  # from the newest sft adapter above
    if not cpu_check:
        todo["orpo_qlora"] = functools.partial(align_case, s, "orpo", [*base, "hw.qlora=true"])
        todo["oom"] = functools.partial(oom_case, s)
    return todo


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "versions": versions, "cuda": cuda, "torch_cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1) if cuda else None}


def run_all(s: Smoke, cpu_check: bool, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every step and case in turn; the report is saved after each, so a run stopped midway still leaves one."""
    report: dict[str, Any] = {"mode": "cpu-check" if cpu_check else "gpu", "hw": s.hw, "steps": s.steps, "ok": False,
                              "environment": guarded("environment", lambda: {**environment(), "checks": {}}),
                              "model": {}, "prepare": {}, "cases": {}}
    with model_known(s.model):
        report["model"] = guarded("model", lambda: {**build_model(s), "checks": {}})
        save(report)
        report["prepare"] = guarded("prepare", lambda: {**prepare_pool(s), "checks": {}})
        save(report)
        for name, fn in cases(s, cpu_check).items():
            report["cases"][name] = guarded(name, fn) if s.pool else {"ok": False, "error": "no pool (prepare failed)"}
            save(report)
    parts = [report["environment"], report["model"], report["prepare"], *report["cases"].values()]
    report["ok"] = all(p["ok"] for p in parts)
    return report


def table(report: dict[str, Any]) -> str:
    env = report["environment"]
    v = env.get("versions", {})
    lines = [f"{env.get('device')} | torch {v.get('torch')} | transformers {v.get('transformers')} | trl {v.get('trl')} "
             f"| peft {v.get('peft')} | bitsandbytes {v.get('bitsandbytes')} | liger {v.get('liger-kernel')}",
             f"model {report['model'].get('shape')} built in {report['model'].get('build_s')} s; "
             f"prepare {report['prepare'].get('wall_s')} s",
             f"{'case':<10} {'ok':<5} {'wall s':>7} {'tok/s':>9} {'alloc GiB':>9} {'resv GiB':>9} {'loss':>7}  "
             f"failed checks"]
    for name, c in report["cases"].items():
        run = c.get("run", {})
        tps = run.get("tokens_per_second_mean_after_first") or run.get("tokens_per_second_last")
        failed = [k for k, ok in c.get("checks", {}).items() if not ok]
        lines.append(f"{name:<10} {c['ok']!s:<5} {c.get('wall_s', 0):>7.1f} {tps or 0:>9.0f} "
                     f"{run.get('peak_memory_allocated_gib') or 0:>9.2f} {run.get('peak_memory_reserved_gib') or 0:>9.2f} "
                     f"{c.get('final_loss') or 0:>7.3f}  {', '.join(failed) or '-'}"
                     + (f"  [{c['error'][:160]}]" if c.get("error") else ""))
    lines.append(f"ALL OK: {report['ok']}")
    return "\n".join(lines)


def setup(work: Path) -> None:
    """A hermetic MLflow store, tiny-model cache and working folder, all inside ``work``."""
    os.environ.update(ENV)
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME=EXPERIMENT,
                      ZH_ALIGN_TINY_CACHE=str(work / "tiny-models"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(var, None)
    os.chdir(work)  # MLflow's default artifact root (./mlruns) lands here too


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/gpu_smoke.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="folder for gpu_smoke.json (default: the current folder)")
    parser.add_argument("--cpu-check", action="store_true", help="tiny model, cpu profile, 2 steps, bf16 LoRA case only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder (its path is reported)")
    return parser


def write(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_smoke.json").write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n",
                                        encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from pipeline.stage.cli import setup_logging

    args = make_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zh-align-gpu-smoke-"))
    setup(work)
    setup_logging()
    start = time.perf_counter()
    s = Smoke(work, smoke_model(work, args.cpu_check), "cpu" if args.cpu_check else "4090", 2 if args.cpu_check else 8,
              cuda=not args.cpu_check)

    def save(report: dict[str, Any]) -> None:
        write(out, {**report, "wall_s": round(time.perf_counter() - start, 1), "work": str(work) if args.keep else None})

    report = run_all(s, args.cpu_check, save)
    save(report)
    print(table(report), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
