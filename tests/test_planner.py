"""The planner against every configuration measured in ../shared/ANCHORS.md (H200, Qwen2.5-7B shape, LoRA r=16 on
all seven projections), against counts worked out by hand, and in the plans."""

from __future__ import annotations

import json

import pytest

from pipeline.core.profiles import load_model, load_profile
from pipeline.hardware import gpus, planner
from pipeline.hardware.memory import NF4_BYTES, GiB, Shape, Step, layer_activation_bytes, training
from pipeline.sft import main as sft_main

QWEN7B = Shape.of(load_model("qwen2.5-7b-instruct").architecture_config())
TOLERANCE = 0.15

# (step, peak allocated GiB measured) — ANCHORS.md, measured 2026-11-28 on an H200
ANCHORS = {
    "TRL SFTTrainer defaults, 2 x 2048, grad-ckpt": (Step(2, 2048), 17.5),
    "TRL SFTTrainer + Liger, grad-ckpt": (Step(2, 2048, liger=True), 17.2),
    "TRL SFTTrainer + Liger, no grad-ckpt": (Step(2, 2048, liger=True, checkpointing=False), 40.0),
    "raw loop, no fused loss (full logits)": (Step(2, 2048, full_logits=True), 23.7),
    "raw loop + Liger, grad-ckpt": (Step(2, 2048, liger=True), 17.3),
    "raw loop + Liger, 4 x 4096": (Step(4, 4096, liger=True), 24.8),
    "QLoRA NF4 without the fp32 upcast": (Step(2, 2048, liger=True, qlora=True), 8.2),
    "TRL DPOTrainer, micro-batch 1, 1024 + 1024": (Step(1, 2048, sequences=2), 17.0),
    "TRL DPOTrainer, micro-batch 2": (Step(2, 2048, sequences=2), 19.3),
}


@pytest.mark.parametrize("name", ANCHORS)
def test_peak_memory_is_within_15_percent_of_every_anchor(name):
    step, measured = ANCHORS[name]
    predicted = training(QWEN7B, step).peak
    assert abs(predicted / measured - 1) <= TOLERANCE, f"{name}: predicted {predicted:.2f} GiB, measured {measured}"


def test_the_shape_counts_match_the_published_model():
    assert QWEN7B.params == pytest.approx(7.62e9, rel=0.005)                  # Qwen2.5-7B: 7.61 B parameters
    assert QWEN7B.lora_params(16, list(Step(1, 1).lora_targets)) == 40_370_176  # PEFT's count: 40.4 M trainable
    assert QWEN7B.flops_per_token(2048) == pytest.approx(30.7e9, rel=0.01)    # ANCHORS.md: 30.7 GFLOP per token


def test_parts_worked_out_by_hand_on_the_tiny_model():
    tiny = Shape.of(load_model("tiny-qwen2").architecture_config())  # h 64, ffn 128, 2 layers, 4/2 heads, vocab 1152
    per_layer = 64 * 64 + 64 * 32 * 2 + 64 * 64 + 64 * 128 * 3
    assert tiny.params == 2 * per_layer + 2 * 1152 * 64 + 2 * 2 * 64 + 64
    mem = training(tiny, Step(1, 100, lora_r=4, lora_targets=("q_proj",), lora_dropout=False, precision="fp32",
                              checkpointing=False))
    assert mem.parts["weights"] == pytest.approx(tiny.params * 4 / GiB)
    assert mem.parts["adapter"] == pytest.approx(2 * 4 * (64 + 64) * 16 / GiB)      # 2 layers × r·(in+out) × 16 B
    kept = 6 * 64 + 2 * 64 + 2 * 32 + 4 * 128                                          # elements a layer keeps a token
    assert mem.parts["activations"] == pytest.approx(100 * 3 * kept * 4 / GiB)        # (layers + 1) × 100 tokens, fp32
    q = training(tiny, Step(1, 100, qlora=True))
    assert q.parts["weights"] == pytest.approx((2 * per_layer * NF4_BYTES + (tiny.params - 2 * per_layer) * 2) / GiB)


def test_a_step_that_does_not_fit_says_what_would():
    hw = load_profile("4090", [("micro_batch", 8), ("grad_accum", 4)])
    step = planner.step_of(hw, QWEN7B)
    mem = training(QWEN7B, step)
    text, fits = planner.memory_line(mem, hw, step)
    assert not fits and "FAIL" in text
    batch = int(text.split("to fit: micro_batch ")[1].split()[0])
    assert training(QWEN7B, Step(batch, 2048, liger=True)).reserved <= planner.usable_gib(hw)
    assert training(QWEN7B, Step(batch + 1, 2048, liger=True)).reserved > planner.usable_gib(hw)
    assert f"hw.micro_batch={batch} hw.grad_accum={32 // batch}" in text


def test_checkpointing_some_layers_lies_between_all_and_none_by_hand():
    step = Step(2, 2048, liger=True)
    every, none = training(QWEN7B, step), training(QWEN7B, Step(2, 2048, liger=True, checkpointing=False))
    assert training(QWEN7B, Step(2, 2048, liger=True, checkpoint_layers=28)).peak == pytest.approx(every.peak)
    assert training(QWEN7B, Step(2, 2048, liger=True, checkpoint_layers=99)).peak == pytest.approx(every.peak)
    # a layer that keeps its activations instead of its input: activations minus the input (h bf16 values a token)
    per_layer = step.tokens * (layer_activation_bytes(QWEN7B, step) - 2 * QWEN7B.hidden) / GiB
    for k in (1, 14, 27):
        peak = training(QWEN7B, Step(2, 2048, liger=True, checkpoint_layers=k)).peak
        assert peak == pytest.approx(every.peak + (28 - k) * per_layer) and every.peak < peak <= none.peak + per_layer


def test_auto_checkpoint_layers_is_the_fewest_that_fit_with_the_margin():
    hw = load_profile("4090")
    room = planner.usable_gib(hw) * (1 - planner.TUNING_MARGIN)
    sft = planner.step_of(hw, QWEN7B)
    k = sft.checkpoint_layers
    assert 0 < k < 28 and training(QWEN7B, sft).reserved <= room
    assert training(QWEN7B, Step(2, 2048, liger=True, checkpoint_layers=k - 1)).reserved > room
    pair = planner.step_of(hw, QWEN7B, sequences=2)                 # a DPO pair: twice the tokens, more recompute
    assert pair.checkpointed(28) > k
    big = load_profile("4090", [("micro_batch", 16), ("grad_accum", 2)])  # nothing fits: all layers recompute
    assert planner.step_of(big, QWEN7B).checkpointed(28) == 28
    assert planner.mfu(sft, 28) > planner.mfu(Step(2, 2048, liger=True), 28)


def test_time_comes_from_the_pool_manifest_when_there_is_one(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"pool": {"sft": {"tokens": 2_000_000}}}), encoding="utf-8")
    hw, model = load_profile("4090", [("checkpoint_layers", None)]), load_model("qwen2.5-7b-instruct")
    est = planner.training(hw, model, kind="sft", epochs=1.5, max_steps=None, data_path=tmp_path,
                           save_total_limit=2)
    tps = planner.tokens_per_second(hw, model, planner.step_of(hw, planner.shape(model)))
    assert est.seconds == pytest.approx(3_000_000 / tps)
    assert "3.0 M tokens (the pool's manifest: 2.00 M × 1.5 epoch(s))" in dict(est.lines)["time"]
    assert tps == pytest.approx(0.257 * 165e12 / QWEN7B.flops_per_token(2048))   # the anchor MFU on the 4090's peak


def test_every_plan_shows_memory_time_and_disk_and_make_plan_a_total(capsys):
    assert sft_main(["--hw", "4090"]) == 0
    out = capsys.readouterr().out
    assert "    memory  GPU peak 20.4 GiB allocated" in out and ": PASS" in out and "auto: 24 of 28 layers" in out
    assert "    time    " in out and "    disk    " in out and "base download 14.2 GiB" in out
    from pipeline.plan import main as plan_main

    assert plan_main(["--hw", "5090"]) == 0
    total = capsys.readouterr().out.splitlines()[-1]
    assert total.startswith("── total ── (HW=5090)") and "GiB of disk" in total


def test_the_gpu_table_finds_cards_by_their_torch_names():
    assert gpus.find("NVIDIA H200").bf16_tflops == 989.0
    assert gpus.find("NVIDIA GeForce RTX 4090").memory_gib == 24
    assert gpus.find("Tesla T4") is None


def test_the_time_line_prefers_a_bench_measurement_of_the_same_settings(tmp_path, monkeypatch, capsys):
    """bench --log-results records the CUDA profile results; a plan with the same settings then times itself with the
    measured MFU scaled to its card (measured on another card) or the measured tokens/s (on its own card); other
    settings (QLoRA), CPU results and runs on a pool's lengths are not used."""
    from pipeline import bench
    from pipeline.hardware import measured
    from pipeline.stage.resolve import resolve

    monkeypatch.setattr(measured, "PATH", tmp_path / "measured.yaml")
    r = resolve("sft", hw="4090")
    hw, model = r.hw, r.model

    def summary(name: str, device: str, tps: float, mfu: float | None, data: str | None = None,
                changed: dict | None = None) -> None:
        result = {"variant": "profile", "stage": "sft", "hw": "4090", "model": model.name, "device": device,
                  "micro_batch": hw.micro_batch, "max_length": hw.max_length, "date": "2026-12-06", "status": "ok",
                  "tokens_per_s": tps, "mfu": mfu, "peak_allocated_gib": 20.0, **bench.settings("profile", r)}
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"stage": "sft", "hw": "4090", "model": model.name, "mem_cap_gib": 24, "data": data, "results": [
                {**result, **(changed or {})}, {**result, "variant": "trl-defaults"}]}), encoding="utf-8")

    def time_line() -> str:
        return dict(planner.training(hw, model, kind="sft", lora=r.cfg.lora, epochs=1, max_steps=None,
                                     data_path=None, save_total_limit=2).lines)["time"]

    assert "estimate: the H200 anchors' MFU" in time_line()
    summary("h200", "NVIDIA H200", 20_000.0, 0.30)
    summary("cpu", "cpu", 10.0, None)
    summary("qlora", "NVIDIA H200", 9_000.0, 0.2, changed={"qlora": True})
    summary("pool", "NVIDIA H200", 30_000.0, 0.4, data="outputs/data/smoke")
    assert bench.main(["--log-results", str(tmp_path)]) == 0  # logs 4 bench runs (the test's store), records 2
    assert "recorded 2 measured speed(s)" in capsys.readouterr().out
    assert [(m.device, m.qlora) for m in measured.load()] == [("NVIDIA H200", False), ("NVIDIA H200", True)]
    scaled = 0.30 * 165e12 / QWEN7B.flops_per_token(hw.max_length)
    assert f"at ~{scaled:,.0f} tok/s (estimate: this profile's 30.0% MFU, make bench on NVIDIA H200, 2026-12-06" \
           in time_line()
    summary("4090", "NVIDIA GeForce RTX 4090", 3_100.0, 0.28)
    bench.record_results(tmp_path / "4090")
    assert "at ~3,100 tok/s (measured: make bench on NVIDIA GeForce RTX 4090, 2026-12-06)" in time_line()
    other = load_profile("4090", [("micro_batch", 1)])  # another micro-batch: no measurement of it
    assert "anchors" in dict(planner.training(other, model, kind="sft", lora=r.cfg.lora, epochs=1, max_steps=None,
                                               data_path=None, save_total_limit=2).lines)["time"]


def test_a_broken_measured_file_is_named_with_its_fix(tmp_path, monkeypatch):
    from pipeline.core.errors import ConfigError
    from pipeline.hardware import measured

    monkeypatch.setattr(measured, "PATH", tmp_path / "measured.yaml")
    for text in ("measurements: [{stage: sft}]\n", "measurements: [oops\n", "- a list\n"):
        measured.PATH.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=r"measured.yaml is not a list of `measurements` as make bench writes"):
            measured.load()
