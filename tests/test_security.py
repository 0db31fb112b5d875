"""No secret reaches the store: fake tokens in the environment, passwords inside URL-valued variables and config
values, a token-named config key, secrets inside an error and a log line — after real prepare and sft runs, neither
mlflow.db (raw bytes), nor mlruns/, nor any output or log file holds one. Also: make ui binds 127.0.0.1, models load
from safetensors only, no trust_remote_code=True or unsafe torch.load in the package."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest

from pipeline import prepare, sft
from pipeline.core import secrets
from pipeline.core.errors import StageError
from pipeline.core.paths import ROOT
from pipeline.core.profiles import HubConfig, available, load_model
from pipeline.core.secrets import REDACTED, Scrubber, redact_urls
from pipeline.models import loading
from pipeline.stage import cli
from pipeline.stage import resolve as resolve_module
from pipeline.tracking import runs

ENV = {"HF_TOKEN": "hf_FAKEtokenAAAA1111bbbb", "WANDB_API_KEY": "wandbFAKEkey2222cccc",
       "HUGGING_FACE_HUB_TOKEN": "hfhubFAKE3333dddd", "MLFLOW_TRACKING_PASSWORD": "mlflowFAKEpw4444",
       "HF_ENDPOINT": "https://mirroruser:endpointPW5555@mirror.invalid",
       "WANDB_BASE_URL": "https://wbuser:wandbBasePW6666@wandb.invalid"}
HUB_ENDPOINT = "https://hubuser:hubConfigPW7777@hub-mirror.invalid"  # a config value (configs/hub.yaml's endpoint)
CONFIG_TOKEN = "cfgFAKEtoken8888eeee"                                  # a config value under a token-named key
CONFIG_URL = "https://cfguser:cfgUrlPW9999@data.invalid/rows"
SECRETS = [ENV["HF_TOKEN"], ENV["WANDB_API_KEY"], ENV["HUGGING_FACE_HUB_TOKEN"], ENV["MLFLOW_TRACKING_PASSWORD"],
           "endpointPW5555", "wandbBasePW6666", "hubConfigPW7777", CONFIG_TOKEN, "cfgUrlPW9999"]


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """prepare and sft run for real with fake secrets everywhere, then a run whose config, log, artifacts and error
    carry secrets; all in one store. Yields the folder (mlflow.db, mlruns/, outputs) and the run ids."""
    tmp = tmp_path_factory.mktemp("leaky")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "zh-align-secrets")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.setenv("HF_HOME", str(tmp / "hf-home"))
    for key, value in ENV.items():
        mp.setenv(key, value)
    mp.setattr(resolve_module, "load_hub", lambda: HubConfig(endpoint=HUB_ENDPOINT, home=str(tmp / "hf-home")))
    common = ["--hw", "cpu", "--dry-run", "false"]
    assert prepare.main([*common, "--set", f"output_dir={tmp / 'data'}"]) == 0
    sets = [f"data.path={tmp / 'data'}", f"output_dir={tmp / 'sft'}", "train.max_steps=2", "train.eval_steps=100",
            "train.save_steps=100", "hw.micro_batch=4", "hw.grad_accum=1", "register.name=zh-align-secrets"]
    assert sft.main([*common, *(x for s in sets for x in ("--set", s))]) == 0
    config = {"hub": {"api_token": CONFIG_TOKEN, "endpoint": HUB_ENDPOINT}, "source": {"url": CONFIG_URL}}
    with pytest.raises(RuntimeError), runs.start_run("probe", config, hw="cpu", model="tiny-qwen2") as probe:
        logging.getLogger("pipeline.probe").warning("connecting to %s with %s", CONFIG_URL, CONFIG_TOKEN)
        notes = tmp / "notes.md"
        notes.write_text(f"token {ENV['HF_TOKEN']} for {ENV['HF_ENDPOINT']}\n", encoding="utf-8")
        runs.log_artifacts([notes], "notes")
        runs.log_text(f"wandb {ENV['WANDB_API_KEY']}", "notes/wandb.txt")
        runs.set_tags({"note": f"pulled with {ENV['HUGGING_FACE_HUB_TOKEN']}"})
        raise RuntimeError(f"401 from {CONFIG_URL} with token {CONFIG_TOKEN} (HF_TOKEN={ENV['HF_TOKEN']})")
    client = mlflow.MlflowClient()
    ids = {r.data.tags["stage"]: r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("zh-align-secrets").experiment_id])}
    assert ids["probe"] == probe.info.run_id
    yield tmp, ids
    mp.undo()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def test_no_secret_is_anywhere_in_the_store_the_artifacts_the_outputs_or_the_logs(leaky):
    tmp, ids = leaky
    files = [p for p in tmp.rglob("*") if p.is_file() and p.name != "notes.md"]  # notes.md: the probe's own input
    assert {"mlflow.db", "prepare.log", "sft.log", "probe.log", "resolved_config.yaml", "notes.md", "wandb.txt",
            "adapter_model.safetensors", "manifest.json"} <= {p.name for p in files} | {"notes.md"}
    leaks = {f"{p.relative_to(tmp)}: {s}" for p in files for s in SECRETS if s.encode() in p.read_bytes()}
    assert not leaks
    assert b"mirroruser" in (tmp / "mlflow.db").read_bytes()  # the scan reads what was logged: the URL, redacted


def test_the_values_are_logged_redacted_not_left_out(leaky):
    _, ids = leaky
    client = mlflow.MlflowClient()
    for stage in ("prepare", "sft"):
        params = client.get_run(ids[stage]).data.params
        assert params["env.HF_ENDPOINT"] == f"https://mirroruser:{REDACTED}@mirror.invalid"
        assert params["env.WANDB_BASE_URL"] == f"https://wbuser:{REDACTED}@wandb.invalid"
        assert params["env.HF_TOKEN"] == params["env.WANDB_API_KEY"] == params["env.MLFLOW_TRACKING_PASSWORD"] == REDACTED
        assert params["hub.endpoint"] == f"https://hubuser:{REDACTED}@hub-mirror.invalid"
    probe = client.get_run(ids["probe"])
    assert probe.info.status == "FAILED" and probe.data.params["hub.api_token"] == REDACTED
    assert probe.data.params["source.url"] == f"https://cfguser:{REDACTED}@data.invalid/rows"
    assert probe.data.tags["error"] == (f"RuntimeError: 401 from https://cfguser:{REDACTED}@data.invalid/rows with token "
                                        f"{REDACTED} (HF_TOKEN={REDACTED})")
    assert probe.data.tags["note"] == f"pulled with {REDACTED}"
    log = mlflow.artifacts.load_text(f"runs:/{ids['probe']}/logs/probe.log")
    assert f"connecting to https://cfguser:{REDACTED}@data.invalid/rows with {REDACTED}" in log
    notes = mlflow.artifacts.load_text(f"runs:/{ids['probe']}/notes/notes.md")
    assert notes == f"token {REDACTED} for https://mirroruser:{REDACTED}@mirror.invalid\n"


def test_urls_lose_their_passwords_and_the_tracking_uri_too(monkeypatch):
    assert redact_urls("https://user:pw@mirror.com/x and ftp://a:b@c") == \
        f"https://user:{REDACTED}@mirror.com/x and ftp://a:{REDACTED}@c"
    assert redact_urls("https://ghp_abcdefghijklmnopqrstu@github.com/a") == f"https://{REDACTED}@github.com/a"
    for kept in ("postgresql://mlflow@localhost/db", "sqlite:///mlflow.db", "https://host/path@v2", "git@host:a/b"):
        assert redact_urls(kept) == kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://trackuser:trackPW1234@127.0.0.1:5000")
    assert runs.environment()["MLFLOW_TRACKING_URI"] == f"http://trackuser:{REDACTED}@127.0.0.1:5000"
    scrub = Scrubber()
    assert scrub("run 'x' is not in trackPW1234") == f"run 'x' is not in {REDACTED}"  # the bare password, anywhere


def test_the_dry_run_page_shows_the_endpoint_and_the_tracking_uri_without_their_passwords(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", ENV["HF_ENDPOINT"])
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://trackuser:trackPW1234@127.0.0.1:9")
    assert sft.main(["--hw", "4090"]) == 2  # the store is checked first; its one line names it without the password
    err = capsys.readouterr().err
    assert "trackPW1234" not in err and f"tracking store http://trackuser:{REDACTED}@127.0.0.1:9: no answer" in err
    monkeypatch.setattr(cli, "check_store", lambda *a, **k: None)  # the page itself, as if the server had answered
    assert sft.main(["--hw", "4090"]) == 0
    page = capsys.readouterr().out
    assert "endpointPW5555" not in page and "trackPW1234" not in page
    assert f"HF_ENDPOINT=https://mirroruser:{REDACTED}@mirror.invalid (from the environment)" in page
    assert f"http://trackuser:{REDACTED}@127.0.0.1:9 · experiment" in page


def test_short_values_and_working_directories_are_not_scrubbed_everywhere(monkeypatch, tmp_path):
    scrub = Scrubber(env={"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "PWD": str(tmp_path), "GITHUB_TOKEN": "123456789",
                          "OPENAI_API_KEY": "sk-fake-abcdef"})
    assert "sk-fake-abcdef" in scrub.values and not {"1", str(tmp_path), "123456789"} & set(scrub.values)
    assert scrub(f"step 1 of {tmp_path}/out, key sk-fake-abcdef") == f"step 1 of {tmp_path}/out, key {REDACTED}"
    assert secrets.secret_values({"lora": {"r": 16}, "hub": {"token": "abcdefgh"}, "x": ["a.password=hunter22"]}) == \
        {"abcdefgh", "hunter22"}


def test_make_ui_binds_127_0_0_1_unless_host_says_otherwise():
    def ui(*args: str) -> str:
        return subprocess.run(["make", "-n", "-o", ".venv/.setup-stamp", "ui", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    assert "--host '127.0.0.1'" in ui() and "--host '0.0.0.0'" in ui("HOST=0.0.0.0")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "no login" in readme and "delete runs and registered models" in readme


# ------------------------------------------------------------------------------------------------------------------
# Loading: safetensors only, no remote code unless a model definition asks, no pickles
# ------------------------------------------------------------------------------------------------------------------
SOURCES = sorted((ROOT / "pipeline").rglob("*.py"))


def test_the_package_has_no_trust_remote_code_true_and_no_unsafe_torch_load():
    offences = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        offences += [f"{rel}: trust_remote_code=True" for _ in re.finditer(r"trust_remote_code\s*[=:]\s*True", text)]
        for call in (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)):
            name = ast.unparse(call.func)
            if name.endswith("torch.load") or name == "load" and "from torch import load" in text:
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in call.keywords)
                if not safe:
                    offences.append(f"{rel}:{call.lineno}: {ast.unparse(call)} without weights_only=True")
    assert not offences


def test_every_model_load_in_the_package_asks_for_safetensors():
    loads = []
    for path in SOURCES:
        for call in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)):
            if ast.unparse(call.func) == "AutoModelForCausalLM.from_pretrained":
                ok = any(k.arg == "use_safetensors" and ast.unparse(k.value) == "True" or
                         k.arg is None and "safe_load_kwargs" in ast.unparse(k.value) for k in call.keywords)
                loads.append((f"{path.relative_to(ROOT)}:{call.lineno}", ok))
    assert len(loads) >= 5 and [where for where, ok in loads if not ok] == []


def test_trust_remote_code_is_off_for_every_model_and_turning_it_on_warns(caplog):
    models = [load_model(name) for name in available("models")]
    assert models and not any(m.trust_remote_code for m in models)
    assert loading.safe_load_kwargs(models[0]) == {"use_safetensors": True, "trust_remote_code": False}
    models[0].trust_remote_code = True
    with caplog.at_level(logging.WARNING):
        assert loading.safe_load_kwargs(models[0])["trust_remote_code"] is True
    assert f"model definition {models[0].name} turns trust_remote_code on" in caplog.text


def test_an_adapter_saved_as_a_pickle_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(StageError, match=r"adapter_model.bin but no adapter_model.safetensors: adapters load from "
                                         r"safetensors only"):
        loading.require_safetensors(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    loading.require_safetensors(tmp_path)
    loading.require_safetensors(Path("zh-align-sft@candidate"))  # not a folder: resolved (and checked) later
