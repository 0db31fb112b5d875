"""Typed configs and the one strict loader.

Three kinds of YAML live under ``configs/``: stage configs (``configs/<stage>.yaml`` and their offline twins in
``configs/smoke/``), model definitions (``configs/models/``) and hardware profiles (``configs/hw/``). All of them go
through :func:`load_yaml` + :func:`build`, which collect every problem (unknown key with the closest valid one, wrong
type, bad choice, cross-field rule) and raise them together as one :class:`ConfigError`.

Overrides (``--set key=value``) are applied to the raw YAML tree *before* validation, so they pass the same checks.
A key whose first segment is ``hw`` overrides the hardware profile (``hw.micro_batch=1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
STAGES = ("prepare", "sft", "align", "evaluate", "export")
LOSSES = ("orpo", "dpo")
DEFAULT_HW = "4090"
Precision = Literal["bf16", "fp16", "fp32"]
LogBackend = Literal["none", "tensorboard", "wandb"]  # beside MLflow, which is always on


class ConfigError(ValueError):
    """One or more problems in a config, each naming the file and the dotted path."""

    def __init__(self, problems: list[str]):
        problems = list(dict.fromkeys(problems))  # the same problem found by several stages is said once
        self.problems = problems
        super().__init__("\n".join(problems) if len(problems) == 1 else
                         f"{len(problems)} config problems:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------------------------------
# Shared pieces of stage configs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"])


@dataclass
class QloraConfig:
    """How the base is quantised when the hardware profile turns ``qlora`` on."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16"] = "bf16"


@dataclass
class DataRef:
    """Where a training stage reads the prepared pool: an MLflow run id of a prepare run, or a folder."""
    run_id: str | None = None
    path: str | None = "outputs/data/default"


@dataclass
class RegisterConfig:
    name: str = "zh-align-sft"
    alias: str = "candidate"


# --------------------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------------------
SourceName = Literal["oasst1", "coig", "coig_pc_core", "shp", "ultrafeedback_binarized", "hh_rlhf", "pku_saferlhf"]
SOURCE_NAMES: tuple[str, ...] = typing.get_args(SourceName)
# Options that only one source reads; setting them on another source is an error (a key no code reads is a bug).
SOURCE_OPTIONS = {"min_score_ratio": ("shp",), "chosen_by": ("pku_saferlhf",),
                  "subsets": ("coig", "shp", "hh_rlhf", "pku_saferlhf")}


@dataclass
class SourceConfig:
    """One dataset: where it lives on the hub (pinned), or a local copy in the hub's layout under `path`."""
    name: SourceName
    hub_id: str
    revision: str
    path: str | None = None
    splits: list[str] | None = None      # splits to read (file names as on the hub); null = every split found
    subsets: list[str] | None = None     # sub-folders/files as on the hub (hh_rlhf data dirs, coig files, shp domains)
    max_rows: int | None = None          # stop after this many parsed rows (a quick look); null = all
    min_score_ratio: float | None = None                            # shp: keep pairs with score_ratio >= this
    chosen_by: Literal["safer", "better", "agree"] | None = None    # pku_saferlhf: which label picks `chosen`


@dataclass
class FilterConfig:
    min_cn_ratio: float = 0.3
    allow_english_fallback: bool = True
    min_chars: int = 2                   # a turn shorter than this after normalising counts as empty
    over_length: Literal["drop", "truncate"] = "drop"  # rows over the largest bucket edge: dropped, or cut by turns


@dataclass
class CurriculumStage:
    """One stage of the curriculum: it ends when `until` of the total training tokens have been seen."""
    until: float
    bucket_weights: list[float] | None = None  # one weight per bucket; null = all 1
    zh_share: float | None = None              # null = the row type's zh_share


@dataclass
class RowMix:
    """How one row type (sft or pref) is mixed each epoch."""
    zh_share: float = 0.7                                    # at least this share of the epoch's tokens is zh
    source_weights: dict[str, float] = field(default_factory=dict)  # round-robin weight per source (default 1)
    curriculum: list[CurriculumStage] = field(default_factory=list)  # empty = one stage, every bucket weight 1


@dataclass
class MixConfig:
    sft: RowMix = field(default_factory=RowMix)
    pref: RowMix = field(default_factory=RowMix)
    max_repeats: int = 1                 # > 1 lets zh rows repeat up to this many times per epoch to meet zh_share
    on_shortfall: Literal["downsample", "relax", "fail"] = "downsample"


@dataclass
class DecontamConfig:
    ngram: int = 13                      # n (zh characters / en words) of a shared span that drops a row; 0 = off


@dataclass
class PrepareConfig:
    sources: list[SourceConfig]
    model: str = "qwen2.5-7b-instruct"
    output_dir: str = "outputs/data/default"
    seed: int = 42
    eval_fraction: float = 0.02          # share of conversation trees / prompts held out as *_eval.jsonl
    num_proc: int | None = None          # worker processes for the cleaning and token maps; null = every core
    filters: FilterConfig = field(default_factory=FilterConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    buckets: list[int] = field(default_factory=lambda: [256, 1024, 2048, 4096])
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class TrainConfig:
    """The schedule both training stages share; the defaults are the design's SFT values."""
    epochs: float = 1.5
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 42
    max_steps: int | None = None         # stop after this many optimizer steps (smoke runs, tests); null = epochs
    logging_steps: int = 10
    eval_steps: int = 200                # eval_loss on the eval split every N steps (and at the end)
    save_steps: int = 200                # a checkpoint every N steps (what `resume` continues from)
    save_total_limit: int = 2
    resume: str | None = None            # auto (the last checkpoint in output_dir) | a checkpoint folder | null
    early_stopping_patience: int | None = None  # stop after N evals without a lower eval_loss; null = off


@dataclass
class SftTrainConfig(TrainConfig):
    packing: bool = False


@dataclass
class SftConfig:
    model: str = "qwen2.5-7b-instruct"
    data: DataRef = field(default_factory=DataRef)
    output_dir: str = "outputs/sft/default"
    lora: LoraConfig = field(default_factory=LoraConfig)
    qlora: QloraConfig = field(default_factory=QloraConfig)
    train: SftTrainConfig = field(default_factory=SftTrainConfig)
    log_backend: LogBackend = "none"
    register: RegisterConfig = field(default_factory=RegisterConfig)


@dataclass
class AlignTrainConfig(TrainConfig):
    epochs: float = 1.0
    lr: float = 5e-6
    warmup_ratio: float = 0.1


@dataclass
class AlignConfig:
    loss: Literal["orpo", "dpo"]
    model: str = "qwen2.5-7b-instruct"
    start_from: str | None = None
    data: DataRef = field(default_factory=DataRef)
    output_dir: str = "outputs/align/default"
    beta: float = 0.2
    length_penalty: float = 0.02
    reference: Literal["none", "sft_policy"] = "none"
    qlora: QloraConfig = field(default_factory=QloraConfig)
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig)
    log_backend: LogBackend = "none"
    register: RegisterConfig = field(default_factory=RegisterConfig)


@dataclass
class GateConfig:
    """When the forgetting report calls a drop real (see pipeline/forgetting.py)."""
    max_drop: float = 0.02               # accuracy a task group may lose ...
    alpha: float = 0.05                  # ... unless the exact McNemar test says the loss is not noise (p < alpha)


@dataclass
class EvaluateConfig:
    model: str = "qwen2.5-7b-instruct"
    adapter: str | None = "zh-align-sft@candidate"
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


@dataclass
class ExportConfig:
    model: str = "qwen2.5-7b-instruct"
    adapter: str = "zh-align-orpo@candidate"
    output_dir: str = "outputs/export/default"
    logits_tolerance: float = 1e-2
    register: RegisterConfig = field(default_factory=lambda: RegisterConfig(name="zh-align-merged"))


STAGE_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig, "sft": SftConfig, "align": AlignConfig, "evaluate": EvaluateConfig,
    "export": ExportConfig,
}


# --------------------------------------------------------------------------------------------------------------
# Model definitions, hardware profiles, hub settings
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TinySpec:
    """Build the model offline from its ``architecture`` file with random weights and an in-process tokenizer."""
    seed: int = 0
    tokenizer_vocab: int = 1024


@dataclass
class ModelDef:
    name: str
    family: Literal["qwen2", "qwen3"]
    licence: str
    architecture: str
    chat_template: Literal["qwen2_5", "qwen3_instruct_2507"]
    system_prompt: str
    hub_id: str | None = None
    revision: str | None = None
    tiny: TinySpec | None = None
    source_file: str = ""

    @property
    def architecture_path(self) -> Path:
        return CONFIGS / "models" / self.architecture

    def architecture_config(self) -> dict[str, Any]:
        return json.loads(self.architecture_path.read_text(encoding="utf-8"))

    @functools.cached_property
    def max_positions(self) -> int:
        return int(self.architecture_config()["max_position_embeddings"])

    @property
    def ref(self) -> str:
        """What the plan and the tags show: hub id @ revision, or the tiny model's name."""
        return f"{self.hub_id}@{self.revision}" if self.hub_id else f"{self.name} (built offline, seed {self.tiny.seed})"


@dataclass
class HardwareProfile:
    name: str
    description: str
    device: Literal["cuda", "cpu"]
    memory_gib: float
    precision: Precision
    micro_batch: int
    grad_accum: int
    max_length: int
    qlora: bool
    activation_checkpointing: bool
    liger: bool
    peak_tflops: float | None = None
    source_file: str = ""

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


@dataclass
class HubConfig:
    """Hugging Face hub mirror and cache: the one place every stage reads (the design's setup_env.sh)."""
    endpoint: str | None = None
    home: str = ".cache/huggingface"


# --------------------------------------------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path | str) -> dict[str, Any]:
    """Read one YAML mapping with errors that name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if line[: len(line) - len(line.lstrip())].count("\t"):
            raise ConfigError([f"{path}:{lineno}: tab character in the indentation; YAML indents with spaces only"])
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{where}: malformed YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of keys at the top, got {type(data).__name__}"])
    return data


# --------------------------------------------------------------------------------------------------------------
# Validation: raw YAML tree -> dataclass, collecting every problem
# --------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}


def _close(word: str, options: typing.Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean `{prefix}{match[0]}`?" if match else ""


class _Builder:
    def __init__(self, source: str, overridden: set[str]):
        self.source = source
        self.overridden = overridden
        self.problems: list[str] = []

    def fail(self, path: str, msg: str) -> None:
        origin = " (from --set)" if path in self.overridden else ""
        self.problems.append(f"{self.source}: `{path}`{origin}: {msg}")

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if raw is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                return self.value(inner[0], raw, path)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, raw, path)
        if origin is Literal:
            choices = typing.get_args(tp)
            if raw not in choices:
                self.fail(path, f"expected {_type_name(tp)}; got {raw!r}" + _close(str(raw), map(str, choices)))
            return raw
        if origin is list:
            if not isinstance(raw, list):
                self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
                return raw
            (item,) = typing.get_args(tp)
            return [self.value(item, v, f"{path}.{i}") for i, v in enumerate(raw)]
        if origin is dict:
            if not isinstance(raw, dict):
                self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
                return raw
            _, item = typing.get_args(tp)
            return {str(k): self.value(item, v, f"{path}.{k}") for k, v in raw.items()}
        return self.scalar(tp, raw, path)

    def scalar(self, tp: Any, raw: Any, path: str) -> Any:
        if tp is float:
            if isinstance(raw, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
                try:
                    return float(raw)
                except ValueError:
                    pass
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return float(raw)
        elif tp is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
        elif tp is str:
            if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
                return str(raw)
        elif isinstance(raw, tp):
            return raw
        self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
        return raw

    def dataclass(self, cls: type, raw: Any, path: str) -> Any:
        if not isinstance(raw, dict):
            self.fail(path or "(top)", f"expected a mapping; got {raw!r}")
            return None
        fields = _fields(cls)
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, val in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in fields:
                hint = _close(str(key), fields, f"{path}." if path else "")
                self.fail(sub, f"unknown key{hint} (valid here: {', '.join(fields)})")
                continue
            kwargs[key] = self.value(hints[key], val, sub)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(f"{path}.{name}" if path else name, "required key is missing")
        try:
            return cls(**kwargs)
        except TypeError:
            return None


def build(cls: type, raw: dict[str, Any], source: str, overridden: set[str] | None = None) -> Any:
    """Validate a raw YAML tree against a dataclass; raise every problem at once."""
    builder = _Builder(source, overridden or set())
    obj = builder.dataclass(cls, raw, "")
    if builder.problems:
        raise ConfigError(builder.problems)
    return obj


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------
def parse_overrides(sets: list[str] | None = None, overrides: str | None = None) -> list[tuple[str, Any]]:
    """`--set k=v` (repeatable) and `--overrides "k=v k2=v2"`; values are YAML (`tasks=[a, b]`, `limit=null`)."""
    items = list(sets or []) + shlex.split(overrides or "")
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: expected key=value, e.g. lora.r=8"])
        try:
            parsed.append((key.strip(), yaml.safe_load(value) if value != "" else ""))
        except yaml.YAMLError as err:
            raise ConfigError([f"override {item!r}: the value is not valid YAML ({err})"]) from None
    return parsed


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted path in a raw YAML tree. List items by index (`sources.0.path`) or by name (`sources.shp.path`).

    Unknown keys are created, so that validation reports them with a suggestion.
    """
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, ".".join(parts[: i + 1]))]
        else:
            nxt = node.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = node[part] = {}
            node = nxt
    last = parts[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, dotted)
        node[idx] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [it.get("name") for it in items if isinstance(it, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError([f"override `{where}`: no list item {part!r}; use an index 0..{len(items) - 1}"
                       + (f" or a name ({', '.join(map(str, names))})" if any(names) else "")])


# --------------------------------------------------------------------------------------------------------------
# Resolution: stage config + hardware profile + model definition (+ hub settings)
# --------------------------------------------------------------------------------------------------------------
def available(kind: str) -> list[str]:
    """Names of the model definitions (`models`) or hardware profiles (`hw`)."""
    return sorted(p.stem for p in (CONFIGS / kind).glob("*.yaml"))


def load_profile(name: str, overrides: list[tuple[str, Any]] = ()) -> HardwareProfile:
    path = CONFIGS / "hw" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError([f"unknown hardware profile {name!r}; valid profiles: {', '.join(available('hw'))}"
                           f" (files in {path.parent.relative_to(ROOT)}/)" + _close(name, available("hw"))])
    raw = load_yaml(path)
    for key, value in overrides:
        apply_override(raw, key, value)
    prof = build(HardwareProfile, raw, _rel(path), {f"{k}" for k, _ in overrides})
    prof.source_file = _rel(path)
    problems = check_profile(prof)
    if problems:
        raise ConfigError(problems)
    return prof


def load_model(name: str) -> ModelDef:
    path = CONFIGS / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError([f"unknown model definition {name!r}; valid models: {', '.join(available('models'))}"
                           + _close(name, available("models"))])
    model = build(ModelDef, load_yaml(path), _rel(path))
    model.source_file = _rel(path)
    problems = []
    if model.hub_id and not model.revision:
        problems.append(f"{model.source_file}: `revision` is required with `hub_id` (pin a commit sha)")
    if bool(model.hub_id) == bool(model.tiny):
        problems.append(f"{model.source_file}: set exactly one of `hub_id` (a real model) or `tiny` (built offline)")
    if not model.architecture_path.is_file():
        problems.append(f"{model.source_file}: `architecture` file {model.architecture} not found in configs/models/")
    if problems:
        raise ConfigError(problems)
    return model


def load_hub() -> HubConfig:
    path = CONFIGS / "hub.yaml"
    return build(HubConfig, load_yaml(path), _rel(path))


def check_profile(p: HardwareProfile) -> list[str]:
    src = p.source_file
    problems = []
    for key in ("micro_batch", "grad_accum", "max_length"):
        if getattr(p, key) < 1:
            problems.append(f"{src}: `{key}` must be at least 1; got {getattr(p, key)}")
    if p.device == "cpu":
        for key in ("qlora", "liger"):
            if getattr(p, key):
                problems.append(f"{src}: `{key}` needs CUDA but `device` is cpu; set `{key}: false`")
    return problems


def check_stage(stage: str, cfg: Any, src: str) -> list[str]:
    """Cross-field rules of a stage config; each problem names the fields."""
    problems = []

    def share(path: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            problems.append(f"{src}: `{path}` must be in [0, 1]; got {value}")

    if stage == "prepare":
        edges = cfg.buckets
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or not edges or edges[0] < 1:
            problems.append(f"{src}: `buckets` must be positive and strictly ascending; got {edges}")
        share("filters.min_cn_ratio", cfg.filters.min_cn_ratio)
        share("eval_fraction", cfg.eval_fraction)
        names = [s.name for s in cfg.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"{src}: `sources` lists {', '.join(dupes)} more than once")
        for i, s in enumerate(cfg.sources):
            for key, owners in SOURCE_OPTIONS.items():
                if getattr(s, key) is not None and s.name not in owners:
                    problems.append(f"{src}: `sources.{i}.{key}` is read only for {' / '.join(owners)}, "
                                    f"not {s.name}; remove it")
            if s.name == "hh_rlhf" and s.subsets and "red-team-attempts" in s.subsets:
                problems.append(f"{src}: `sources.{i}.subsets` names red-team-attempts, which holds red-team "
                                f"transcripts, not chosen/rejected pairs; remove it (pair subsets: harmless-base, "
                                f"helpful-base, helpful-online, helpful-rejection-sampled)")
            if s.max_rows is not None and s.max_rows < 1:
                problems.append(f"{src}: `sources.{i}.max_rows` must be at least 1 or null; got {s.max_rows}")
        if cfg.num_proc is not None and cfg.num_proc < 1:
            problems.append(f"{src}: `num_proc` must be at least 1 or null (every core); got {cfg.num_proc}")
        if cfg.decontam.ngram < 0:
            problems.append(f"{src}: `decontam.ngram` must be >= 0 (0 = off); got {cfg.decontam.ngram}")
        if cfg.filters.min_chars < 1:
            problems.append(f"{src}: `filters.min_chars` must be at least 1; got {cfg.filters.min_chars}")
        if cfg.mix.max_repeats < 1:
            problems.append(f"{src}: `mix.max_repeats` must be at least 1 (1 = no upsampling); got {cfg.mix.max_repeats}")
        for kind in ("sft", "pref"):
            problems += _check_row_mix(cfg.mix, kind, names, len(edges), src)
    if hasattr(cfg, "lora"):
        if cfg.lora.r < 1 or cfg.lora.alpha < 1:
            problems.append(f"{src}: `lora.r` and `lora.alpha` must be at least 1; got {cfg.lora.r}, {cfg.lora.alpha}")
        if not 0.0 <= cfg.lora.dropout < 1.0:
            problems.append(f"{src}: `lora.dropout` must be in [0, 1); got {cfg.lora.dropout}")
    if hasattr(cfg, "train"):
        t = cfg.train
        share("train.warmup_ratio", t.warmup_ratio)
        if t.lr <= 0 or t.epochs <= 0:
            problems.append(f"{src}: `train.lr` and `train.epochs` must be positive")
        for key in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            if getattr(t, key) < 1:
                problems.append(f"{src}: `train.{key}` must be at least 1; got {getattr(t, key)}")
        for key in ("max_steps", "early_stopping_patience"):
            if getattr(t, key) is not None and getattr(t, key) < 1:
                problems.append(f"{src}: `train.{key}` must be at least 1 or null; got {getattr(t, key)}")
    if stage == "align":
        if cfg.beta <= 0:
            problems.append(f"{src}: `beta` must be positive; got {cfg.beta}")
        if cfg.length_penalty < 0:
            problems.append(f"{src}: `length_penalty` must be >= 0; got {cfg.length_penalty}")
        if cfg.loss == "orpo" and cfg.reference != "none":
            problems.append(f"{src}: `reference` must be none for `loss: orpo` (ORPO needs no reference model)")
        if cfg.loss == "dpo" and cfg.reference == "none":
            problems.append(f"{src}: `reference` must be sft_policy for `loss: dpo` (DPO needs a reference model)")
    return problems


def _check_row_mix(mix: MixConfig, kind: str, sources: list[str], n_buckets: int, src: str) -> list[str]:
    row: RowMix = getattr(mix, kind)
    at = f"mix.{kind}"
    problems = []
    if not 0.0 <= row.zh_share <= 1.0:
        problems.append(f"{src}: `{at}.zh_share` must be in [0, 1]; got {row.zh_share}")
    for name, w in row.source_weights.items():
        if name not in sources:
            problems.append(f"{src}: `{at}.source_weights.{name}` is not a source of this config"
                            f"{_close(name, sources)} (sources: {', '.join(sources)})")
        elif w < 0:
            problems.append(f"{src}: `{at}.source_weights.{name}` must be >= 0; got {w}")
    last = 0.0
    for i, st in enumerate(row.curriculum):
        where = f"{at}.curriculum.{i}"
        if not last < st.until <= 1.0:
            problems.append(f"{src}: `{where}.until` must rise above the previous stage's ({last}) up to 1.0; "
                            f"got {st.until}")
        last = max(last, st.until)
        if st.zh_share is not None and not 0.0 <= st.zh_share <= 1.0:
            problems.append(f"{src}: `{where}.zh_share` must be in [0, 1]; got {st.zh_share}")
        bw = st.bucket_weights
        if bw is not None and (len(bw) != n_buckets or min(bw) < 0 or not any(bw)):
            problems.append(f"{src}: `{where}.bucket_weights` needs {n_buckets} weights (one per bucket), "
                            f">= 0 and not all 0; got {bw}")
    if row.curriculum and row.curriculum[-1].until != 1.0:
        problems.append(f"{src}: the last stage of `{at}.curriculum` must have `until: 1.0` "
                        f"(the curriculum covers all the training tokens); got {row.curriculum[-1].until}")
    return problems


@dataclass
class Resolved:
    """Everything a stage needs to plan or run: its config, the profile, the model definition and hub settings."""
    stage: str
    config_path: str
    cfg: Any
    hw: HardwareProfile
    model: ModelDef
    hub: HubConfig
    overrides: list[tuple[str, Any]]
    loss: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The resolved config, as logged (YAML artifact + flattened params) and shown in the plan."""
        return {
            "stage": self.stage, "config_file": self.config_path,
            "config": dataclasses.asdict(self.cfg),
            "hw": _public(self.hw), "model": _public(self.model), "hub": dataclasses.asdict(self.hub),
            "cli_overrides": [f"{k}={v}" for k, v in self.overrides],
        }


def _public(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(obj).items() if k != "source_file"}


def default_config_path(stage: str, hw: str, loss: str | None = None) -> Path:
    """`configs/<stage>.yaml`, or its offline twin in `configs/smoke/` for the cpu profile; align picks by loss."""
    name = (loss or "orpo") if stage == "align" else stage
    return CONFIGS / ("smoke" if hw == "cpu" else "") / f"{name}.yaml"


def resolve(stage: str, *, config: str | Path | None = None, hw: str = DEFAULT_HW,
            overrides: list[tuple[str, Any]] = (), loss: str | None = None) -> Resolved:
    """Load and check one stage's config with its hardware profile and model definition."""
    if stage not in STAGES:
        raise ConfigError([f"unknown stage {stage!r}; stages: {', '.join(STAGES)}"])
    if loss is not None and (stage != "align" or loss not in LOSSES):
        raise ConfigError([f"--loss {loss!r}: only the align stage takes a loss, one of {', '.join(LOSSES)}"])
    hw_over = [(k.split(".", 1)[1], v) for k, v in overrides if k.startswith("hw.")]
    cfg_over = [(k, v) for k, v in overrides if not k.startswith("hw.")]
    problems: list[str] = []
    profile = _collect(problems, load_profile, hw, hw_over)
    path = Path(config) if config else default_config_path(stage, hw, loss)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    src = _rel(path)
    raw = _collect(problems, load_yaml, path)
    if raw is not None:
        for key, value in cfg_over:
            _collect(problems, apply_override, raw, key, value)
    cfg = _collect(problems, build, STAGE_CONFIGS[stage], raw, src, {k for k, _ in cfg_over}) if raw is not None else None
    if cfg is None:
        raise ConfigError(problems)
    problems += check_stage(stage, cfg, src)
    if stage == "align" and loss is not None and cfg.loss != loss:
        problems.append(f"{src}: `loss: {cfg.loss}` but --loss {loss}; use configs/{loss}.yaml or drop one")
    model = _collect(problems, load_model, cfg.model)
    if problems:
        raise ConfigError(problems)
    if profile.max_length > model.max_positions:
        problems.append(f"{profile.source_file}: `max_length` {profile.max_length} exceeds {model.name}'s maximum"
                        f" of {model.max_positions} positions ({model.architecture})")
    if problems:
        raise ConfigError(problems)
    return Resolved(stage, src, cfg, profile, model, load_hub(), list(overrides), loss)


def _collect(problems: list[str], fn: Any, *args: Any) -> Any:
    """Call a loading step; on ConfigError keep its problems (to raise them all together) and return None."""
    try:
        return fn(*args)
    except ConfigError as err:
        problems.extend(err.problems)
        return None


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def apply_hub_env(hub: HubConfig) -> dict[str, str]:
    """Export HF_ENDPOINT / HF_HOME from configs/hub.yaml unless the user's environment already sets them.

    Returns what is in force, each with where it came from; the plan shows it and the runs log it.
    """
    shown = {}
    for var, value in (("HF_ENDPOINT", hub.endpoint), ("HF_HOME", hub.home)):
        if os.environ.get(var):
            shown[var] = f"{os.environ[var]} (from the environment)"
        elif value:
            os.environ[var] = str(ROOT / value) if var == "HF_HOME" and not Path(value).is_absolute() else value
            shown[var] = f"{os.environ[var]} (from configs/hub.yaml)"
        else:
            shown[var] = "(library default)"
    return shown
