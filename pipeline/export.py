"""export: merge the LoRA adapter into the bf16 base, check logits, write a model card, register the merged model.

The adapter (run id, `name@alias`, `name/version` or folder; a QLoRA-trained one too) is merged with PEFT's safe merge
into the base in bf16 — never into a 4-bit model (the cpu profile merges in fp32). Merged and adapter logits on fixed
zh/en prompts must agree within `logits_tolerance`. The folder holds safetensors, the tokenizer with a chat template
whose default system prompt is the model definition's Chinese one, the generation config and a model card.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Plan, base_model_input, dir_output, model_ref_input, registry_output, repo_path

STAGE = "export"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    return Plan(r, facts=[
        ("merge", f"into the bf16 base (never a 4-bit one); max |merged − adapter| logit ≤ {cfg.logits_tolerance}"),
    ], inputs=[model_ref_input("adapter", cfg.adapter, "align", r), base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "merged model + model card"), registry_output(cfg.register)])


QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass
class ExportResult:
    output_dir: str
    max_logit_diff: float
    registered: str | None

    def __str__(self) -> str:
        return f"max |merged − adapter| logit {self.max_logit_diff:.2e} → {self.output_dir} → {self.registered}"


def run(r: Resolved) -> ExportResult:
    from pipeline import tracking
    from pipeline.align import same_base

    cfg = r.cfg
    target = tracking.find_adapter(cfg.adapter, stage="align", model=r.model.name, hw=r.hw.name)
    recorded = target["tags"].get("base_model", "")
    if not same_base(recorded, r):
        raise cli.StageError(f"adapter {target['source']} was trained on base {recorded!r}, but this export's base is "
                             f"{r.model.hub_id or r.model.name}; set `adapter` or `model`")
    out = repo_path(cfg.output_dir)
    lineage = {k: v for k, v in target["tags"].items() if k.startswith(("data.", "licence.", "eval.", "start_from"))}
    tags = {**lineage, "adapter": target["source"], "base_model": r.model.hub_id or r.model.name,
            "base_revision": r.model.revision or "", "stage": STAGE, "hw": r.hw.name}
    with tracking.start_run(STAGE, r.as_dict(), hw=r.hw.name, model=r.model.name, tags={"adapter": target["source"]}):
        merged, tokenizer, diff = _merge(r, target["folder"])
        tracking.log_metrics({"merge.max_abs_logit_diff": diff})
        if diff > cfg.logits_tolerance:
            raise cli.StageError(f"merged logits differ from the adapter's by {diff:.3g} > logits_tolerance "
                                 f"{cfg.logits_tolerance}; the merge is not faithful (check the adapter and dtype)")
        _save(merged, tokenizer, r, out, target, diff)
        record = probe_record(merged, tokenizer, r.model.system_prompt)
        (out / PROBE_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tracking.log_artifacts([out / PROBE_FILE])
        reg = tracking.log_merged_model(out, registered_name=cfg.register.name, alias=cfg.register.alias,
                                        system_prompt=r.model.system_prompt,
                                        tags={**tags, "merge.max_abs_logit_diff": f"{diff:.3g}",
                                              "git.sha": tracking.git_state().get("git.sha", "")})
    return ExportResult(cfg.output_dir, diff, reg["uri"] if reg else None)


def probe_texts(tokenizer: Any, system: str) -> list[str]:
    """The fixed zh / en probe prompts, chat-templated with the zh system prompt."""
    from pipeline.train import PROBES

    prompts = [p for ps in json.loads(PROBES.read_text(encoding="utf-8")).values() for p in ps]
    return [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": p}],
                                          tokenize=False, add_generation_prompt=True) for p in prompts]


def left_padded(tokenizer: Any, texts: list[str]) -> Any:
    """Texts as one batch, padded on the left: the last position is every text's next token."""
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


def probe_inputs(tokenizer: Any, system: str) -> Any:
    """The probe prompts as one left-padded batch."""
    return left_padded(tokenizer, probe_texts(tokenizer, system))


def next_token_logits(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    """float32 logits of the next token after each templated text, [len(texts), vocab]."""
    import torch

    with torch.no_grad():
        return model(**left_padded(tokenizer, texts)).logits.float()[:, -1, :]


PROBE_FILE = "probe_logits.json"
TOP_K = 20


def probe_record(model: Any, tokenizer: Any, system: str) -> dict[str, Any]:
    """The merged model's fingerprint: for each probe prompt (as the exact templated text), the top-k next-token ids
    and logits. Kept in the folder and on the run, so a pulled copy can be checked against what export saw."""
    texts = probe_texts(tokenizer, system)
    last = next_token_logits(model, tokenizer, texts)
    top = last.topk(min(TOP_K, last.shape[-1]), dim=-1)
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "texts": texts,
            "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()}


def check_probe_logits(folder: Path, tolerance: float | None = None) -> float:
    """Load a merged folder with transformers alone and return max |logit − logged logit| over the recorded top-k
    of every probe prompt; raise StageError above ``tolerance`` (default: 1e-4 in fp32, 5e-2 in bf16) or when the
    folder has no record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        raise cli.StageError(f"{folder} has no {PROBE_FILE}; only folders written by `make export` can be checked")
    record = json.loads(path.read_text(encoding="utf-8"))
    tolerance = tolerance if tolerance is not None else (1e-4 if record["dtype"] == "float32" else 5e-2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, record["dtype"])).eval()
    last = next_token_logits(model, AutoTokenizer.from_pretrained(folder), record["texts"])
    got = last.gather(1, torch.tensor(record["top_ids"]))
    diff = float((got - torch.tensor(record["top_logits"])).abs().max())
    if diff > tolerance:
        raise cli.StageError(f"{folder}: logits differ from those logged at export by {diff:.3g} > {tolerance:g}; "
                             f"the folder is not the exported model (or was loaded in another dtype)")
    return diff


def _merge(r: Resolved, adapter: Path) -> tuple[Any, Any, float]:
    """(merged model, tokenizer, max |merged − adapter| logit over the probe prompts)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.models import base_model_path, load_tokenizer

    path, revision = base_model_path(r.model)
    dtype = torch.float32 if r.hw.precision == "fp32" else torch.bfloat16  # bf16, never the 4-bit QLoRA base
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype),
                                      str(adapter)).eval()
    tokenizer = load_tokenizer(r.model)
    batch = probe_inputs(tokenizer, r.model.system_prompt)
    with torch.no_grad():
        before = model(**batch).logits.float()
        merged = model.merge_and_unload(safe_merge=True)
        after = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    return merged, tokenizer, float((after - before).abs()[mask].max())


def _save(model: Any, tokenizer: Any, r: Resolved, out: Path, target: dict[str, Any], diff: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
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


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
