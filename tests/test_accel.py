"""ACCEL=ddp|fsdp|zero2|zero3: the name checked before anything runs, every shipped accelerate config read by
accelerate's own loader, the plan's launch line and sharding, the refusals (ZeRO without deepspeed, FSDP / ZeRO on a
CPU profile — and the accelerate behaviour that refusal rests on), QLoRA's storage dtype under FSDP.
The two-process DDP run on CPU is tests/test_sft.py::test_ddp_on_two_cpu_processes_logs_one_run_from_rank_0."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import align, pipeline, sft
from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS, ROOT
from pipeline.core.runtime import sharded
from pipeline.stage import accel
from pipeline.stage.resolve import resolve

SHIPPED = sorted(CONFIGS.glob("accelerate/*.yaml"))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh tracking store that must stay empty."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return db


def _runs(db: Path) -> int:
    if not db.exists():
        return 0
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


def test_the_choices_are_the_shipped_files():
    assert accel.choices() == ["ddp", "fsdp", "zero2", "zero3"] == [p.stem for p in SHIPPED]


@pytest.mark.parametrize("main", [sft.main, align.main, pipeline.main], ids=["sft", "align", "pipeline"])
def test_an_unknown_accel_exits_2_naming_the_choices_and_creates_no_run(main, store, capsys):
    assert main(["--hw", "cpu", "--accel", "nope", "--dry-run", "false"]) == 2
    err = capsys.readouterr().err
    assert "--accel 'nope': no configs/accelerate/nope.yaml; choices: ddp, fsdp, zero2, zero3" in err
    assert _runs(store) == 0


def test_make_pipeline_and_sft_with_a_bad_accel_stop_in_the_pre_check(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MAKEFLAGS": "",
           "MAKELEVEL": ""}
    env.pop("MLFLOW_RUN_ID", None)
    for target in ("pipeline", "sft"):
        done = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", target, "HW=cpu",
                               "ACCEL=bad"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert "choices: ddp, fsdp, zero2, zero3" in done.stderr
        assert "mlflow run" not in done.stdout  # stopped before `mlflow run` made a run
    assert _runs(tmp_path / "mlflow.db") == 0


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = accel.load(path)
    assert cfg == load_config_from_file(str(path)) and accel.kind(cfg) in accel.SHARDS
    assert path.read_text(encoding="utf-8").startswith("# `make sft ACCEL=")  # each file says what it is for
    assert cfg.mixed_precision == "no" and not cfg.use_cpu  # the Trainer sets precision from the profile


def test_the_fsdp_config_follows_the_peft_recipe():
    cfg = accel.load(CONFIGS / "accelerate" / "fsdp.yaml").fsdp_config
    assert cfg["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in cfg  # taken from the model's _no_split_modules
    assert cfg["fsdp_use_orig_params"] and cfg["fsdp_sync_module_states"] and cfg["fsdp_cpu_ram_efficient_loading"]
    assert cfg["fsdp_sharding_strategy"] == "FULL_SHARD" and cfg["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero3 = accel.load(CONFIGS / "accelerate" / "zero3.yaml").deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] and zero3["zero3_save_16bit_model"]
    assert accel.load(CONFIGS / "accelerate" / "zero2.yaml").deepspeed_config["zero_stage"] == 2
    for name in ("zero2", "zero3"):  # left to the Trainer ("auto"): a fixed value here would clash with the profile
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(
            accel.load(CONFIGS / "accelerate" / f"{name}.yaml").deepspeed_config)


@pytest.mark.parametrize("text, words", [
    ("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nmixed_precision: 'no'\nuse_cpu: false\n"
     "fsdp_cofig: {}\n", "unknown keys (['fsdp_cofig'])"),
    ("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nmixed_precision: 'no'\nuse_cpu: false\n"
     "fsdp_config: {fsdp_use_orig_param: true}\n", "fsdp_use_orig_param is not an option of `accelerate launch`"),
    ("distributed_type: [FSDP\n", "accelerate cannot read it"),
], ids=["top-level key", "fsdp key", "yaml"])
def test_a_broken_config_is_refused_naming_the_file(tmp_path, text, words):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="broken.yaml") as err:
        accel.load(path)
    assert words in str(err.value)


@pytest.mark.parametrize("main, stage", [(sft.main, "sft"), (align.main, "align")])
def test_the_plan_shows_the_launch_line_what_is_sharded_and_the_memory_per_card(main, stage, store, capsys):
    assert main(["--hw", "4090", "--accel", "fsdp", "--set", "train.max_steps=3"]) == 0
    page = capsys.readouterr().out
    assert (f"launch   accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N -m "
            f"pipeline.{stage} --hw 4090 --dry-run false") in page
    assert "--overrides train.max_steps=3" in page and "(N = the visible GPUs)" in page
    assert "the frozen base weights, the LoRA weights" in page and "one FSDP unit per Qwen2DecoderLayer" in page
    # Qwen2.5-7B in bf16 (15.2 GB of weights) over 2 and 4 cards, computed by the planner
    assert "2 cards weights 7.6 + LoRA states 0.32 + 1.6 gathered" in page
    assert "4 cards weights 3.8 + LoRA states 0.16 + 2.3 gathered" in page
    assert "accelerate config: configs/accelerate/fsdp.yaml [read by accelerate]" in page
    assert _runs(store) == 0


def test_the_wrapped_layer_comes_from_the_model(store, capsys):
    assert sft.main(["--hw", "cpu", "--accel", "fsdp", "--set", "model=tiny-qwen3"]) == 0
    assert "one FSDP unit per Qwen3DecoderLayer" in capsys.readouterr().out


def test_the_pipeline_plan_shows_the_launch_line_of_sft_and_align(store, capsys):
    assert pipeline.main(["--hw", "4090", "--accel", "zero3"]) == 0
    page = capsys.readouterr().out
    assert "-m pipeline.sft --hw 4090 --dry-run false" in page and "-m pipeline.align --hw 4090 --dry-run false" in page
    assert page.count("accelerate (zero3)") == 2  # sft and align, not the other stages


@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3"])
def test_sharding_on_a_cpu_profile_is_refused_by_the_pre_check(name, store, capsys):
    assert sft.main(["--hw", "cpu", "--accel", name, "--check"]) == 2
    err = capsys.readouterr().err
    assert f"ACCEL={name} on a CPU profile: accelerate " in err and "use ACCEL=ddp on CPU" in err
    with pytest.raises(ConfigError, match="on a CPU profile"):  # and the launch itself, without make
        from pipeline.stage import cli

        cli.relaunch(sft.STAGE, name, ["--hw", "cpu"], "cpu")
    assert _runs(store) == 0


def test_ddp_on_cpu_and_fsdp_on_a_gpu_profile_pass_the_check():
    assert accel.problems("ddp", "cpu") == [] and accel.problems("fsdp", "cuda") == []


def test_zero_without_deepspeed_is_refused_naming_the_install(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else found(name, *a))
    for name in ("zero2", "zero3"):
        assert accel.problems(name, "cuda") == [
            f'ACCEL={name} runs DeepSpeed ZeRO, and the deepspeed package is not installed: pip install -e '
            f'".[deepspeed]" (on a CUDA machine), or use ACCEL=fsdp']
    assert accel.problems("fsdp", "cuda") == []


def test_the_deepspeed_extra_is_what_the_refusal_names():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["deepspeed"]] == ["deepspeed"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is about machines without a GPU")
def test_accelerate_really_cannot_shard_on_cpu(tmp_path):
    """The facts the CPU refusal states, so the refusal is revisited when accelerate changes: its FSDP plugin stops
    without a GPU (sync_module_states), and without that setting two gloo processes come up as plain MULTI_CPU."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(RuntimeError, match="There are currently no available devices found"):
        FullyShardedDataParallelPlugin(sync_module_states=True)
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom accelerate import Accelerator\nfrom accelerate.state import AcceleratorState\n"
                     "Accelerator(cpu=True)\ns = AcceleratorState()\n"
                     "with open(os.path.join(os.path.dirname(__file__), 'rank' + os.environ['RANK']), 'w') as f:\n"
                     "    print('RANK', os.environ['RANK'], s.distributed_type, getattr(s, 'fsdp_plugin', None), "
                     "file=f, end='')\n")  # a file per rank: the ranks' stdout lines interleave
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "MLFLOW_RUN"))}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(CONFIGS / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                           "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false",
                           str(probe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = sorted(p.read_text() for p in tmp_path.glob("rank[0-9]"))
    assert ranks == ["RANK 0 DistributedType.MULTI_CPU None", "RANK 1 DistributedType.MULTI_CPU None"]


@pytest.mark.parametrize("compute, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_qlora_under_fsdp_stores_the_4bit_weights_in_the_compute_dtype(compute, dtype, monkeypatch):
    """FSDP shards a flat buffer of one dtype: the 4-bit weights must be packed into the dtype of the bf16/fp16
    weights around them (the PEFT FSDP-QLoRA recipe), and the model loaded in that dtype. Building the config
    object needs neither a GPU nor bitsandbytes."""
    import torch

    from pipeline.models.loading import QloraConfig, load_kwargs

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with fsdp.yaml sets it
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    hw = dataclasses.replace(resolve("sft", hw="4090", overrides=[]).hw, qlora=True)
    kw = load_kwargs(hw, QloraConfig(compute_dtype=compute))
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_quant_storage == q.bnb_4bit_compute_dtype == kw["dtype"] == getattr(torch, dtype)
    assert "device_map" not in kw  # one process: transformers places it
    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 1 of `accelerate launch`: its own GPU, not every rank's on GPU 0
    assert load_kwargs(hw, QloraConfig(compute_dtype=compute))["device_map"] == {"": 1}


def test_sharded_follows_the_launchers_environment(monkeypatch):
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert not sharded()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not sharded()  # ZeRO-2 keeps the whole model on every rank: rank 0 may generate alone
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharded()
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded()


def test_the_ddp_plan_on_cpu_shows_the_two_gloo_processes_it_launches(store, capsys):
    assert sft.main(["--hw", "cpu", "--accel", "ddp"]) == 0
    page = capsys.readouterr().out
    assert ("launch   accelerate launch --config_file configs/accelerate/ddp.yaml --multi_gpu --num_processes 2 -m "
            "pipeline.sft --hw cpu --dry-run false") in page
    assert "shards   nothing: every process holds the whole model" in page and "[read by accelerate]" in page
