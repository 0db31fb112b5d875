"""The model registry: a LoRA adapter or a merged model as a pyfunc model (:mod:`.adapter_model`), registered and
aliased; versions found by ``name@alias`` / ``name/version``; promote (gate-aware) and pull (a version as a folder)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core import atomic
from pipeline.core.errors import ConfigError, StageError
from pipeline.core.secrets import REDACTED, Scrubber, is_secret
from pipeline.core.strict import close
from pipeline.tracking.runs import MAX_VALUE, rank0, tracking_uri

log = logging.getLogger(__name__)


@dataclass
class RegisterConfig:
    """The registered model a stage makes a new version of, and the alias that moves to it."""
    name: str = "zh-align-sft"
    alias: str = "candidate"


ADAPTER_MODEL_CODE = Path(__file__).with_name("adapter_model.py")
ADAPTER_REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "jinja2")
_TRAINING_LEFTOVERS = ("checkpoint-*", "runs", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*",
                       "trainer_state.json")


def signature() -> Any:
    """What the served model accepts, so MLflow validates requests: per row a ``prompt`` (text) or ``messages`` (a
    conversation of ``{role, content}``); params ``max_new_tokens`` (0 = the model config's), ``temperature``
    (0 = greedy) and ``top_p``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec("string", "prompt", required=False), ColSpec(Array(message), "messages", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 0), ParamSpec("temperature", "double", 0.0),
                          ParamSpec("top_p", "double", 1.0)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]), params=params)


def adapter_requirements() -> list[str]:
    """Pins of what the pyfunc imports, from the installed versions (local build tags such as ``+cpu`` dropped)."""
    return [f"{pkg}=={metadata.version(pkg).split('+', 1)[0]}" for pkg in ADAPTER_REQUIREMENTS]


def portable_base_name(base_model: str) -> str:
    """What ``adapter_config.json`` records as its base: the hub id, or a local base's folder name."""
    is_local = os.path.isabs(base_model) or base_model.startswith(".") or Path(base_model).exists()
    return Path(base_model).name if is_local else base_model


def stage_adapter(adapter_dir: Path, dest: Path, base_model: str) -> Path:
    """Copy an adapter folder to ``dest`` without training leftovers, ``base_model_name_or_path`` made portable."""
    shutil.copytree(adapter_dir, dest, ignore=shutil.ignore_patterns(*_TRAINING_LEFTOVERS))
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    recorded, portable = config.get("base_model_name_or_path"), portable_base_name(base_model)
    config["base_model_name_or_path"] = portable
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    card = dest / "README.md"  # PEFT's model card repeats the recorded base in its metadata
    if recorded and recorded != portable and card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(recorded, portable), encoding="utf-8")
    return dest


@rank0
def log_adapter_model(adapter_dir: str | Path, *, registered_name: str, alias: str, base_model: str,
                      revision: str | None, system_prompt: str, tags: Mapping[str, Any] | None = None,
                      name: str = "adapter", max_new_tokens: int = 64) -> dict[str, Any]:
    """Log a PEFT adapter folder as a pyfunc model in the active run, register it and move ``alias`` to it.

    ``adapter_dir`` holds ``adapter_config.json`` + ``adapter_model.safetensors`` and the tokenizer files (with the
    chat template). It is logged as the artifact ``adapter`` from a temporary copy, never changed in place: the copy
    leaves out trainer leftovers (``checkpoint-*``, optimizer state) and its ``base_model_name_or_path`` is rewritten
    to the hub id, or for a local base to the base's folder name (PEFT's ``README.md`` model card likewise), so no
    absolute local path is published.
    ``base_model`` / ``revision`` / ``system_prompt`` go to the model's ``model_config`` as given (a local base must
    then exist where it is loaded, or be overridden at load: ``model_config={"base_model": ...}``).
    The new version gets ``tags`` + ``base_model`` + ``revision`` as model-version tags.
    Returns ``{"name", "version" (int), "uri": "models:/NAME@ALIAS", "model_uri"}``.
    """
    import mlflow

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: save the PEFT adapter there first")
    if mlflow.active_run() is None:
        raise RuntimeError("log_adapter_model needs an active run: call it inside runs.start_run(...)")
    model_config = {"base_model": str(base_model), "revision": revision, "system_prompt": system_prompt,
                    "max_new_tokens": int(max_new_tokens), "dtype": "auto", "device": "auto"}
    with tempfile.TemporaryDirectory(prefix="zh-align-adapter-") as tmp:
        staged = stage_adapter(adapter_dir, Path(tmp) / "adapter", str(base_model))
        return _register({"adapter": str(staged)}, model_config, registered_name, alias, name,
                         {"base_model": portable_base_name(str(base_model)), "revision": revision or "none",
                          **(tags or {})})


@rank0
def log_merged_model(folder: str | Path, *, registered_name: str, alias: str, system_prompt: str,
                     tags: Mapping[str, Any] | None = None, name: str = "merged") -> dict[str, Any]:
    """Log a merged model folder (safetensors + tokenizer + generation config + model card) as a pyfunc model in the
    active run, register it and move ``alias`` to it; the same return value as :func:`log_adapter_model`."""
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_merged_model needs an active run: call it inside runs.start_run(...)")
    model_config = {"base_model": None, "revision": None, "system_prompt": system_prompt, "max_new_tokens": 64,
                    "dtype": "auto", "device": "auto"}
    return _register({"model": str(folder)}, model_config, registered_name, alias, name, dict(tags or {}))


def _register(artifacts: dict[str, str], model_config: dict[str, Any], registered_name: str, alias: str, name: str,
              tags: Mapping[str, Any]) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.pyfunc.log_model(name=name, python_model=str(ADAPTER_MODEL_CODE), artifacts=artifacts,
                                   model_config=model_config, registered_model_name=registered_name,
                                   pip_requirements=adapter_requirements(), signature=signature())
    version = int(info.registered_model_version)
    set_model_version_tags(registered_name, version, tags)
    MlflowClient().set_registered_model_alias(registered_name, alias, version)
    log.info("registered %s version %s as @%s", registered_name, version, alias)
    return {"name": registered_name, "version": version, "uri": f"models:/{registered_name}@{alias}",
            "model_uri": info.model_uri}


@rank0
def set_model_version_tags(name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Tags on one registered model version (secrets redacted, values as text within MLflow's limit)."""
    from mlflow import MlflowClient

    client, scrub = MlflowClient(), Scrubber()
    for key, value in tags.items():
        text = REDACTED if is_secret(str(key)) else scrub(str(value))
        client.set_model_version_tag(name, str(version), str(key), text[:MAX_VALUE])


def registered_version(client: Any, ref: str) -> Any:
    """`name@alias` or `name/version` → the model version; a missing alias names the aliases that exist."""
    from mlflow.exceptions import MlflowException

    name, sep, rest = ref.partition("@") if "@" in ref else ref.partition("/")
    if not name or not sep or not rest:
        raise ConfigError([f"model {ref!r}: give `name@alias` or `name/version` (MODEL=zh-align-merged@candidate)"])
    try:
        return client.get_model_version_by_alias(name, rest) if "@" in ref else client.get_model_version(name, rest)
    except MlflowException as err:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            names = sorted(m.name for m in client.search_registered_models(max_results=100))
            raise ConfigError([f"no registered model {name!r} in {tracking_uri()}; registered: "
                               f"{', '.join(names) or 'none'}{close(name, names)}"]) from err
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise ConfigError([f"{ref!r} does not exist; aliases of {name}: "
                           f"{', '.join(f'{a} (version {v})' for a, v in sorted(model.aliases.items())) or 'none'}; "
                           f"versions: {', '.join(map(str, versions)) or 'none'}"]) from err


def promote(name: str, version: str, alias: str, force: bool = False) -> str:
    """Move `alias` to a version; refused when the version's `eval.gate` is fail or missing (never evaluated), unless
    `force` (then the version is tagged ``promoted.<alias>.forced``)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    mv = registered_version(client, f"{name}/{version}")
    gate = mv.tags.get("eval.gate")
    if gate == "fail" and not force:
        raise StageError(f"{name}/{version} failed its evaluation gate ({mv.tags.get('eval.gate_failed', '?')}: "
                         f"{mv.tags.get('eval.gate_rule', '')}); pass FORCE=1 to promote it anyway")
    if gate is None and not force:
        raise StageError(ungated(name, str(mv.version), mv.tags))
    client.set_registered_model_alias(name, alias, mv.version)
    if gate != "pass":
        client.set_model_version_tag(name, mv.version, f"promoted.{alias}.forced", "true")
    return f"models:/{name}@{alias} → version {mv.version} (eval.gate {gate or 'not evaluated'}" \
           f"{', forced' if gate != 'pass' else ''})"


def ungated(name: str, version: str, tags: Mapping[str, str]) -> str:
    """Why a version without ``eval.gate`` is not promoted, and how to evaluate it: an adapter directly; a merged
    model through the adapter it was merged from (export copies that adapter's gate)."""
    hw = f"HW={tags.get('hw') or '…'}"  # evaluate and export take the adapter's recorded base: no model to name
    adapter = tags.get("adapter", "").removeprefix("models:/")
    if adapter:
        how = (f"it was merged from {adapter}, which had no gate at export: evaluate that adapter (`make eval {hw} "
               f"DRY_RUN=0 SET=\"adapter={adapter}\"`), then export it again (`make export {hw} DRY_RUN=0 "
               f"SET=\"adapter={adapter}\"`) and promote the new version")
    else:
        how = f"evaluate it first: `make eval {hw} DRY_RUN=0 SET=\"adapter={name}/{version}\"` tags its gate"
    return (f"{name}/{version} was not evaluated (it has no eval.gate tag); {how}; or pass FORCE=1 to promote it "
            f"anyway")


def pull(ref: str, dest: Path, overwrite: bool = False, *, base: str = "",
         same_base: Callable[[str], bool] | None = None) -> Path:
    """A registered model as a plain folder: a merged model loads with transformers, an adapter with PEFT. An adapter
    whose recorded base fails ``same_base`` (the configured base, named ``base``) is refused before DEST is touched."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mv = registered_version(mlflow.MlflowClient(), ref)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise StageError(f"{dest} is not empty; pass OVERWRITE=1 to replace it")
    with tempfile.TemporaryDirectory(prefix="zh-align-pull-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=tmp))
        adapters = [p.parent for p in root.rglob("adapter_config.json")]
        recorded = mv.tags.get("base_model", "")
        if adapters and same_base is not None and not same_base(recorded):
            raise StageError(f"{mv.name}/{mv.version} is an adapter of base {recorded!r}, but the configured base is "
                             f"{base}; pick the profile or model it was trained for (HW=…, SET=\"model=…\")")
        found = adapters or [p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
        if not found:
            raise StageError(f"{ref} holds neither an adapter nor a merged model")
        with atomic.replacing(dest, what="pulled model") as staged:  # whole or not at all; DEST kept on failure
            shutil.copytree(found[0], staged, dirs_exist_ok=True)
    return dest


def download(ref: str) -> dict[str, Any]:
    """A registered model (``name@alias``, ``name/version``, or a run id: the newest version that run registered) in a
    local folder: ``{"folder", "adapter" (bool), "system_prompt", "base_model", "source"}``; ``system_prompt`` is the
    one logged in the pyfunc's model_config."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    if "@" in ref or "/" in ref:
        mv = registered_version(client, ref)
    else:
        try:
            found = client.search_model_versions(f"run_id = '{ref}'")
        except MlflowException as err:
            raise StageError(f"{ref!r} is not a run id in {tracking_uri()}") from err
        if not found:
            raise StageError(f"{ref!r}: no model version was registered by a run of that id in {tracking_uri()}; give "
                             f"`name@alias`, `name/version`, a run id that registered a model, or a folder")
        mv = max(found, key=lambda v: int(v.version))
    root = _artifacts_here(client, mv) or Path(mlflow.artifacts.download_artifacts(mv.source))
    config = mlflow.models.Model.load(str(root)).flavors.get("python_function", {}).get("model_config") or {}
    adapters = [p.parent for p in root.rglob("adapter_config.json")]
    found = adapters or [p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    if not found:
        raise StageError(f"{mv.name}/{mv.version} holds neither an adapter nor a merged model")
    return {"folder": found[0], "adapter": bool(adapters), "system_prompt": config.get("system_prompt"),
            "base_model": mv.tags.get("base_model", ""), "source": f"models:/{mv.name}/{mv.version}"}


def _artifacts_here(client: Any, mv: Any) -> Path | None:
    """The version's files where they already lie on this machine (a local store), so a 15 GB merged model is read in
    place rather than copied on every load; None for a remote store."""
    from urllib.parse import unquote, urlparse

    model_id = getattr(mv, "model_id", None)
    location = client.get_logged_model(model_id).artifact_location if model_id else ""
    parsed = urlparse(location)
    path = Path(unquote(parsed.path)) if parsed.scheme in ("", "file") and location else None
    return path if path is not None and (path / "MLmodel").is_file() else None


def registered_models(run_id: str) -> list[str]:
    """`name/version@alias…` of every version a run registered, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    out = []
    for mv in sorted(client.search_model_versions(f"run_id = '{run_id}'"), key=lambda v: int(v.version)):
        aliases = client.get_registered_model(mv.name).aliases
        out.append(f"{mv.name}/{mv.version}" + "".join(f"@{a}" for a, v in sorted(aliases.items())
                                                       if str(v) == str(mv.version)))
    return out


def version_gates(run_id: str) -> dict[str, str]:
    """`name/version` → its ``eval.gate`` (pass, fail or "not evaluated") for every version a run registered."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    return {f"{mv.name}/{mv.version}": mv.tags.get("eval.gate", "not evaluated")
            for mv in client.search_model_versions(f"run_id = '{run_id}'")}
