"""bench: ``make bench HW=… STAGE=sft|orpo|dpo`` — the training path's speed and memory on the profile, beside TRL's
own trainer with its defaults, in one process, on the same model shape and the same batches.

``python -m pipeline.bench --hw NAME --stage sft|dpo|orpo [--steps N] [--warmup N] [--data DIR] [--mem-cap-gib G]
[--variants profile,trl-defaults] [--out DIR] [--set key=value]... [--log-mlflow]``

The model is the definition's architecture (its shipped ``config.json``) with random weights, built on the device —
nothing downloaded (a QLoRA profile writes the random weights to a temporary folder once and loads them 4-bit through
the stage's own loading code). The tokenizer is a word-level one over the model's whole vocabulary, so synthetic rows
of random words are exactly as many tokens as asked. The ``profile`` variant is the stage's real trainer
(``sft.build_trainer`` / ``align.build_trainer``: its datasets, chat template, collator, arguments from the profile —
checkpointing, Liger, QLoRA, precision, our callbacks); the baseline is TRL's ``SFTTrainer`` (or ``DPOTrainer``, also for
ORPO) with its defaults and a LoRA of the same rank. Row lengths follow the prepared pool in ``--data`` (its rows'
``n_tokens``), else every row is the profile's ``max_length``. Each optimizer step is one micro-batch
(``grad_accum=1``).

Per variant, written as a JSON line as soon as it ends (a run cut short still reports): tokens/s (the median over the
steps after the warm-up, non-padding tokens), step-time spread, MFU (ANCHORS.md's convention, 4·N + 12·L·h·T FLOPs a
token, on the card's peak from :mod:`pipeline.hardware.gpus`), peak allocated / reserved GiB on CUDA (peak RSS on the
CPU), and the planner's predicted peak for the profile. The summary's headline is the ratio of the profile's tokens/s
to the baseline's. ``--mem-cap-gib 24`` emulates a 24 GiB card on a bigger one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.paths import repo_path, shown
from pipeline.core.resolved import Resolved
from pipeline.core.strict import parse_overrides
from pipeline.data.prepared import Pool
from pipeline.hardware import gpus, measured, planner
from pipeline.hardware.memory import GiB, Shape, training
from pipeline.models.loading import LoraConfig, check_device, with_lora
from pipeline.models.synthetic import random_model, synthetic_rows, word_tokenizer
from pipeline.stage import cli
from pipeline.stage.resolve import resolve
from pipeline.training.preference import logit_chunk
from pipeline.training.trainer import recomputed_layers

STAGES = {"sft": ("sft", None), "dpo": ("align", "dpo"), "orpo": ("align", "orpo")}
VARIANTS = ("profile", "trl-defaults", "trl-qlora-recipe", "trl-dpo-defaults")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    cli.add_common(parser)
    parser.add_argument("--stage", choices=sorted(STAGES), default="sft")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: 6 on CUDA, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out (default: 2 on CUDA, 1 on the CPU)")
    parser.add_argument("--data", default="", help="a prepared folder whose rows' lengths the batches follow")
    parser.add_argument("--mem-cap-gib", type=float, default=None, help="emulate a card with this much memory")
    parser.add_argument("--variants", default="", help="comma-separated, in order (default: profile,<baseline>)")
    parser.add_argument("--out", default="outputs/bench", help="where bench.jsonl and summary.json go")
    parser.add_argument("--log-mlflow", action="store_true", help="log the results as a `bench` run")
    parser.add_argument("--log-results", default="", metavar="DIR",
                        help="measure nothing: log every summary.json under DIR (e.g. make bench-gpu's OUT, copied "
                             "from a GPU machine without MLflow) as `bench` runs, and record its CUDA profile "
                             "results in configs/measured.yaml, which plans then use")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.log_results:
        from pipeline.tracking.bench_runs import log_results

        folder = repo_path(args.log_results)
        return cli.guarded(lambda: print(log_results(folder), record_results(folder), sep="\n"))
    return cli.guarded(lambda: print(table(bench(args))))


RAM_DISK, RAM_DISK_MIN_GIB = Path("/dev/shm"), 40  # room for a 7B base in bf16 twice over: write and read it there


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure in a scratch folder: on the RAM disk when it has room (a QLoRA profile writes its random base, 15 GB for
    a 7B model, and loads it back 4-bit: seconds there, a minute or more on a GPU box's disk), else the temp dir."""
    roomy = RAM_DISK.is_dir() and shutil.disk_usage(RAM_DISK).free >= RAM_DISK_MIN_GIB * GiB
    work = Path(tempfile.mkdtemp(prefix="zh-align-bench-", dir=RAM_DISK if roomy else None))
    try:
        return measure_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)   # a QLoRA profile's random base is the model's size on disk


def measure_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    stage, variant = STAGES[args.stage]
    cuda = torch.cuda.is_available()
    steps, warmup = args.steps or (6 if cuda else 3), args.warmup if args.warmup is not None else (2 if cuda else 1)
    out = repo_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = [("train.max_steps", warmup + steps), ("train.logging_steps", 1), ("train.save_steps", 10 ** 6),
             ("train.eval_steps", 10 ** 6), ("hw.grad_accum", 1), ("output_dir", str(work / "out"))]
    r = resolve(stage, hw=args.hw, overrides=[*parse_overrides(args.set, args.overrides), *fixed], variant=variant)
    check_device(r.hw)
    if args.mem_cap_gib and cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * GiB /
                                                       torch.cuda.get_device_properties(0).total_memory))
    tokenizer = word_tokenizer(r, work)
    rows = synthetic_rows(r, args.stage, (warmup + steps) * r.hw.micro_batch, repo_path(args.data) if args.data else None)
    names = [v for v in args.variants.split(",") if v] or ["profile", baseline_of(args.stage, r)]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ConfigError([f"unknown --variants {', '.join(unknown)}; variants: {', '.join(VARIANTS)}"])
    results = []
    with open(out / "bench.jsonl", "w", encoding="utf-8") as lines:
        for name in names:
            result = measure(name, r, args.stage, rows, tokenizer, work, warmup, cuda)
            results.append(result)
            lines.write(json.dumps(result, ensure_ascii=False) + "\n")
            lines.flush()
    summary = summarise(results, r, args, cuda)
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if cuda and not args.data:  # the card's own speed: `make plan` times this profile with it from now on
        print(record_results(out), file=sys.stderr)
    if args.log_mlflow:
        from pipeline.tracking.bench_runs import log_run  # MLflow only here: a GPU machine may not have it

        log_run(summary, out)
    return summary


def record_results(folder: Path) -> str:
    """The profile results under ``folder`` measured on CUDA, into the planner's configs/measured.yaml."""
    new = measured.record(sorted(folder.rglob("summary.json")))
    if not new:
        return f"no speed recorded for the planner: no profile result on a CUDA card at full length under {shown(folder)}"
    return (f"recorded {len(new)} measured speed(s) in {shown(measured.PATH)} for the planner (commit it): "
            + ", ".join(f"{m.stage} HW={m.hw} on {m.device}" for m in new))


def baseline_of(stage: str, r: Resolved) -> str:
    """What a user gets without us: TRL's SFTTrainer defaults (on a QLoRA profile: the common QLoRA recipe, PEFT's
    ``prepare_model_for_kbit_training`` with its fp32 upcast), or TRL's DPOTrainer defaults (for ORPO too: the
    speed ORPO is held to)."""
    if stage != "sft":
        return "trl-dpo-defaults"
    return "trl-qlora-recipe" if r.hw.qlora else "trl-defaults"


# ------------------------------------------------------------------------------------------------------------------
# One variant
# ------------------------------------------------------------------------------------------------------------------
def measure(name: str, r: Resolved, stage: str, rows: list[dict[str, Any]], tokenizer: Any, work: Path, warmup: int,
            cuda: bool) -> dict[str, Any]:
    """Build the variant's trainer on a fresh random model, train, time each step; an OOM or error is reported."""
    import gc

    import torch

    result: dict[str, Any] = {"variant": name, "stage": stage, "hw": r.hw.name, "model": r.model.name,
                              "device": torch.cuda.get_device_name() if cuda else "cpu",
                              "micro_batch": r.hw.micro_batch, "max_length": r.hw.max_length,
                              "date": time.strftime("%Y-%m-%d"), **settings(name, r)}
    try:
        trainer = build(name, r, stage, rows, tokenizer, work, cuda)
        timer = step_timer(cuda)
        trainer.add_callback(timer)
        trainer.train()
        measured = timer.report(warmup)
        result.update(status="ok", **measured, **mfu(r, rows, measured["tokens_per_s"], cuda))
    except torch.cuda.OutOfMemoryError:
        result.update(status="oom")
    except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
        result.update(status=f"error: {type(err).__name__}: {str(err)[:300]}")
    finally:
        trainer = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if name == "profile":
        result["predicted_peak_gib"] = round(predicted(r, stage).peak, 2)
    return result


def settings(name: str, r: Resolved) -> dict[str, Any]:
    hw = r.hw
    if name == "profile":
        layers = recomputed_layers(r) if hw.activation_checkpointing else 0
        return {"checkpointing": hw.activation_checkpointing, "checkpoint_layers": layers, "liger": hw.liger,
                "qlora": hw.qlora, "precision": hw.precision}
    return {"checkpointing": True, "checkpoint_layers": None, "liger": False, "qlora": hw.qlora,  # TRL's defaults
            "precision": hw.precision, "fp32_upcast": name == "trl-qlora-recipe"}


def predicted(r: Resolved, stage: str) -> Any:
    s = Shape.of(r.model.architecture_config())
    step = planner.step_of(r.hw, s, sequences=1 if stage == "sft" else 2, lora=getattr(r.cfg, "lora", LoraConfig()),
                           logit_chunk=logit_chunk(stage))
    return training(s, step)


def build(name: str, r: Resolved, stage: str, rows: list[dict[str, Any]], tokenizer: Any, work: Path,
          cuda: bool) -> Any:
    base = random_model(r, work, cuda)
    lora = getattr(r.cfg, "lora", LoraConfig())
    pool = Pool(work, None, {}, rows, [], 0, "sft" if stage == "sft" else "pref")
    order = list(range(len(rows)))
    if name == "profile":
        from pipeline import align, sft

        loaded = (with_lora(base, r.hw, lora), tokenizer)
        if stage == "sft":
            return sft.build_trainer(r, pool, order, work / name, loaded=loaded)[0]
        return align.build_trainer(r, pool, order, work / name, None, loaded=loaded)[0]
    return baseline(name, r, base, rows, tokenizer, work / name, lora)


def baseline(name: str, r: Resolved, base: Any, rows: list[dict[str, Any]], tokenizer: Any, out: Path,
             lora: LoraConfig) -> Any:
    """TRL's trainer as its own docs set it up: defaults, a LoRA of the same rank, the same rows and batch size."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLora

    peft = PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    common = dict(output_dir=str(out), per_device_train_batch_size=r.hw.micro_batch, gradient_accumulation_steps=1,
                  max_length=r.hw.max_length, max_steps=r.cfg.train.max_steps, logging_steps=1, report_to="none",
                  save_strategy="no", bf16=r.hw.precision == "bf16", fp16=r.hw.precision == "fp16",
                  use_cpu=r.hw.device == "cpu", include_num_input_tokens_seen="non_padding", seed=r.cfg.train.seed)
    if name == "trl-qlora-recipe":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base)   # the non-quantised weights upcast to fp32, checkpointing on
    if name in ("trl-defaults", "trl-qlora-recipe"):
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"messages": row["messages"]} for row in rows])
        return SFTTrainer(model=base, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                          peft_config=peft)
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])
    return DPOTrainer(model=base, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
                      peft_config=peft)


def step_timer(cuda: bool) -> Any:
    """A callback taking the wall time and non-padding tokens of every optimizer step, device-synchronised, and the
    peak memory of the steps (CUDA: the allocator's peak since training began; CPU: the RSS sampled every 50 ms)."""
    import psutil
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []
            self.rss, self.sampling, self.peaks = 0, False, [0, 0]

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                self.sampling = True
                threading.Thread(target=self.sample, daemon=True).start()
            self.clock, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                now_peaks = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
                self.peaks = [max(a, b) for a, b in zip(self.peaks, now_peaks, strict=True)]
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            self.steps.append((now - self.clock, tokens - self.tokens))
            self.clock, self.tokens = now, tokens

        def on_train_end(self, args, state, control, **kw):
            self.sampling = False

        def sample(self) -> None:
            proc = psutil.Process(os.getpid())
            while self.sampling:
                self.rss = max(self.rss, proc.memory_info().rss)
                time.sleep(0.05)

        def report(self, warmup: int) -> dict[str, Any]:
            measured = self.steps[warmup:] or self.steps
            seconds = [s for s, _ in measured]
            median = statistics.median(seconds)
            out = {"steps_measured": len(measured), "step_s_median": round(median, 4),
                   "step_s_spread": round((max(seconds) - min(seconds)) / median, 3),
                   "tokens_per_step": round(statistics.median(t for _, t in measured)),
                   "tokens_per_s": round(statistics.median(t / s for s, t in measured), 1)}
            if cuda:
                out["peak_allocated_gib"], out["peak_reserved_gib"] = (round(x / GiB, 2) for x in self.peaks)
            else:
                out["peak_rss_gib"] = round(self.rss / GiB, 3)
            return out

    return StepTimer()


def mfu(r: Resolved, rows: list[dict[str, Any]], tokens_per_s: float, cuda: bool) -> dict[str, Any]:
    """Model FLOPs utilisation on the card's peak (None on the CPU, or on a card the table does not know)."""
    import torch

    card = gpus.find(torch.cuda.get_device_name()) if cuda else None
    peak = card.bf16_tflops if card else (r.hw.peak_tflops if cuda else None)
    per_token = Shape.of(r.model.architecture_config()).flops_per_token(int(statistics.mean(x["n_tokens"] for x in rows)))
    return {"peak_tflops": peak, "mfu": round(tokens_per_s * per_token / (peak * 1e12), 4) if peak else None}


# ------------------------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------------------------
def summarise(results: list[dict[str, Any]], r: Resolved, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    by = {x["variant"]: x for x in results}
    ours, base = by.get("profile", {}), by.get(baseline_of(args.stage, r), {})
    ratio = (round(ours["tokens_per_s"] / base["tokens_per_s"], 3)
             if ours.get("status") == "ok" and base.get("status") == "ok" else None)
    return {"stage": args.stage, "hw": r.hw.name, "model": r.model.name, "mem_cap_gib": args.mem_cap_gib,
            "data": shown(repo_path(args.data)) if args.data else None, "ratio_to_baseline": ratio,
            "command": "python -m pipeline.bench " + " ".join(sys.argv[1:]), "results": results}


def table(summary: dict[str, Any]) -> str:
    head = f"bench {summary['stage']} · HW={summary['hw']} · {summary['model']}"
    rows = [f"{'variant':<18}{'status':<8}{'tok/s':>10}{'MFU':>8}{'step s':>9}{'spread':>8}{'peak GiB':>10}"
            f"{'reserved':>10}{'predicted':>10}"]
    for x in summary["results"]:
        peak = x.get("peak_allocated_gib", x.get("peak_rss_gib"))
        rows.append(f"{x['variant']:<18}{x['status'][:7]:<8}{x.get('tokens_per_s', '-'):>10}"
                    f"{_pct(x.get('mfu')):>8}{x.get('step_s_median', '-'):>9}{x.get('step_s_spread', '-'):>8}"
                    f"{peak if peak is not None else '-':>10}{x.get('peak_reserved_gib', '-'):>10}"
                    f"{x.get('predicted_peak_gib', '-'):>10}")
    ratio = summary["ratio_to_baseline"]
    rows.append(f"ratio profile / baseline: {ratio:.2f}×" if ratio else "ratio profile / baseline: n/a")
    rows += [f"{x['variant']}: {x['status']}" for x in summary["results"] if x["status"] not in ("ok", "oom")]
    return "\n".join([head, *rows])


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
