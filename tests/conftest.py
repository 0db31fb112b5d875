"""Shared fixtures: offline, hermetic (a temporary MLflow store and tiny-model cache per test session)."""

from __future__ import annotations

import os

import mlflow
import pytest

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
                  TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["ZH_ALIGN_TINY_CACHE"] = str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session", autouse=True)
def _session_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A test with no store of its own (a dry run that looks an adapter up) reads an empty one, never the
    repository's mlflow.db, whose runs depend on what was run here before."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('session-store') / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store and artifact root in a temporary folder; the test runs from that folder."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "zh-align-test")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment() exports it
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory):
    """A temporary folder with its own MLflow store (experiment `zh-align-module`) shared by one test module."""
    tmp = tmp_path_factory.mktemp("module")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "zh-align-module")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield tmp
    mp.undo()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    """The smoke pool (prepare on the fixtures), made once per test module that asks for it, in its own MLflow store.
    A module may define its own ``pool`` instead."""
    from pipeline import prepare

    tmp = tmp_path_factory.mktemp("pool")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    assert prepare.main(["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={tmp / 'data'}"]) == 0
    mp.undo()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return tmp / "data"
