"""A stage's config resolved with a hardware profile and a model definition: the file the profile picks, the
overrides, the strict build with every rule, all problems raised together; and routing one list of overrides to
every stage (``make plan``, ``make pipeline``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS, repo_path, shown
from pipeline.core.profiles import DEFAULT_HW, HardwareProfile, load_hub, load_model, load_profile
from pipeline.core.resolved import Resolved
from pipeline.core.strict import apply_override, build, close, load_yaml
from pipeline.models.loading import base_of
from pipeline.stage.spec import Stage, get, names, stages
from pipeline.tracking import lineage

log = logging.getLogger(__name__)


def default_config_path(stage: Stage, profile: HardwareProfile | None, variant: str | None = None) -> Path:
    """`<config_dir>/<stage>.yaml` of the profile (the cpu profile's offline twins: `configs/smoke/`); a stage with
    variants has `<config_dir>/<stage>/<variant>.yaml`."""
    folder = repo_path(profile.config_dir) if profile else CONFIGS
    if stage.variants:
        return folder / stage.name / f"{variant or stage.variants[0]}.yaml"
    return folder / f"{stage.name}.yaml"


def resolve(stage: str | Stage, *, config: str | Path | None = None, hw: str = DEFAULT_HW,
            overrides: list[tuple[str, Any]] = (), variant: str | None = None) -> Resolved:
    """Load and check one stage's config with its hardware profile and model definition."""
    stage = get(stage)
    if variant is not None and variant not in stage.variants:
        takes = f"takes one of {', '.join(stage.variants)}" if stage.variants else "takes no variant"
        raise ConfigError([f"--{stage.variant_flag or 'variant'} {variant!r}: the {stage.name} stage {takes}"])
    hw_over = [(k.split(".", 1)[1], v) for k, v in overrides if k.startswith("hw.")]
    cfg_over = [(k, v) for k, v in overrides if not k.startswith("hw.")]
    problems: list[str] = []
    profile = _collect(problems, load_profile, hw, hw_over)
    path = Path(config) if config else default_config_path(stage, profile, variant)
    if not path.is_absolute() and not path.exists():
        path = repo_path(path)
    src = shown(path)
    raw = _collect(problems, load_yaml, path)
    if raw == {}:  # an empty file would silently mean every default (the 7B model), whatever the profile
        problems.append(f"{src}: the file holds no keys; a stage config names at least its `model` — start from "
                        f"{shown(default_config_path(stage, profile, variant))}")
        raw = None
    if raw is not None:
        for key, value in cfg_over:
            _collect(problems, apply_override, raw, key, value)
    cfg = _collect(problems, build, stage.config, raw, src, {k for k, _ in cfg_over}) if raw is not None else None
    if cfg is None:
        raise ConfigError(problems)
    if variant is not None and getattr(cfg, stage.variant_flag) != variant:
        problems.append(f"{src}: `{stage.variant_flag}: {getattr(cfg, stage.variant_flag)}` but --{stage.variant_flag} "
                        f"{variant}; use {shown(default_config_path(stage, profile, variant))} or drop one")
    model = _collect(problems, load_model, cfg.model)
    if problems:
        raise ConfigError(problems)
    if profile.max_length > model.max_positions:
        raise ConfigError([f"{profile.source_file}: `max_length` {profile.max_length} exceeds {model.name}'s maximum"
                           f" of {model.max_positions} positions ({model.architecture}); set `hw.max_length` to at most "
                           f"{model.max_positions} (SET=\"hw.max_length={model.max_positions}\") or pick another model"])
    return Resolved(stage.name, src, cfg, profile, model, load_hub(), list(overrides), variant)


def on_adapter_base(r: Resolved, ref: str | None, key: str = "adapter", registry: bool = True) -> Resolved:
    """``r`` on the model definition the adapter ``ref`` records as its base, when that is not the profile's and no
    model was named (`make eval` / `make export` of an adapter trained under another profile, as `make chat` and
    `make pull` do); a named model that is not the adapter's base, or a base no model definition has, is refused.
    ``registry`` off (a plan): only an adapter folder is read, a registered one is left to the run and the pre-check."""
    recorded = lineage.recorded_base(ref, registry)
    model = base_of(recorded, r.model, r.overrides)
    if model is r.model:
        return r
    if model is None:
        named = any(k.rpartition(".")[2] == "model" for k, _ in r.overrides)
        fix = ("drop SET=\"model=…\" to use the adapter's own base" if named else
               f"add a model definition with `hub_id: {recorded}` to configs/models/ and name it (SET=\"model=…\")")
        raise ConfigError([f"`{key}` {ref!r} is an adapter of base {recorded!r}, but this {r.stage}'s model is "
                           f"{r.model.name} ({r.model.hub_id or 'a local model'}); {fix}"])
    log.info("`%s` %s is an adapter of %s: the %s runs on that model definition, not %s (the profile's)",
             key, ref, model.name, r.stage, r.model.name)
    return dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, model=model.name), model=model)


def _collect(problems: list[str], fn: Any, *args: Any) -> Any:
    """Call a loading step; on ConfigError keep its problems (to raise them all together) and return None."""
    try:
        return fn(*args)
    except ConfigError as err:
        problems.extend(err.problems)
        return None


# ------------------------------------------------------------------------------------------------------------------
# All stages at once
# ------------------------------------------------------------------------------------------------------------------
def split_overrides(overrides: list[tuple[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Route each override to the stages it belongs to (a stage prefix, or every stage whose config has the key)."""
    per_stage: dict[str, list[tuple[str, Any]]] = {s: [] for s in names()}
    keys = {s.name: {f.name for f in dataclasses.fields(s.config)} for s in stages()}
    problems = []
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if head in per_stage and rest:
            per_stage[head].append((rest, value))
            continue
        targets = [s for s in names() if head == "hw" or head in keys[s]]
        if not targets:
            known = sorted(set().union(*keys.values()) | {"hw"})
            problems.append(f"override `{key}`: no stage has a key `{head}`" + close(head, known)
                            + f" (prefix a stage to aim at one: {', '.join(f'{s}.…' for s in names())})")
        for s in targets:
            per_stage[s].append((key, value))
    if problems:
        raise ConfigError(problems)
    return per_stage


def resolve_all(hw: str, overrides: list[tuple[str, Any]], variants: dict[str, str | None] | None = None
                ) -> list[Resolved]:
    """Every stage resolved with its share of the overrides (``variants``: stage name → its variant); every problem
    of every stage raised together."""
    per_stage = split_overrides(overrides)
    resolved, problems = [], []
    for stage in stages():
        try:
            resolved.append(resolve(stage, hw=hw, overrides=per_stage[stage.name],
                                    variant=(variants or {}).get(stage.name)))
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return resolved
