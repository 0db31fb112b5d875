"""The align stage on the tiny model (CPU, offline): the R-DPO length penalty against a hand computation, DPO starts
at ln 2 and its margin grows, ORPO's single end token, the start-point lookup, and both losses registered."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import align, prepare, sft
from pipeline.core.errors import StageError
from pipeline.core.strict import parse_overrides
from pipeline.data import prepared
from pipeline.stage.resolve import resolve
from pipeline.training import preference

FAST = ["hw.micro_batch=4", "hw.grad_accum=1", "train.logging_steps=1", "train.eval_steps=100", "train.save_steps=100"]


@pytest.fixture(scope="module")
def world(module_store):
    """A prepared pool and a finished sft run with its registered adapter, in this module's own MLflow store."""
    tmp = module_store
    assert prepare.main(["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={tmp / 'data'}"]) == 0
    r = resolve("sft", hw="cpu", overrides=parse_overrides([f"data.path={tmp / 'data'}", f"output_dir={tmp / 'sft'}",
                                                              "train.max_steps=2", *FAST]))
    done = sft.run(r)
    return {"tmp": tmp, "pool": tmp / "data", "adapter": Path(done.adapter)}


def resolved(world, loss: str, *sets: str):
    return resolve("align", hw="cpu", variant=loss, overrides=parse_overrides(
        [f"data.path={world['pool']}", f"output_dir={world['tmp'] / loss}", *FAST, *sets]))


def test_the_rdpo_length_penalty_matches_a_hand_computation():
    # beta 0.2, alpha 0.02: margin 0.2 * ((-10 + 11) - (-12 + 11)) = 0.4; |y_w| - |y_l| = 20 tokens -> 0.4 - 0.4 = 0
    loss = preference.rdpo_loss(0.2, 0.02, torch.tensor(-10.0), torch.tensor(-12.0), torch.tensor(-11.0),
                                torch.tensor(-11.0), torch.tensor(30.0), torch.tensor(10.0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    without = preference.rdpo_loss(0.2, 0.0, torch.tensor(-10.0), torch.tensor(-12.0), torch.tensor(-11.0),
                                   torch.tensor(-11.0), torch.tensor(30.0), torch.tensor(10.0))
    assert without.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.4))), abs=1e-6)  # alpha 0: plain DPO
    # what the DPO trainer does: shift the reference log-probs by alpha / beta * |y|, then TRL's own margin
    shifted = 0.2 * ((-10.0 - (-11.0 + 0.02 / 0.2 * 30)) - (-12.0 - (-11.0 + 0.02 / 0.2 * 10)))
    assert shifted == pytest.approx(0.0, abs=1e-9)
    # ORPO: log sigma(log-odds ratio - alpha * 20) with a log-odds ratio of 0.4 -> log sigma(0) = -ln 2
    assert preference.orpo_ratio(torch.tensor(0.4), 0.02, torch.tensor(30.0), torch.tensor(10.0)).item() == \
        pytest.approx(-math.log(2), abs=1e-6)


def test_dpo_starts_at_ln2_without_the_penalty_and_its_margin_grows(world):
    r = resolved(world, "dpo", "length_penalty=0.0", "train.max_steps=8", "train.lr=5e-3", "train.warmup_ratio=0.0",
                 f"start_from={world['adapter']}")
    p = prepared.load_pool(r.cfg.data, "pref", r)
    trainer, _ = align.build_trainer(r, p, [0, 1, 2, 3] * 8, world["tmp"] / "dpo-ln2", world["adapter"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its own reference
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.05


def test_orpo_labels_end_with_a_single_end_token(world):
    r = resolved(world, "orpo", f"start_from={world['adapter']}")
    p = prepared.load_pool(r.cfg.data, "pref", r)
    trainer, tok = align.build_trainer(r, p, [0, 1], world["tmp"] / "orpo-labels", world["adapter"])
    batch = next(iter(trainer.get_train_dataloader()))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for key in ("chosen_labels", "rejected_labels"):
        for labels in batch[key]:
            learned = labels[labels != -100].tolist()
            assert learned.count(end) == 1 and learned[-1] == end, tok.decode(learned)


def test_a_start_point_of_another_base_is_refused_naming_both(world, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}))
    with pytest.raises(StageError, match=r"trained on base 'Qwen/Qwen2.5-7B-Instruct', but this run's base is tiny-qwen2"):
        align.run(resolved(world, "dpo", f"start_from={foreign}"))
    with pytest.raises(StageError, match="not a run, `name@alias` or `name/version`"):
        align.run(resolved(world, "dpo", "start_from=no-such-model@candidate"))


@pytest.mark.parametrize("loss", ["orpo", "dpo"])
def test_both_losses_start_from_the_latest_sft_run_and_register_a_version_that_generates(world, loss):
    result = align.run(resolved(world, loss, "train.max_steps=3"))  # start_from null: the latest sft run
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(f"zh-align-{loss}", "candidate")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["loss"] == loss
    assert version.tags["start_from"].startswith("models:/zh-align-sft/") and version.tags["start_from.run_id"]
    assert result.start == version.tags["start_from"]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "length_penalty", "tokens_per_second"):
        assert key in run.data.metrics, key
    if loss == "orpo":
        assert "nll_loss" in run.data.metrics and "log_odds_ratio" in run.data.metrics
    pairs = [json.loads(line) for line in (world["pool"] / "pref.jsonl").read_text(encoding="utf-8").splitlines()]
    assert run.data.params["data.zh_pairs"] == str(sum(p["lang"] == "zh" for p in pairs)) != "0"
    log = (world["tmp"] / loss / "logs" / f"{run.info.run_id}.log").read_text(encoding="utf-8")
    assert "***** Running training *****" in log and "step 3/3" in log and f"align registered models:/zh-align-{loss}" in log
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/logs/align.log") == log
    out = mlflow.pyfunc.load_model(f"models:/zh-align-{loss}@candidate").predict({"prompt": ["你好"]})
    assert len(out) == 1 and isinstance(out[0], str)


def test_the_dry_run_shows_start_point_loss_and_mix(capsys):
    assert align.main(["--hw", "4090", "--loss", "dpo"]) == 0
    page = capsys.readouterr().out
    assert "latest FINISHED sft run with base qwen2.5-7b-instruct and profile 4090" in page
    assert "length penalty alpha 0.02" in page and "alpha·(|y_w| − |y_l|)" in page
    assert "zh share of tokens >=" in page
    assert "(appears once the prepared pool exists: `make prepare HW=4090 DRY_RUN=0`)" in page


def test_the_dry_run_shows_the_pairs_the_sampler_will_train_on_and_the_probes(world, capsys):
    assert align.main(["--hw", "cpu", "--loss", "dpo", "--set", f"data.path={world['pool']}"]) == 0
    page = capsys.readouterr().out
    r = resolved(world, "dpo")
    _, report = prepared.order(prepared.load_pool(r.cfg.data, "pref", r), r.cfg.train.epochs)
    assert f"{report['rows']} rows, {report['tokens']} tokens, zh share {report['zh_share']:.3f}" in page
    total = next(line for line in page.splitlines() if line.strip().startswith("total")).split()[1:]
    assert total == [*(f"{b['rows']}·{b['tokens']}" for b in report["buckets"]), f"{report['rows']}·{report['tokens']}"]
    assert "zh: 写一首关于秋天的五言绝句。" in page and "en: Explain in two sentences why the sky is blue." in page


def _orpo_batch(world, name: str):
    """An ORPO trainer on the sft adapter and its first training batch (4 pairs)."""
    r = resolved(world, "orpo", f"start_from={world['adapter']}")
    p = prepared.load_pool(r.cfg.data, "pref", r)
    trainer, _ = align.build_trainer(r, p, [0, 1, 2, 3], world["tmp"] / name, world["adapter"])
    return trainer, next(iter(trainer.get_train_dataloader()))


def _shifted_tokens(batch) -> int:
    """Positions the ORPO loss projects: 2B rows of the padded length minus one."""
    width = max(batch[f"{k}_input_ids"].shape[1] for k in ("chosen", "rejected"))
    return 2 * len(batch["chosen_labels"]) * (width - 1)


def _loss_and_grads(trainer, model, batch, forward):
    torch.manual_seed(0)  # the same LoRA dropout masks for both implementations
    model.zero_grad()
    out = forward(model, batch)
    (out[4] - trainer.odds_ratio_loss(out[0], out[1])[0].mean()).backward()
    return [x.detach() for x in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant", "reentrant"])
def test_the_chunked_orpo_forward_gives_trls_values_and_lora_gradients(world, monkeypatch, checkpointing):
    from trl.experimental.orpo import ORPOTrainer

    trainer, batch = _orpo_batch(world, f"orpo-chunked-{checkpointing}")
    model = trainer.model.train()
    if checkpointing != "off":
        model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()  # what the trainer does for PEFT under checkpointing
        assert model.is_activation_checkpointing
    tokens = _shifted_tokens(batch)
    chunk = tokens // 3 + 1
    assert 0 < tokens - 2 * chunk < chunk  # three chunks, the last one partial
    monkeypatch.setattr(preference, "CHUNK_TOKENS", chunk)
    ours, grads = _loss_and_grads(trainer, model, batch, trainer.concatenated_forward)
    theirs, their_grads = _loss_and_grads(trainer, model, batch,
                                          lambda m, b: ORPOTrainer.concatenated_forward(trainer, m, b))
    for i in (0, 1, 4):  # chosen logps, rejected logps, chosen NLL
        torch.testing.assert_close(ours[i], theirs[i], rtol=1e-5, atol=1e-6)
    for i in (2, 3):  # what get_batch_loss_metrics logs as logits/chosen, logits/rejected
        assert ours[i].shape == () and theirs[i].dim() == 3
        torch.testing.assert_close(ours[i].mean(), theirs[i].mean(), rtol=1e-5, atol=1e-6)
    assert ours[4] > 0 and (ours[0] < 0).all() and (ours[0] != ours[1]).any()
    assert grads.keys() == their_grads.keys() and any("lora_" in n for n in grads)
    assert any(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_chunked_orpo_loss_never_projects_more_than_a_chunk(world, monkeypatch):
    trainer, batch = _orpo_batch(world, "orpo-chunk-hook")
    model = trainer.model.train()
    monkeypatch.setattr(preference, "CHUNK_TOKENS", 16)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        loss, metrics = trainer.get_batch_loss_metrics(model, batch)
        loss.backward()
        trained = sum(seen)
        with torch.no_grad():  # evaluation: nothing to recompute
            trainer.get_batch_loss_metrics(model.eval(), batch, train_eval="eval")
    finally:
        handle.remove()
    rows, tokens = 2 * len(batch["chosen_labels"]), _shifted_tokens(batch)
    assert len(seen) > 3 and max(seen) <= 16, seen
    # the model projects one position per row; every other position once forward and once more in backward
    assert trained == rows + 2 * tokens and sum(seen) - trained == rows + tokens
    assert math.isfinite(metrics["logits/chosen"]) and metrics["nll_loss"] > 0
