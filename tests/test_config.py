"""The strict loader: every shipped config loads and combines; every kind of bad input gets a clear error."""

from __future__ import annotations

import itertools

import pytest

from pipeline.core import profiles as C
from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS, ROOT
from pipeline.core.strict import parse_overrides
from pipeline.stage.resolve import resolve
from pipeline.stage.spec import names

PROFILES = C.available("hw")
MODELS = C.available("models")


def _kind(path) -> str:
    rel = path.relative_to(CONFIGS)
    if rel.parts[0] in ("hw", "models"):
        return rel.parts[0]
    if rel.name in ("hub.yaml", "mirrors.yaml", "measured.yaml"):
        return rel.stem
    return "stage"


OURS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "accelerate")  # accelerate's own format


@pytest.mark.parametrize("path", OURS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_under_configs_loads_with_its_kind(path):
    kind = _kind(path)
    if kind == "hw":
        assert C.load_profile(path.stem).name == path.stem
    elif kind == "models":
        assert C.load_model(path.stem).name == path.stem
    elif kind == "hub":
        assert C.load_hub().home
    elif kind == "measured":  # make bench's speeds the planner prefers (pipeline/hardware/measured.py)
        from pipeline.hardware.measured import load

        assert isinstance(load(path), list)
    elif kind == "mirrors":  # make mirrors' sources (pipeline/evaluation/mirrors.py)
        from pipeline.evaluation.mirrors import load

        assert load(path).sources
    else:
        stage = path.parent.name if path.parent.name in names() else path.stem  # configs/align/<loss>.yaml
        r = resolve(stage, config=path, hw="cpu" if "smoke" in path.parts else "4090")
        assert r.stage == stage


@pytest.mark.parametrize("stage,hw", list(itertools.product(names(), PROFILES)))
def test_every_stage_combines_with_every_profile(stage, hw):
    r = resolve(stage, hw=hw)
    assert r.hw.name == hw
    assert ("smoke" in r.config_path.split("/")) == (hw == "cpu")  # the cpu profile's config_dir: configs/smoke
    assert (r.model.tiny is not None) == (hw == "cpu")  # the cpu profile selects the offline twins


@pytest.mark.parametrize("model", MODELS)
def test_every_model_definition_combines_with_every_stage(model):
    for stage in names():
        assert resolve(stage, hw="5090", overrides=[("model", model)]).model.name == model


def test_profiles_keep_the_effective_batch_and_carry_the_design_values():
    profiles = {p: C.load_profile(p) for p in PROFILES}
    assert len({p.effective_batch for p in profiles.values()}) == 1
    p4090, p5090 = profiles["4090"], profiles["5090"]
    assert (p4090.precision, p4090.micro_batch, p4090.grad_accum, p4090.max_length) == ("bf16", 2, 16, 2048)
    assert p5090.max_length == 4096
    assert all(p.activation_checkpointing for p in (p4090, p5090))
    assert profiles["cpu"].device == "cpu" and not profiles["cpu"].qlora and not profiles["cpu"].liger


def test_stage_configs_carry_the_design_values():
    sft = resolve("sft").cfg
    assert (sft.lora.r, sft.lora.alpha, sft.lora.dropout) == (16, 16, 0.05)
    assert set(sft.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"}
    assert (sft.qlora.quant_type, sft.qlora.double_quant, sft.qlora.compute_dtype) == ("nf4", True, "bf16")
    t = sft.train
    assert (t.epochs, t.lr, t.warmup_ratio, t.scheduler, t.max_grad_norm, t.packing) == (1.5, 2e-4, 0.03, "cosine",
                                                                                       1.0, False)
    orpo, dpo = resolve("align", variant="orpo").cfg, resolve("align", variant="dpo").cfg
    assert (orpo.loss, orpo.beta, orpo.length_penalty, orpo.reference) == ("orpo", 0.2, 0.02, "none")
    assert (dpo.loss, dpo.beta, dpo.reference) == ("dpo", 0.2, "sft_policy")
    prep = resolve("prepare").cfg
    assert prep.mix.sft.zh_share == prep.mix.pref.zh_share == 0.7
    assert len(prep.sources) == 7
    assert resolve("evaluate").cfg.tasks == ["cmmlu", "ceval-valid", "hellaswag", "winogrande"]


def test_model_definitions_ship_their_architecture_and_a_chinese_system_prompt():
    qwen25, qwen3 = C.load_model("qwen2.5-7b-instruct"), C.load_model("qwen3-4b-instruct-2507")
    arch = qwen25.architecture_config()
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["vocab_size"]) == (3584, 28, 152064)
    assert qwen25.max_positions == 32768 and qwen3.max_positions == 262144
    assert qwen25.hub_id == "Qwen/Qwen2.5-7B-Instruct" and len(qwen25.revision) == 40
    for name in MODELS:
        prompt = C.load_model(name).system_prompt
        assert sum("\u4e00" <= ch <= "\u9fff" for ch in prompt) > 20, name


# ---------------------------------------------------------------------------------------------------------------
# Errors (each bad input as a user meets it — exit code, message, nothing written — is in tests/test_bad_inputs.py:
# an unknown override key, profile or model, max_length over the model's, CUDA-only features on the cpu profile)
# ---------------------------------------------------------------------------------------------------------------
def _problems(**kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        resolve(**kwargs)
    return str(err.value)


def test_unknown_key_names_file_path_and_closest_key(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text((CONFIGS / "sft.yaml").read_text(encoding="utf-8").replace("lora: {r: 16", "lora: {rr: 16"),
                   encoding="utf-8")
    msg = _problems(stage="sft", config=bad)
    assert str(bad) in msg and "`lora.rr`" in msg and "did you mean `lora.r`?" in msg


def test_wrong_type_and_bad_choice_are_collected_together():
    msg = _problems(stage="sft", overrides=parse_overrides(["train.lr=fast", "train.scheduler=cosin",
                                                              "hw.micro_batch=true"]))
    assert "3 config problems" in msg
    assert "`train.lr` (from --set): expected a number; got 'fast'" in msg
    assert "`train.scheduler` (from --set): expected one of 'cosine'" in msg and "did you mean `cosine`?" in msg
    assert "configs/hw/4090.yaml: `micro_batch` (from --set): expected an integer; got True" in msg


def test_missing_file(tmp_path):
    assert f"{tmp_path / 'nope.yaml'}: file not found" in _problems(stage="sft", config=tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("model: tiny-qwen2\nlora: {r: 16\ntrain:\n  lr: 1\n", encoding="utf-8")
    msg = _problems(stage="sft", config=bad)
    assert f"{bad}:" in msg and "malformed YAML" in msg
    assert any(f"{bad}:{n}:" in msg for n in (2, 3, 4))


def test_tab_indentation_is_named_with_its_line(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("model: tiny-qwen2\ntrain:\n\tlr: 0.1\n", encoding="utf-8")
    assert f"{bad}:3: tab character in the indentation" in _problems(stage="sft", config=bad)


def test_duplicate_keys_are_refused(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("model: tiny-qwen2\nmodel: qwen2.5-7b-instruct\n", encoding="utf-8")
    assert "duplicate key 'model'" in _problems(stage="sft", config=bad)


def test_missing_required_key(tmp_path):
    bad = tmp_path / "orpo.yaml"
    bad.write_text("model: tiny-qwen2\n", encoding="utf-8")
    assert "`loss`: required key is missing" in _problems(stage="align", config=bad)


def test_cross_field_rules_name_the_fields():
    msg = _problems(stage="prepare", overrides=[("buckets", [1024, 256]), ("mix.sft.zh_share", 1.5),
                                                ("filters.min_cn_ratio", -0.1)])
    assert "`buckets` must be positive and strictly ascending" in msg
    assert "`mix.sft.zh_share` must be in [0, 1]; got 1.5" in msg
    assert "`filters.min_cn_ratio` must be in [0, 1]" in msg


def test_checkpoint_layers_takes_a_count_or_auto_and_needs_checkpointing():
    assert C.load_profile("4090", [("checkpoint_layers", 20)]).checkpoint_layers == 20
    assert C.load_profile("4090").checkpoint_layers == "auto"
    msg = _problems(stage="sft", hw="4090", overrides=[("hw.checkpoint_layers", "some")])
    assert "`checkpoint_layers` (from --set): expected an integer or one of 'auto' or null; got 'some'" in msg
    msg = _problems(stage="sft", hw="cpu", overrides=[("hw.checkpoint_layers", 2)])
    assert "`checkpoint_layers` is 2" in msg and "turn checkpointing on" in msg
    assert "at least 1" in _problems(stage="sft", hw="4090", overrides=[("hw.checkpoint_layers", 0)])


def test_align_loss_must_agree_with_its_config():
    assert "`loss: orpo` but --loss dpo" in _problems(stage="align", config=CONFIGS / "align" / "orpo.yaml",
                                                      variant="dpo")
    assert "reference model" in _problems(stage="align", variant="dpo", overrides=[("reference", "none")])


# ---------------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------------
def test_overrides_parse_yaml_values_from_set_and_from_one_string():
    parsed = parse_overrides(["tasks=[cmmlu, hellaswag]", "limit=null"], "lora.r=8 'adapter=a b'")
    assert parsed == [("tasks", ["cmmlu", "hellaswag"]), ("limit", None), ("lora.r", 8), ("adapter", "a b")]
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lora.r"])


def test_overrides_reach_list_items_by_index_or_name():
    r = resolve("prepare", overrides=[("sources.shp.path", "/data/shp"), ("sources.0.revision", "abc")])
    assert r.cfg.sources[5].path == "/data/shp" and r.cfg.sources[0].revision == "abc"
    assert "no list item 'nope'" in _problems(stage="prepare", overrides=[("sources.nope.path", "x")])


def test_yaml_1_1_exponent_without_dot_is_read_as_a_number():
    assert resolve("sft", overrides=parse_overrides(["train.lr=2e-4"])).cfg.train.lr == 2e-4


def test_hub_settings_come_from_one_file_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    shown = C.apply_hub_env(C.HubConfig(endpoint=None, home=".cache/huggingface"))
    assert shown["HF_ENDPOINT"] == "https://mirror.example (from the environment)"
    assert shown["HF_HOME"].endswith(".cache/huggingface (from configs/hub.yaml)")
    import os

    assert os.environ["HF_HOME"] == str(ROOT / ".cache/huggingface")
