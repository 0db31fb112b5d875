"""export: merge the LoRA adapter into the bf16 base, check logits, write a model card, register the merged model.

The adapter (run id, `name@alias`, `name/version` or folder; a QLoRA-trained one too) is merged with PEFT's safe merge
into the base in bf16 — never into a 4-bit model (the cpu profile merges in fp32). Merged and adapter logits on fixed
zh/en prompts must agree within `logits_tolerance`. The folder holds safetensors, the tokenizer with a chat template
whose default system prompt is the model definition's Chinese one, the generation config and a model card.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import atomic
from pipeline.core.errors import StageError
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.hardware import planner
from pipeline.models.loading import base_model_path, load_tokenizer, require_safetensors, safe_load_kwargs, same_base
from pipeline.stage import cli
from pipeline.stage.dryrun import Plan, adapter_base_input, dir_output, model_ref_input, registry_output
from pipeline.stage.resolve import on_adapter_base
from pipeline.stage.spec import Stage
from pipeline.tracking import fingerprints, lineage, model_registry, runs
from pipeline.tracking.model_registry import RegisterConfig
from pipeline.training.probes import PROBE_FILE, probe_inputs, probe_record


@dataclass
class ExportConfig:
    model: str = "qwen2.5-7b-instruct"
    adapter: str = "zh-align-orpo@candidate"
    output_dir: str = "outputs/export/default"
    logits_tolerance: float = 1e-2
    register: RegisterConfig = field(default_factory=lambda: RegisterConfig(name="zh-align-merged"))


def plan(r: Resolved) -> Plan:
    r = on_adapter_base(r, r.cfg.adapter, registry=False)
    cfg = r.cfg
    return Plan(r, facts=[
        ("merge", f"into the bf16 base (never a 4-bit one); max |merged − adapter| logit ≤ {cfg.logits_tolerance}"),
    ], inputs=[model_ref_input("adapter", cfg.adapter, "align", r), adapter_base_input(r, cfg.adapter)],
       outputs=[dir_output(cfg.output_dir, "merged model + model card"), registry_output(cfg.register)],
       estimate=planner.export(r.hw, r.model))


QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass
class ExportResult:
    output_dir: str
    max_logit_diff: float
    registered: str | None

    def __str__(self) -> str:
        return f"max |merged − adapter| logit {self.max_logit_diff:.2e} → {self.output_dir} → {self.registered}"


def run(r: Resolved) -> ExportResult:
    r = on_adapter_base(r, r.cfg.adapter)
    cfg = r.cfg
    target = lineage.find_adapter(cfg.adapter, stage="align", model=r.model.name, hw=r.hw.name,
                                    key="adapter")
    recorded = target["tags"].get("base_model", "")
    if not same_base(recorded, r.model):
        raise StageError(f"adapter {target['source']} was trained on base {recorded!r}, but this export's base is "
                         f"{r.model.hub_id or r.model.name}; set `adapter` or `model`")
    out = repo_path(cfg.output_dir)
    atomic.check_replaceable(out, "config.json", "merged model")
    inherited = {k: v for k, v in target["tags"].items() if k.startswith(("data.", "licence.", "eval.", "start_from"))}
    tags = {**inherited, "adapter": target["source"], "base_model": r.model.hub_id or r.model.name,
            "base_revision": r.model.revision or "", "stage": STAGE.name, "hw": r.hw.name}
    with runs.start_run(STAGE.name, r.as_dict(), hw=r.hw.name, model=r.model.name, tags={"adapter": target["source"]}):
        merged, tokenizer, diff = _merge(r, target["folder"])
        runs.log_metrics({"merge.max_abs_logit_diff": diff})
        if diff > cfg.logits_tolerance:
            raise StageError(f"merged logits differ from the adapter's by {diff:.3g} > logits_tolerance "
                             f"{cfg.logits_tolerance}; the merge is not faithful (check the adapter and dtype)")
        record = probe_record(merged, tokenizer, r.model.system_prompt)
        with atomic.replacing(out, marker="config.json", what="merged model") as staged:  # whole or not at all
            _save(merged, tokenizer, r, staged, target, diff)
            (staged / PROBE_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        runs.log_artifacts([out / PROBE_FILE])
        reg = model_registry.log_merged_model(out, registered_name=cfg.register.name, alias=cfg.register.alias,
                                        system_prompt=r.model.system_prompt,
                                        tags={**tags, "merge.max_abs_logit_diff": f"{diff:.3g}",
                                              "git.sha": runs.git_state().get("git.sha", "")})
    return ExportResult(cfg.output_dir, diff, reg["uri"] if reg else None)


def _merge(r: Resolved, adapter: Path) -> tuple[Any, Any, float]:
    """(merged model, tokenizer, max |merged − adapter| logit over the probe prompts)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, revision = base_model_path(r.model)
    dtype = torch.float32 if r.hw.precision == "fp32" else torch.bfloat16  # bf16, never the 4-bit QLoRA base
    require_safetensors(adapter)
    base = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, **safe_load_kwargs(r.model))
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tokenizer = load_tokenizer(r.model)
    batch = probe_inputs(tokenizer, r.model.system_prompt)
    with torch.no_grad():
        before = model(**batch).logits.float()
        merged = model.merge_and_unload(safe_merge=True)
        after = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    return merged, tokenizer, float((after - before).abs()[mask].max())


def _save(model: Any, tokenizer: Any, r: Resolved, out: Path, target: dict[str, Any], diff: float) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer.chat_template and QWEN_DEFAULT in tokenizer.chat_template:
        tokenizer.chat_template = tokenizer.chat_template.replace(QWEN_DEFAULT, r.model.system_prompt)
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(model_card(r, target, diff), encoding="utf-8")


def model_card(r: Resolved, target: dict[str, Any], diff: float) -> str:
    tags = target["tags"]
    evals = "\n".join(f"| {k.removeprefix('eval.')} | {v} |" for k, v in sorted(tags.items()) if k.startswith("eval."))
    return "\n".join([
        f"# {r.cfg.register.name} — merged by zh-align", "",
        f"- base: `{r.model.hub_id or r.model.name}` @ `{r.model.revision or 'local'}` (licence {r.model.licence})",
        f"- adapter: `{target['source']}` (run `{target['run_id'] or '-'}`), merged with PEFT's safe merge into the "
        f"{'fp32' if r.hw.precision == 'fp32' else 'bf16'} base; max |merged − adapter| logit on the probe prompts: "
        f"{diff:.3g}",
        f"- data: sha256 `{tags.get('data.sha256', '-')}`, prepare run `{tags.get('data.run_id') or '-'}`",
        f"- licences: non-commercial or unclear sources in the training data: "
        f"{tags.get('licence.noncommercial_sources', 'unknown')} (licence.noncommercial="
        f"{tags.get('licence.noncommercial', 'unknown')}); research use unless every source allows more",
        f"- default system prompt (chat template): {r.model.system_prompt}", "",
        "## Evaluation (from the adapter's registered version)", "",
        "| metric | value |", "|---|---|", evals or "| (not evaluated) | |", ""])


STAGE = Stage("export", ExportConfig, plan, run, __doc__.split("\n\n")[0], links={"adapter": "align"},
              after=("evaluate",), key_metrics=("merge.",), pinned={"adapter": "adapter"},
              checks={"weights": fingerprints.weights})


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
