"""A catalogue of bad inputs: each one answered by a message naming the problem and the fix, a non-zero exit (2 for
bad input, 1 where the data is fine but the configured filters leave nothing), nothing written, no run left RUNNING
or FINISHED in the store, and never a bare traceback.

Each case calls an entry point's ``main(argv)`` in-process (the exit code it returns, stderr from capsys) the way the
Makefile calls it — a stage's pre-check is ``--dry-run true`` (``--check`` when ``DRY_RUN=0``) — or, where the shell
or the clock is the point (the Makefile's quoting, an unreachable server), runs a subprocess. Related, finer tests of
one layer: tests/test_config.py (the strict loader's messages), tests/test_prepare.py (a missing source path, an
empty pool named by its step), tests/test_evaluate.py (an unknown task or mirror at run time), tests/test_export.py
(pull into a full folder, a missing alias).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline import align, evaluate, export, pipeline, prepare, registry, rerun, sft
from pipeline.core.paths import CONFIGS, ROOT

Main = Callable[[list[str] | None], int]


@dataclass
class Case:
    main: Main | None                 # an entry point's main(argv); None: `command` runs as a subprocess
    argv: list[str]
    words: tuple[str, ...]            # in stderr: the problem and the fix
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    output: Path | None = None        # must not exist afterwards
    seconds: float | None = None      # must answer within
    command: list[str] = field(default_factory=list)
    unchanged: Path | None = None     # a file that must keep its bytes (the corrupt store)
    absent: tuple[str, ...] = ()      # must not be in stderr (a wrong key named)


@dataclass
class World:
    tmp: Path
    db: Path
    pool: Path                        # a prepared pool (manifest + the four files)
    truncated: Path                   # the same with sft.jsonl cut short
    one_source: Path                  # prepare config reading one source (ultrafeedback_binarized) from `path`
    oasst1: Path                      # prepare config reading the oasst1 fixture alone
    guarded: str                      # an http server that answers 401 to everything (a tracking server with auth)

    def out(self, name: str) -> Path:
        return self.tmp / "out" / name

    def source(self, name: str, data: bytes, file: str = "train_prefs-00000-of-00001.jsonl") -> Path:
        folder = self.tmp / "sources" / name
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "data" / file).write_bytes(data)
        return folder


def _pool(folder: Path) -> Path:
    rows = {"sft.jsonl": [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
                           "n_tokens": 12, "bucket": 0, "lang": "zh", "source": "oasst1"}] * 3,
            "pref.jsonl": [{"prompt": [{"role": "user", "content": "你好"}], "chosen": [], "rejected": [],
                            "n_tokens": 12, "bucket": 0, "lang": "zh", "source": "oasst1"}] * 3}
    rows["sft_eval.jsonl"], rows["pref_eval.jsonl"] = rows["sft.jsonl"][:1], rows["pref.jsonl"][:1]
    folder.mkdir(parents=True)
    outputs = {}
    for name, items in rows.items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode()
        (folder / name).write_bytes(data)
        outputs[name] = {"sha256": hashlib.sha256(data).hexdigest(), "rows": len(items)}
    manifest = {"outputs": outputs, "tokenizer": "tiny-qwen2", "pool": {"sft": {"tokens": 36}, "pref": {"tokens": 36}},
                "mix": {"pref": {"zh_share": 0.7}}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


class Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One store with a registered model (zh-align-merged/1 @candidate), a pool, a truncated pool, a one-source
    prepare config."""
    import mlflow

    tmp = tmp_path_factory.mktemp("bad-inputs")
    db = tmp / "mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "zh-align-bad-inputs")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.setenv("ZH_ALIGN_EVAL_CACHE", str(tmp / "eval-cache"))
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    client.create_registered_model("zh-align-merged")
    (tmp / "model").mkdir()
    version = client.create_model_version("zh-align-merged", source=str(tmp / "model"))
    client.set_registered_model_alias("zh-align-merged", "candidate", version.version)
    pool = _pool(tmp / "pool")
    truncated = tmp / "truncated"
    shutil.copytree(pool, truncated)
    data = (truncated / "sft.jsonl").read_bytes()
    (truncated / "sft.jsonl").write_bytes(data[: len(data) // 2])  # as a full disk or a kill mid-write leaves it
    cfg = yaml.safe_load((CONFIGS / "smoke" / "prepare.yaml").read_text(encoding="utf-8"))
    cfg["sources"] = [s for s in cfg["sources"] if s["name"] == "ultrafeedback_binarized"]
    one = tmp / "prepare-one-source.yaml"
    one.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    cfg["sources"] = [{"name": "oasst1", "hub_id": "OpenAssistant/oasst1", "revision": "main",
                       "path": str(ROOT / "tests" / "fixtures" / "oasst1")}]
    oasst1 = tmp / "prepare-oasst1.yaml"
    oasst1.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield World(tmp, db, pool, truncated, one, oasst1, f"http://127.0.0.1:{server.server_port}")
    server.shutdown()
    mp.undo()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


# ------------------------------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------------------------------
def dry(*sets: str, hw: str = "cpu", check: bool = False) -> list[str]:
    """A stage's pre-check as the Makefile runs it."""
    return ["--hw", hw, "--dry-run", "true", *(["--check"] if check else []), *(x for s in sets for x in ("--set", s))]


def write(w: World, name: str, data: bytes) -> str:
    path = w.tmp / "configs" / name.replace("/", "-")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return str(path)


def empty_yaml(main: Main, stage: str, *extra: str) -> Callable[[World], Case]:
    return lambda w: Case(main, ["--config", write(w, f"empty-{stage}.yaml", b"# nothing here\n"), *extra, *dry()],
                          ("holds no keys", f"start from configs/smoke/{stage}"))


def one_source(name: str, data: bytes, words: tuple[str, ...], file: str = "train_prefs-00000-of-00001.jsonl"
               ) -> Callable[[World], Case]:
    """prepare, for real, on one source whose only file is ``data``."""
    def case(w: World) -> Case:
        folder = w.source(name, data, file)
        return Case(prepare.main, ["--config", str(w.one_source), "--hw", "cpu", "--dry-run", "false", "--set",
                                   f"sources.0.path={folder}", "--set", f"output_dir={w.out(name)}"],
                    words, output=w.out(name))
    return case


UFB_ROW = {"prompt": "你好", "chosen": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
           "rejected": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗯"}],
           "score_chosen": 8.0, "score_rejected": 2.0}


def cuda_without_bf16(mp: pytest.MonkeyPatch) -> None:
    """A machine whose card has no bf16 (a T4): what torch reports there."""
    import torch

    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    mp.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")


def read_only_store(w: World) -> Case:
    store = w.tmp / "read-only" / "mlflow.db"
    store.parent.mkdir(exist_ok=True)
    shutil.copy(w.db, store)
    store.chmod(0o444)
    immutable = os.access(store, os.W_OK) and shutil.which("chattr")  # root: permissions do not bind; chattr +i does
    if immutable:
        subprocess.run(["chattr", "+i", str(store)], capture_output=True)
    if os.access(store, os.W_OK):
        pytest.skip("cannot make a file read-only for this user here (root without chattr +i)")
    return Case(sft.main, dry(), ("read-only", "chmod u+w", "MLFLOW_TRACKING_URI"), env={"MLFLOW_TRACKING_URI":
                                                                                      f"sqlite:///{store}"})


def corrupt_store(w: World) -> Case:
    store = w.tmp / "corrupt" / "mlflow.db"
    store.parent.mkdir(exist_ok=True)
    store.write_bytes(w.db.read_bytes()[:4096] + os.urandom(8192))  # the header survives, the pages do not
    return Case(sft.main, dry(), ("corrupt", f"mv {store} {store}.broken"), env={"MLFLOW_TRACKING_URI":
                                                                                  f"sqlite:///{store}"},
                unchanged=store)


def unreachable_server(w: World) -> Case:
    """A real run against a server that is not there: refused within 10 s, before a model or the pool is loaded."""
    out = w.out("unreachable")
    return Case(None, [], ("http://127.0.0.1:9", "connection refused", "make server", "MLFLOW_TRACKING_URI"),
                env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, seconds=10, output=out,
                command=[sys.executable, "-m", "pipeline.sft", "--hw", "cpu", "--dry-run", "false", "--set",
                         f"data.path={w.pool}", "--set", f"output_dir={out}"])


def make_quote(w: World) -> Case:
    return Case(None, [], ("No closing quotation", "inside the other kind of quotes"),
                command=["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "evaluate", "HW=cpu",
                         "SET=adapter=it's"])


def mirror(w: World, name: str, files: dict[str, str]) -> Path:
    folder = w.tmp / "mirrors" / name
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


CASES: dict[str, Callable[[World], Case]] = {
    # configs
    "config-unknown-key": lambda w: Case(sft.main, dry("lora.rr=8"), ("`lora.rr` (from --set)", "unknown key",
                                                                     "did you mean `lora.r`?")),
    "config-wrong-type": lambda w: Case(sft.main, dry("train.lr=fast"), ("`train.lr`", "expected a number", "'fast'")),
    "config-negative-lr": lambda w: Case(sft.main, dry("train.lr=-0.0002"), ("`train.lr`", "must be positive")),
    "config-lora-r-zero": lambda w: Case(sft.main, dry("lora.r=0"), ("`lora.r`", "must be at least 1")),
    "config-max-length-above-the-models": lambda w: Case(sft.main, dry("hw.max_length=1000000"), (
        "exceeds tiny-qwen2's maximum", "set `hw.max_length` to at most")),
    "config-unsorted-bucket-edges": lambda w: Case(prepare.main, dry("buckets=[1024, 256]"), (
        "`buckets`", "strictly ascending")),
    "config-share-above-1": lambda w: Case(prepare.main, dry("mix.sft.zh_share=1.5"), ("`mix.sft.zh_share`",
                                                                                       "must be in [0, 1]")),
    "config-unknown-profile": lambda w: Case(sft.main, dry(hw="3090"), ("unknown hardware profile '3090'",
                                                                        "valid profiles: 4090, 5090")),
    "config-unknown-model": lambda w: Case(sft.main, dry("model=qwen2.5-7b"), ("unknown model definition 'qwen2.5-7b'",
                                                                               "valid models", "qwen2.5-7b-instruct")),
    "config-unknown-loss": lambda w: Case(align.main, dry("loss=kto"), ("`loss`", "expected one of 'orpo', 'dpo'",
                                                                        "'kto'")),
    "config-unknown-loss-flag": lambda w: Case(align.main, ["--loss", "kto", *dry()], ("--loss", "expected one of orpo, "
                                                                                       "dpo")),
    "config-empty-yaml-prepare": empty_yaml(prepare.main, "prepare"),
    "config-empty-yaml-sft": empty_yaml(sft.main, "sft"),
    "config-empty-yaml-align": empty_yaml(align.main, "align/orpo"),
    "config-empty-yaml-evaluate": empty_yaml(evaluate.main, "evaluate"),
    "config-empty-yaml-export": empty_yaml(export.main, "export"),
    "config-yaml-list": lambda w: Case(sft.main, ["--config", write(w, "list.yaml", b"- model\n- lora\n"), *dry()],
                                       ("expected a mapping of keys at the top", "`key: value`")),
    "config-non-utf8-file": lambda w: Case(sft.main, ["--config", write(w, "gbk.yaml", "# 中文注释\nmodel: tiny-qwen2\n"
                                                                        .encode("gbk")), *dry()],
                                           ("gbk.yaml:1: not UTF-8", "save the file as UTF-8")),
    "config-override-without-equals": lambda w: Case(sft.main, dry("lora.r"), ("'lora.r'", "expected key=value")),
    "config-override-bad-yaml": lambda w: Case(evaluate.main, dry("mirrors={cmmlu:"), ("not valid YAML",
                                                                                        "in quotes as a whole")),
    "config-unbalanced-quote": lambda w: Case(evaluate.main, ["--overrides", "adapter=it's", *dry()], (
        "No closing quotation", "inside the other kind of quotes")),
    "config-pipeline-override-no-stage-has": lambda w: Case(pipeline.main, dry("lora_rank=8"), (
        "no stage has a key `lora_rank`", "prefix a stage")),
    # eval
    "eval-tasks-empty": lambda w: Case(evaluate.main, dry("tasks=[]"), ("`tasks` is empty", "tasks=[zh_smoke]")),
    "eval-batch-size-abc": lambda w: Case(evaluate.main, dry("batch_size=abc"), ("`batch_size` is 'abc'",
                                                                                 "positive integer, auto")),
    "eval-unknown-task": lambda w: Case(evaluate.main, dry("tasks=[no_such_task]"), ("unknown task 'no_such_task'",
                                                                                     "lm-eval ls tasks")),
    "eval-task-typo-zh_smok": lambda w: Case(evaluate.main, dry("tasks=[zh_smok]"), ("unknown task 'zh_smok'",
                                                                                     "did you mean zh_smoke?")),
    "eval-mirror-of-an-unmirrored-task": lambda w: Case(evaluate.main, dry("mirrors.arc_easy=/data/arc"), (
        "no local layout for task 'arc_easy'", "cmmlu, zh_smoke")),
    "eval-mirror-folder-missing": lambda w: Case(evaluate.main, dry("tasks=[cmmlu]", f"mirrors.cmmlu={w.tmp}/nowhere",
                                                                    check=True),
                                                 ("`mirrors.cmmlu`", "folder not found", "expected test/<subject>.csv")),
    "eval-mirror-without-files": lambda w: Case(evaluate.main, dry(
        "tasks=[cmmlu]", f"mirrors.cmmlu={mirror(w, 'empty', {})}", check=True), (
        "no files in the expected layout", "expected test/<subject>.csv")),
    "eval-mirror-without-the-columns": lambda w: Case(evaluate.main, dry("tasks=[cmmlu]", "mirrors.cmmlu=" + str(mirror(
        w, "columns", {"test/art.csv": ",Question,A,B,C,D\n0,q,a,b,c,d\n", "dev/art.csv": ",Question,A,B,C,D\n"})),
        check=True), ("lacks column(s) Answer", "with columns Question, A, B, C, D, Answer")),
    "pipeline-typo-in-the-last-stage": lambda w: Case(pipeline.main, ["--hw", "cpu", "--dry-run", "false", "--set",
                                                                      "evaluate.tasks=[no_such_task]"],
                                                      ("evaluate.yaml", "unknown task 'no_such_task'"), seconds=30),
    # data
    "data-path-missing": lambda w: Case(sft.main, dry(f"data.path={w.tmp}/nowhere", check=True), (
        "holds no prepared pool", "make prepare HW=cpu DRY_RUN=0")),
    "data-pool-truncated": lambda w: Case(sft.main, dry(f"data.path={w.truncated}", check=True), (
        "sft.jsonl has sha256", "truncated", "run `make prepare` again")),
    "data-pool-truncated-at-run-time": lambda w: Case(sft.main, ["--hw", "cpu", "--dry-run", "false", "--set",
                                                                 f"data.path={w.truncated}", "--set",
                                                                 f"output_dir={w.out('truncated')}"],
                                                      ("sft.jsonl has sha256", "run `make prepare` again"),
                                                      output=w.out("truncated")),
    "data-run-id-not-in-the-store": lambda w: Case(sft.main, dry("data.run_id=" + "deadbeef" * 4, check=True), (
        f"`data.run_id` '{'deadbeef' * 4}' is not a run in", "set `data.path`")),
    "data-resume-path-missing": lambda w: Case(sft.main, dry(f"data.path={w.pool}", f"train.resume={w.tmp}/ckpt-9",
                                                             check=True), ("`train.resume`", "is not a checkpoint "
                                                                                             "folder", "auto")),
    "data-empty-file": one_source("empty", b"", ("holds no rows (an empty file)", "point `path` at")),
    "data-non-utf8-bytes": one_source("gbk", json.dumps(UFB_ROW, ensure_ascii=False).encode("gbk") + b"\n",
                                      ("non-UTF-8 bytes: 1", "UTF-8 JSON lines")),
    "data-json-line-not-an-object": one_source("list", b'["prompt", "chosen"]\n[1, 2]\n',
                                               ("row is not a JSON object: 2", "JSON lines of objects")),
    "data-missing-fields": one_source("fields", b'{"prompt": "hi"}\n{"prompt": "yo"}\n', (
        "none of the 2 rows", "not a list of role/content messages", "hub layout")),
    "data-10mb-row": one_source("huge", json.dumps({**UFB_ROW, "prompt": "长" * ((10 << 20) // 3)},
                                                                  ensure_ascii=False).encode() + b"\n",
                                ("row over 1 MiB: 1", "point `path` at")),
    "data-parquet-that-is-not-parquet": one_source("parquet", b"PAR1 but not really\n", (
        "is not a parquet file", "replace it with the dataset's own file"), file="train_prefs-00000-of-00001.parquet"),
    "data-every-row-filtered-out": lambda w: Case(prepare.main, [
        "--config", str(w.oasst1), "--hw", "cpu", "--dry-run", "false", "--set", "buckets=[4]", "--set",
        "mix.sft.curriculum=[]", "--set", f"output_dir={w.out('filtered')}"],
        ("the sft pool is empty: the length step removed all", "raise the last of `buckets`"), code=1,
        output=w.out("filtered")),
    "eval-adapter-that-does-not-exist": lambda w: Case(evaluate.main, dry("adapter=zh-align-sft@nope", check=True), (
        "`adapter` 'zh-align-sft@nope' is not a run, `name@alias` or `name/version`", "check `adapter`")),
    "export-bad-adapter-names-adapter": lambda w: Case(export.main, dry("adapter=no-such-adapter", check=True), (
        "`adapter` 'no-such-adapter'", "check `adapter`"), absent=("start_from",)),
    "align-bad-start-from": lambda w: Case(align.main, dry("start_from=zh-align-sft/7", f"data.path={w.pool}",
                                                           check=True), ("`start_from` 'zh-align-sft/7'",
                                                                         "check `start_from`")),
    # registry
    "registry-promote-without-model": lambda w: Case(registry.main, ["promote", "--model", "", "--version", ""], (
        "MODEL ''", "make promote MODEL=zh-align-merged VERSION=3", "VERSION ''")),
    "registry-promote-a-version-that-does-not-exist": lambda w: Case(registry.main, [
        "promote", "--model", "zh-align-merged", "--version", "99"], ("'zh-align-merged/99' does not exist",
                                                                     "versions: 1")),
    "registry-unknown-model-name": lambda w: Case(registry.main, ["promote", "--model", "zh-align-mergd", "--version",
                                                                  "1"], ("no registered model 'zh-align-mergd'",
                                                                         "did you mean `zh-align-merged`?")),
    "registry-pull-missing-alias": lambda w: Case(registry.main, [
        "pull", "--model", "zh-align-merged@champion", "--dest", str(w.out("pulled")), "--hw", "cpu"], (
        "'zh-align-merged@champion' does not exist", "aliases of zh-align-merged: candidate (version 1)"),
        output=w.out("pulled")),
    "registry-pull-unknown-model": lambda w: Case(registry.main, [
        "pull", "--model", "nope@candidate", "--dest", str(w.out("pulled")), "--hw", "cpu"],
        ("no registered model 'nope'", "registered: zh-align-merged"), output=w.out("pulled")),
    "registry-pull-into-a-non-empty-folder": lambda w: Case(registry.main, [
        "pull", "--model", "zh-align-merged@candidate", "--dest", str(w.pool), "--hw", "cpu"],
        ("is not empty", "OVERWRITE=1")),
    "registry-pull-into-a-file": lambda w: Case(registry.main, [
        "pull", "--model", "zh-align-merged@candidate", "--dest", str(w.pool / "manifest.json"), "--hw", "cpu"],
        ("is a file", "new or empty folder")),
    "registry-pull-without-dest": lambda w: Case(registry.main, ["pull", "--model", "zh-align-merged@candidate",
                                                                 "--dest", ""], ("DEST is empty", "DEST=outputs/pulled")),
    "rerun-without-run-id": lambda w: Case(rerun.main, ["--run-id", ""], ("RUN_ID is empty", "make rerun RUN_ID=")),
    # hardware
    "hw-qlora-without-cuda": lambda w: Case(sft.main, dry(f"data.path={w.pool}", "hw.qlora=true", hw="4090",
                                                          check=True), (
        "turns QLoRA on, which needs a CUDA GPU", "hw.qlora=false")),
    "hw-qlora-on-the-cpu-profile": lambda w: Case(sft.main, dry("hw.qlora=true"), (
        "`qlora` needs CUDA but `device` is cpu", "set `qlora: false`")),
    "hw-device-cuda-on-hw-cpu": lambda w: Case(sft.main, dry(f"data.path={w.pool}", "hw.device=cuda", check=True), (
        "`hw.device=cuda` (from SET / --set)", "drop that override")),
    "hw-bf16-without-support": lambda w: Case(sft.main, dry(f"data.path={w.pool}", "hw.qlora=false", hw="4090",
                                                            check=True),
                                              ("trains in bf16, which Tesla T4 does not support", "hw.precision=fp16"),
                                              patch=cuda_without_bf16),
    # tracking
    "tracking-unreachable-uri": unreachable_server,
    "tracking-read-only-store": read_only_store,
    "tracking-corrupt-mlflow-db": corrupt_store,
    "tracking-mlflow-db-that-is-not-sqlite": lambda w: Case(sft.main, dry(), (
        "not a readable SQLite database (file is not a database)", ".broken"), env={
        "MLFLOW_TRACKING_URI": f"sqlite:///{write(w, 'notes.db', b'meeting notes, not a store' * 200)}"}),
    "tracking-server-refuses-the-credentials": lambda w: Case(sft.main, dry(), (
        "refused the credentials (HTTP 401)", "MLFLOW_TRACKING_USERNAME"), env={"MLFLOW_TRACKING_URI": w.guarded}),
    "tracking-store-folder-missing": lambda w: Case(sft.main, dry(), ("does not exist", "mkdir -p"), env={
        "MLFLOW_TRACKING_URI": f"sqlite:///{w.tmp}/no/such/folder/mlflow.db"}),
    # the Makefile
    "make-single-quote-in-set": make_quote,
    "make-pipeline-typo-in-the-last-stage": lambda w: Case(None, [], ("unknown task 'no_such_task'", "lm-eval ls tasks"),
                                                           seconds=30, command=[
        "make", "--no-print-directory", "-o", ".venv/.setup-stamp", "pipeline", "HW=cpu", "DRY_RUN=0",
        "SET=evaluate.tasks=[no_such_task]"]),
}


def live_runs(db: Path) -> int:
    """Runs in the store that are RUNNING or FINISHED (a refused input may leave a FAILED run, never these)."""
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" not in tables:
            return 0
        return con.execute("SELECT count(*) FROM runs WHERE status IN ('RUNNING', 'FINISHED')").fetchone()[0]


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, capsys, monkeypatch):
    if name == "hw-qlora-without-cuda" or name == "hw-device-cuda-on-hw-cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    case = CASES[name](world)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.patch:
        case.patch(monkeypatch)
    before, kept = live_runs(world.db), case.unchanged.read_bytes() if case.unchanged else None
    started = time.monotonic()
    try:
        if case.command:
            env = {**os.environ, "PYTHONPATH": str(ROOT), **case.env}
            done = subprocess.run(case.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            code, err = done.returncode, done.stderr
        else:
            try:
                code = case.main(case.argv)
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code
            err = capsys.readouterr().err
    finally:
        if name == "tracking-read-only-store" and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(world.tmp / "read-only" / "mlflow.db")], capture_output=True)
    elapsed = time.monotonic() - started
    assert code == case.code, err
    for word in case.words:
        assert word in err, f"{word!r} not in:\n{err}"
    for word in case.absent:
        assert word not in err, err
    assert "Traceback (most recent call last)" not in err and "unexpected EOF" not in err, err
    if case.seconds:
        assert elapsed < case.seconds, f"answered after {elapsed:.1f} s"
    if case.output:
        assert not case.output.exists(), f"{case.output} was written"
    if case.unchanged:
        assert case.unchanged.read_bytes() == kept
    assert live_runs(world.db) == before, "a run was left RUNNING or FINISHED"
