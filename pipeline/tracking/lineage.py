"""Finding what earlier runs made: a prepare run's pool folder, a trained adapter (by run, alias, version or the
newest matching run), and the children of a pipeline run with what each made."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageError
from pipeline.core.paths import repo_path
from pipeline.tracking import liveness
from pipeline.tracking.model_registry import registered_models, version_gates
from pipeline.tracking.runs import experiment_name, get_run, tracking_uri


def prepared_folder(run_id: str) -> Path:
    """The output folder of a prepare run, found from the pools it logged as dataset inputs."""
    import mlflow
    from mlflow.exceptions import MlflowException

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


def find_adapter(ref: str | None, *, stage: str, model: str, hw: str, key: str = "start_from") -> dict[str, Any]:
    """A registered adapter as {folder, source, run_id, version, tags}. `ref`: a run id, `name@alias`, `name/version`
    or a local adapter folder; None = the newest FINISHED `stage` run of the experiment with the same base model and
    hardware profile. The caller checks the base model against the tags (`model` for runs found by default)."""
    import mlflow

    if ref and Path(ref).is_dir():
        return _local_adapter(Path(ref))
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    try:
        version = _version(client, ref, stage=stage, model=model, hw=hw, key=key)
    except mlflow.exceptions.MlflowException as err:
        raise StageError(f"`{key}` {ref!r} is not a run, `name@alias` or `name/version` in {tracking_uri()}, nor an "
                         f"adapter folder; check `{key}` (SET=\"{key}=zh-align-sft@candidate\" or a folder)") from err
    folder = Path(mlflow.artifacts.download_artifacts(version.source))
    return {**_local_adapter(_adapter_dir(folder)), "source": f"models:/{version.name}/{version.version}",
            "run_id": version.run_id, "version": str(version.version), "tags": dict(version.tags)}


def recorded_base(ref: str | None, registry: bool = True) -> str:
    """The base an adapter records, looked up without downloading it: a folder's adapter_config.json, or (``registry``)
    a registered version's ``base_model`` tag (a run id: its newest version's). "" when ``ref`` names no adapter (None,
    a merged folder, nothing in the store) or a registered one with ``registry`` off (a dry run opens no store)."""
    if not ref or ref.startswith("<"):  # nothing, or the pipeline's placeholder for a child not run yet
        return ""
    folder = repo_path(ref)
    if folder.is_dir():
        return config_base(folder)
    if not registry:
        return ""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = _registered(mlflow.MlflowClient(tracking_uri()), ref)
    except MlflowException:
        return ""
    return version.tags.get("base_model", "") if version else ""


def config_base(folder: Path) -> str:
    """``base_model_name_or_path`` of an adapter folder's adapter_config.json ("" without one)."""
    config = folder / "adapter_config.json"
    return (json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
            if config.is_file() else "")


def ref_problem(ref: str, key: str) -> str | None:
    """Whether an adapter reference (a run id, `name@alias`, `name/version`) names something in the store — the
    pre-check's cheap lookup, nothing downloaded; the problem text naming ``key``, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri())
    try:
        if "@" in ref:
            client.get_model_version_by_alias(*ref.split("@", 1))
        elif "/" in ref:
            client.get_model_version(*ref.split("/", 1))
        else:
            client.get_run(ref)
    except MlflowException:
        return (f"`{key}` {ref!r} is not a run, `name@alias` or `name/version` in {tracking_uri()}, nor an adapter "
                f"folder; check `{key}` (the registered versions and aliases: `make ui` → Models)")
    return None


def _version(client: Any, ref: str | None, *, stage: str, model: str, hw: str, key: str) -> Any:
    ref = ref or _latest_run(client, stage=stage, model=model, hw=hw, key=key)
    version = _registered(client, ref)
    if version is None:
        client.get_run(ref)  # an unknown id raises here, with MLflow's own message
        raise StageError(f"run {ref} registered no adapter; give a registered `name@alias` or a folder")
    return version


def _registered(client: Any, ref: str) -> Any:
    """The model version ``ref`` names: ``name@alias``, ``name/version``, or a run id's newest (None: it has none)."""
    if "@" in ref:
        return client.get_model_version_by_alias(*ref.split("@", 1))
    if "/" in ref:
        return client.get_model_version(*ref.split("/", 1))
    return max(client.search_model_versions(f"run_id = '{ref}'"), key=lambda v: int(v.version), default=None)


def _latest_run(client: Any, *, stage: str, model: str, hw: str, key: str) -> str:
    experiment = client.get_experiment_by_name(experiment_name())
    runs = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.stage = '{stage}' and tags.model = '{model}' and tags.hw = '{hw}' "
                                            f"and attributes.status = 'FINISHED'") if experiment else []
    if not runs:
        raise StageError(f"no FINISHED {stage} run with base {model} and profile {hw} in experiment "
                         f"{experiment_name()}; run `make {stage} HW={hw} DRY_RUN=0` first or set `{key}`")
    return runs[0].info.run_id


def _adapter_dir(folder: Path) -> Path:
    found = sorted(p.parent for p in folder.rglob("adapter_config.json"))
    if not found:
        raise StageError(f"{folder} holds no adapter_config.json")
    return found[0]


def _local_adapter(folder: Path) -> dict[str, Any]:
    config = folder / "adapter_config.json"
    if not config.exists():
        raise StageError(f"start point {folder} holds no adapter_config.json; give an adapter folder")
    return {"folder": folder, "source": str(folder), "run_id": None, "version": None,
            "tags": {"base_model": config_base(folder)}}


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: stages as child runs of one parent run (MLflow's multistep pattern)
# ----------------------------------------------------------------------------------------------------------------
def pipeline_children(run_id: str) -> dict[str, dict[str, Any]]:
    """The children of an earlier pipeline run, by stage: run id, status, launch parameters, git sha."""
    parent = get_run(run_id)
    if parent.data.tags.get("stage") != "pipeline":
        raise StageError(f"--resume {run_id}: that is a {parent.data.tags.get('stage', 'untagged')} run, not a "
                         f"pipeline run; give the id of a `make pipeline` run")
    children = {}
    for stage, child_id in ((k.removeprefix("child."), v) for k, v in parent.data.tags.items()
                            if k.startswith("child.")):
        child = get_run(child_id)
        status = child.info.status
        if status == "RUNNING":  # left RUNNING by a process that died: KILLED; a live one is not to be raced
            if liveness.gone(child.data.tags) is None and "pid" in child.data.tags:
                raise StageError(f"--resume {run_id}: its {stage} child {child_id} is still running (pid "
                                 f"{child.data.tags.get('pid', '?')} on {child.data.tags.get('host', '?')}); wait for "
                                 f"it to end or stop it, then resume")
            status = "KILLED"
        children[stage] = {"run_id": child_id, "status": status, "params": dict(child.data.params),
                           "git_sha": child.data.tags.get("git.sha", "")}
    return children


def chain_summary(ids: Mapping[str, str]) -> dict[str, Any]:
    """What each child run made: status, seconds, registered versions with their aliases and their ``eval.gate``;
    the scores of the child that evaluated (``eval/…`` with their ``delta/…`` against the base) and its forgetting
    gate, and those of the earlier adapter it judged beside (``earlier/eval/…``, tag ``earlier.eval.gate``)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    children, evaluation, gate, earlier, run = {}, {}, None, {}, None
    for stage, run_id in ids.items():
        run = client.get_run(run_id)
        end = run.info.end_time or run.info.start_time
        children[stage] = {"run_id": run_id, "status": run.info.status, "seconds": (end - run.info.start_time) / 1000,
                           "registered": registered_models(run_id), "gates": version_gates(run_id)}
        scored = _scored(run.data.metrics)
        if scored and "eval.gate" in run.data.tags:
            evaluation, gate = scored, run.data.tags["eval.gate"]
            tags = run.data.tags
            earlier = {"source": tags.get("eval.earlier", ""), "gate": tags.get("earlier.eval.gate"),
                       "eval": _scored(run.data.metrics, "earlier/")} if "eval.earlier" in tags else {}
    experiment = client.get_experiment(run.info.experiment_id) if run else None
    return {"tracking_uri": tracking_uri(), "experiment": experiment.name if experiment else experiment_name(),
            "experiment_id": experiment.experiment_id if experiment else None, "children": children,
            "eval": evaluation, "gate": gate, "earlier": earlier}


def _scored(m: Mapping[str, float], prefix: str = "") -> dict[str, dict[str, float | None]]:
    """``<prefix>eval/<task>/<metric>`` with its ``<prefix>delta/…`` → {task/metric: {tuned, delta}}."""
    head = f"{prefix}eval/"
    return {k.removeprefix(head): {"tuned": v, "delta": m.get(f"{prefix}delta/" + k.removeprefix(head))}
            for k, v in sorted(m.items()) if k.startswith(head) and f"{prefix}delta/" + k.removeprefix(head) in m}


def latest_runs(stage: str, n: int) -> list[str]:
    """The ids of the newest ``n`` FINISHED runs tagged ``stage`` in the experiment, newest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None:
        return []
    found = client.search_runs([experiment.experiment_id], max_results=n, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'")
    return [run.info.run_id for run in found]
