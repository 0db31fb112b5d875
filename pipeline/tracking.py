"""The only module that talks to MLflow.

``start_run`` opens the stage's run, or attaches to the one ``mlflow run`` created (``MLFLOW_RUN_ID``; no
``set_experiment`` there), logs the resolved config as flattened params and as a YAML artifact, the lineage tags,
``pip freeze`` and the stage's own log file; on an exception it ends the run FAILED with the message as a tag and
lets the exception propagate. Values of keys or environment variables named like a token, key, secret or password
are never logged.

The light helpers (``tracking_uri``, ``experiment_name``) import nothing heavy: the plan uses them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ROOT

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "zh-align"
REDACTED = "[redacted]"
TRUNCATED = "…[truncated]"
MAX_KEY, MAX_VALUE, BATCH = 250, 6000, 100  # MLflow's limits for param keys, values and one log_batch call
_SECRET = re.compile(r"(secret|password|passwd|credential)|(^|[_.\-])(token|key|api_?key|pwd|auth)$", re.IGNORECASE)
ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "MLFLOW_", "TRANSFORMERS_", "TRL_", "WANDB_", "PYTORCH_", "CUDA_", "ACCELERATE_")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name.rsplit(".", 1)[-1]))


def redact(tree: Any) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys replaced."""
    if isinstance(tree, Mapping):
        return {k: REDACTED if is_secret(str(k)) and v not in (None, "") else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str) and "=" in tree and is_secret(tree.split("=", 1)[0]):  # "key=value" overrides
        return tree.split("=", 1)[0] + "=" + REDACTED
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested dict, within MLflow's key/value limits, secrets redacted."""
    flat: dict[str, str] = {}
    for key, value in redact(dict(tree)).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if len(text) > MAX_VALUE:
            text = text[: MAX_VALUE - len(TRUNCATED)] + TRUNCATED
        flat[name[:MAX_KEY]] = text
    return flat


def environment() -> dict[str, str]:
    """The environment variables that shape a run (hub, tracking, CUDA), secrets redacted."""
    return {k: REDACTED if is_secret(k) else v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.sha": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git.sha": "unknown", "git.dirty": "unknown"}


def pip_freeze() -> str:
    dists = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(dists.items()) if name)


def rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 when alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def rank0(fn: Any) -> Any:
    """Only rank 0 talks to MLflow; on the other ranks a logging call does nothing."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if rank() == 0 else None
    return wrapper


@contextmanager
def start_run(stage: str, config: Mapping[str, Any], *, hw: str, model: str, dry_run: bool = False,
              run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Open (or attach to) the stage's MLflow run and log what makes it reproducible; yields the ActiveRun.
    On ranks other than 0 (several processes) it opens nothing and yields None."""
    if rank() != 0:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    owned = mlflow.active_run() is None
    if owned:
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:  # launched by `mlflow run`: attach, never set_experiment
            active = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment_name())
            active = mlflow.start_run(run_name=run_name or f"{stage}-{hw}")
    else:
        active = mlflow.active_run()
    logdir = Path(tempfile.mkdtemp(prefix=f"zh-align-{stage}-"))
    handler = logging.FileHandler(logdir / f"{stage}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        mlflow.set_tags({"stage": stage, "hw": hw, "model": model, "dry_run": str(dry_run).lower(),
                         **git_state(), **(tags or {})})
        log_params(config)
        log_params(environment(), prefix="env.")
        log_text(yaml.safe_dump(redact(dict(config)), allow_unicode=True, sort_keys=False), "resolved_config.yaml")
        log_text(pip_freeze(), "environment/pip-freeze.txt")
        yield active
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:MAX_VALUE])
        _close(mlflow, handler, logdir, stage, owned, "FAILED")
        raise
    _close(mlflow, handler, logdir, stage, owned, "FINISHED")


def _close(mlflow: Any, handler: logging.Handler, logdir: Path, stage: str, owned: bool, status: str) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
    try:
        mlflow.log_artifact(str(logdir / f"{stage}.log"), "logs")
    finally:
        if owned:
            mlflow.end_run(status)


@rank0
def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    import mlflow

    flat = flatten(params, prefix)
    items = list(flat.items())
    for i in range(0, len(items), BATCH):
        mlflow.log_params(dict(items[i: i + BATCH]))


@rank0
def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


@rank0
def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics(dict(metrics), step=step)


@rank0
def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: REDACTED if is_secret(k) else str(v) for k, v in tags.items()})


@rank0
def log_artifacts(paths: Iterable[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path)


@rank0
def log_file_input(path: Path, *, name: str, digest: str, context: str, tags: Mapping[str, Any] | None = None) -> None:
    """Record a file the run produced or read as a dataset input of the run (name, digest, where it lies)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so on every call
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    mlflow.log_input(MetaDataset(source, name=name, digest=digest[:32]), context=context,
                     tags={k: str(v) for k, v in (tags or {}).items()})


def has_run() -> bool:
    """Whether a run is open here (MLflow's fluent calls would otherwise start one silently)."""
    import mlflow

    return mlflow.active_run() is not None


@rank0
def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(dict(data), artifact_file)


@rank0
def log_table(columns: Mapping[str, list], artifact_file: str) -> None:
    """A table (equal-length columns) that `mlflow ui` shows in its artifact view and its evaluation tab."""
    import mlflow

    mlflow.log_table(data=dict(columns), artifact_file=artifact_file)


def prepared_folder(run_id: str) -> Path:
    """The output folder of a prepare run, found from the pools it logged as dataset inputs."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.cli import StageError

    mlflow.set_tracking_uri(tracking_uri())
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise StageError(f"`data.run_id` {run_id!r} is not a run in {tracking_uri()}; check the id in `mlflow ui`, "
                         f"or set `data.path` to the prepared folder") from err
    for item in run.inputs.dataset_inputs:
        uri = json.loads(item.dataset.source).get("uri", "")
        if uri.startswith("file://") and uri.endswith("/sft.jsonl"):
            folder = Path(uri.removeprefix("file://")).parent
            if (folder / "manifest.json").exists():
                return folder
            raise StageError(f"prepare run {run_id} wrote its pools to {folder}, which no longer holds them; rerun "
                             f"prepare or set `data.path`")
    raise StageError(f"run {run_id} is not a prepare run (it logged no pools); use the run id of `make prepare`")


# --------------------------------------------------------------------------------------------------------------
# Model registry: a LoRA adapter as a pyfunc model (pipeline/adapter_model.py), registered and aliased
# --------------------------------------------------------------------------------------------------------------
ADAPTER_MODEL_CODE = Path(__file__).with_name("adapter_model.py")
ADAPTER_REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "jinja2")
_TRAINING_LEFTOVERS = ("checkpoint-*", "runs", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*",
                       "trainer_state.json")


def adapter_requirements() -> list[str]:
    """Pins of what the pyfunc imports, from the installed versions (local build tags such as ``+cpu`` dropped)."""
    return [f"{pkg}=={metadata.version(pkg).split('+', 1)[0]}" for pkg in ADAPTER_REQUIREMENTS]


def portable_base_name(base_model: str) -> str:
    """What ``adapter_config.json`` records as its base: the hub id, or a local base's folder name."""
    is_local = os.path.isabs(base_model) or base_model.startswith(".") or Path(base_model).exists()
    return Path(base_model).name if is_local else base_model


def stage_adapter(adapter_dir: Path, dest: Path, base_model: str) -> Path:
    """Copy an adapter folder to ``dest`` without training leftovers, ``base_model_name_or_path`` made portable."""
    import shutil

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
        raise RuntimeError("log_adapter_model needs an active run: call it inside tracking.start_run(...)")
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
        raise RuntimeError("log_merged_model needs an active run: call it inside tracking.start_run(...)")
    model_config = {"base_model": None, "revision": None, "system_prompt": system_prompt, "max_new_tokens": 64,
                    "dtype": "auto", "device": "auto"}
    return _register({"model": str(folder)}, model_config, registered_name, alias, name, dict(tags or {}))


def _register(artifacts: dict[str, str], model_config: dict[str, Any], registered_name: str, alias: str, name: str,
              tags: Mapping[str, Any]) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.pyfunc.log_model(name=name, python_model=str(ADAPTER_MODEL_CODE), artifacts=artifacts,
                                   model_config=model_config, registered_model_name=registered_name,
                                   pip_requirements=adapter_requirements())
    version = int(info.registered_model_version)
    set_model_version_tags(registered_name, version, tags)
    MlflowClient().set_registered_model_alias(registered_name, alias, version)
    log.info("registered %s version %s as @%s", registered_name, version, alias)
    return {"name": registered_name, "version": version, "uri": f"models:/{registered_name}@{alias}",
            "model_uri": info.model_uri}


@rank0
def set_model_version_tags(name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Tags on one registered model version (secret-looking keys redacted, values as text within MLflow's limit)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        text = REDACTED if is_secret(str(key)) else str(value)
        client.set_model_version_tag(name, str(version), str(key), text[:MAX_VALUE])


# ----------------------------------------------------------------------------------------------------------------
# Finding a trained adapter: the start point of a later stage
# ----------------------------------------------------------------------------------------------------------------
def find_adapter(ref: str | None, *, stage: str, model: str, hw: str) -> dict[str, Any]:
    """A registered adapter as {folder, source, run_id, version, tags}. `ref`: a run id, `name@alias`, `name/version`
    or a local adapter folder; None = the newest FINISHED `stage` run of the experiment with the same base model and
    hardware profile. The caller checks the base model against the tags (`model` for runs found by default)."""
    import mlflow

    from pipeline.cli import StageError

    if ref and Path(ref).is_dir():
        return _local_adapter(Path(ref))
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    try:
        version = _version(client, ref, stage=stage, model=model, hw=hw)
    except mlflow.exceptions.MlflowException as err:
        raise StageError(f"start point {ref!r} is not a run, `name@alias` or `name/version` in {tracking_uri()}, "
                         f"nor an adapter folder; check `start_from`") from err
    folder = Path(mlflow.artifacts.download_artifacts(version.source))
    return {**_local_adapter(_adapter_dir(folder)), "source": f"models:/{version.name}/{version.version}",
            "run_id": version.run_id, "version": str(version.version), "tags": dict(version.tags)}


def _version(client: Any, ref: str | None, *, stage: str, model: str, hw: str) -> Any:
    from pipeline.cli import StageError

    if ref and "@" in ref:
        return client.get_model_version_by_alias(*ref.split("@", 1))
    if ref and "/" in ref:
        return client.get_model_version(*ref.split("/", 1))
    run_id = ref or _latest_run(client, stage=stage, model=model, hw=hw)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        client.get_run(run_id)  # an unknown id raises here, with MLflow's own message
        raise StageError(f"run {run_id} registered no adapter; give a registered `name@alias` or a folder")
    return max(versions, key=lambda v: int(v.version))


def _latest_run(client: Any, *, stage: str, model: str, hw: str) -> str:
    from pipeline.cli import StageError

    experiment = client.get_experiment_by_name(experiment_name())
    runs = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.stage = '{stage}' and tags.model = '{model}' and tags.hw = '{hw}' "
                                            f"and attributes.status = 'FINISHED'") if experiment else []
    if not runs:
        raise StageError(f"no FINISHED {stage} run with base {model} and profile {hw} in experiment "
                         f"{experiment_name()}; run `make {stage} HW={hw} DRY_RUN=0` first or set `start_from`")
    return runs[0].info.run_id


def _adapter_dir(folder: Path) -> Path:
    found = sorted(p.parent for p in folder.rglob("adapter_config.json"))
    if not found:
        from pipeline.cli import StageError

        raise StageError(f"{folder} holds no adapter_config.json")
    return found[0]


def _local_adapter(folder: Path) -> dict[str, Any]:
    from pipeline.cli import StageError

    config = folder / "adapter_config.json"
    if not config.exists():
        raise StageError(f"start point {folder} holds no adapter_config.json; give an adapter folder")
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    return {"folder": folder, "source": str(folder), "run_id": None, "version": None, "tags": {"base_model": base}}


@rank0
def log_to_run(run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str], files: Iterable[Path],
               artifact_path: str) -> None:
    """Metrics, tags and files onto another (finished) run: a training run receives its evaluation."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path)


# ----------------------------------------------------------------------------------------------------------------
# Promote and pull: aliases on registered versions, and a registered model as a plain folder
# ----------------------------------------------------------------------------------------------------------------
def _registered_version(client: Any, ref: str) -> Any:
    """`name@alias` or `name/version` → the model version; a missing alias names the aliases that exist."""
    from mlflow.exceptions import MlflowException

    from pipeline.cli import StageError

    name, sep, rest = ref.partition("@") if "@" in ref else ref.partition("/")
    if not sep or not rest:
        raise StageError(f"model {ref!r}: give `name@alias` or `name/version`")
    try:
        return client.get_model_version_by_alias(name, rest) if "@" in ref else client.get_model_version(name, rest)
    except MlflowException as err:
        try:
            aliases = sorted(client.get_registered_model(name).aliases)
        except MlflowException:
            raise StageError(f"no registered model {name!r} in {tracking_uri()}") from err
        raise StageError(f"{ref!r} does not exist; aliases of {name}: {', '.join(aliases) or 'none'}") from err


def promote(name: str, version: str, alias: str, force: bool = False) -> str:
    """Move `alias` to a version; refused when the version's `eval.gate` is fail, unless `force`."""
    import mlflow

    from pipeline.cli import StageError

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    mv = _registered_version(client, f"{name}/{version}")
    gate = mv.tags.get("eval.gate")
    if gate == "fail" and not force:
        raise StageError(f"{name}/{version} failed its evaluation gate ({mv.tags.get('eval.gate_failed', '?')}: "
                         f"{mv.tags.get('eval.gate_rule', '')}); pass FORCE=1 to promote it anyway")
    client.set_registered_model_alias(name, alias, mv.version)
    if gate == "fail":
        client.set_model_version_tag(name, mv.version, f"promoted.{alias}.forced", "true")
    return f"models:/{name}@{alias} → version {mv.version} (eval.gate {gate or 'not evaluated'})"


def pull(ref: str, dest: Path, overwrite: bool = False, *, base: str = "",
         same_base: Callable[[str], bool] | None = None) -> Path:
    """A registered model as a plain folder: a merged model loads with transformers, an adapter with PEFT. An adapter
    whose recorded base fails ``same_base`` (the configured base, named ``base``) is refused before DEST is touched."""
    import shutil

    import mlflow

    from pipeline.cli import StageError

    mlflow.set_tracking_uri(tracking_uri())
    mv = _registered_version(mlflow.MlflowClient(), ref)
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
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(found[0], dest)
    return dest


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: stages as child runs of one parent run (MLflow's multistep pattern)
# ----------------------------------------------------------------------------------------------------------------
def run_entry_point(entry_point: str, parameters: Mapping[str, str], *, experiment_id: str | None = None,
                    run_name: str | None = None) -> tuple[str, str]:
    """Run an MLproject entry point through MLflow and wait for it: (run id, final status). Inside an active run the
    new run is its child (MLflow's multistep pattern) in the same experiment. MLflow marks a run whose process died
    before closing it (a crash, a kill) FAILED."""
    import mlflow
    from mlflow.exceptions import ExecutionException

    mlflow.set_tracking_uri(tracking_uri())
    parent = mlflow.active_run()
    experiment_id = experiment_id or (parent.info.experiment_id if parent else None)
    here = str(Path(sys.executable).parent)  # the entry point's `python` is this interpreter, venv or not
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        submitted = mlflow.projects.run(str(ROOT), entry_point, parameters=dict(parameters), env_manager="local",
                                        experiment_id=experiment_id, run_name=run_name, synchronous=True)
        run_id = submitted.run_id
    except ExecutionException as err:
        found = re.search(r"ID '([0-9a-f]+)'", str(err))
        if not found:
            raise
        run_id = found.group(1)
    return run_id, mlflow.MlflowClient().get_run(run_id).info.status


def pipeline_children(run_id: str) -> dict[str, dict[str, Any]]:
    """The children of an earlier pipeline run, by stage: run id, status, launch parameters, git sha."""
    from pipeline.cli import StageError

    parent = get_run(run_id)
    if parent.data.tags.get("stage") != "pipeline":
        raise StageError(f"--resume {run_id}: that is a {parent.data.tags.get('stage', 'untagged')} run, not a "
                         f"pipeline run; give the id of a `make pipeline` run")
    children = {}
    for stage, child_id in ((k.removeprefix("child."), v) for k, v in parent.data.tags.items()
                            if k.startswith("child.")):
        child = get_run(child_id)
        children[stage] = {"run_id": child_id, "status": child.info.status, "params": dict(child.data.params),
                           "git_sha": child.data.tags.get("git.sha", "")}
    return children


def chain_summary(ids: Mapping[str, str]) -> dict[str, Any]:
    """What each child run made: status, seconds, registered versions with their aliases; the evaluation's scores,
    deltas against the base and its forgetting gate."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    children, evaluation, gate = {}, {}, None
    for stage, run_id in ids.items():
        run = client.get_run(run_id)
        registered = []
        for mv in sorted(client.search_model_versions(f"run_id = '{run_id}'"), key=lambda v: int(v.version)):
            aliases = client.get_registered_model(mv.name).aliases
            registered.append(f"{mv.name}/{mv.version}" + "".join(f"@{a}" for a, v in sorted(aliases.items())
                                                                   if str(v) == str(mv.version)))
        end = run.info.end_time or run.info.start_time
        children[stage] = {"run_id": run_id, "status": run.info.status, "seconds": (end - run.info.start_time) / 1000,
                           "registered": registered}
        if stage == "evaluate":
            m = run.data.metrics
            evaluation = {k.removeprefix("eval/"): {"tuned": v, "delta": m.get("delta/" + k.removeprefix("eval/"))}
                          for k, v in sorted(m.items()) if k.startswith("eval/") and "delta/" + k[5:] in m}
            gate = run.data.tags.get("eval.gate")
    experiment = client.get_experiment(run.info.experiment_id) if ids else None
    return {"tracking_uri": tracking_uri(), "experiment": experiment.name if experiment else experiment_name(),
            "experiment_id": experiment.experiment_id if experiment else None, "children": children,
            "eval": evaluation, "gate": gate}


# ----------------------------------------------------------------------------------------------------------------
# Re-running a finished run: what it logged, and fingerprints of what it made
# ----------------------------------------------------------------------------------------------------------------
def get_run(run_id: str) -> Any:
    """The run (info, data.params/tags/metrics); an unknown id is a StageError naming the store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.cli import StageError

    try:
        return mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException as err:
        raise StageError(f"run {run_id!r} is not in {tracking_uri()}; copy the id from `mlflow ui` (or set "
                         f"MLFLOW_TRACKING_URI to the store that holds it)") from err


def run_artifact_text(run_id: str, path: str) -> str:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="zh-align-artifact-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                    tracking_uri=tracking_uri())
        return Path(local).read_text(encoding="utf-8")


def registered_fingerprints(run_id: str) -> dict[str, dict[str, str]]:
    """For each model version a run registered (``name/version``): the sha256 of each weights file
    (``*.safetensors``) it holds, by file name."""
    import hashlib

    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    found: dict[str, dict[str, str]] = {}
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        with tempfile.TemporaryDirectory(prefix="zh-align-fingerprint-") as tmp:
            root = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=tmp))
            found[f"{mv.name}/{mv.version}"] = {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.safetensors"))}
    return found
