"""`make server` (pipeline/server.py): a real `mlflow server` on a free port of 127.0.0.1 on its own sqlite store, and
one on a throwaway PostgreSQL cluster (initdb + pg_ctl on a unix socket); two training-shaped stages log into each at
once, every metric arrives, artifacts go through the server. Bad DB URIs and a busy port are named before starting."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
from test_concurrency import METRICS, assert_writer_logged_every_step, finish, stage_env, writer

from pipeline import server
from pipeline.core.paths import ROOT

START = 240.0  # seconds a server may take to answer on a busy 2-core machine (it creates its store's tables)
STEPS = 10  # each training-shaped stage logs this many steps, each step two requests
RUNUSER = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")  # util-linux; sbin may be off PATH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m pipeline.server` in the background; stopped with everything it started, by pid."""

    def __init__(self, db: str, folder: Path):
        self.port, self.folder = free_port(), folder
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.server", "--port", str(self.port), "--db", db,
                 "--artifacts", str(folder / "artifacts"), "--workers", "1"], cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def wait(self) -> str:
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if f"export MLFLOW_TRACKING_URI={self.url}" in text:
                return self.url
            if self.proc.poll() is not None:
                pytest.fail(f"pipeline.server exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.5)
        pytest.fail(f"no server on {self.url} after {START:.0f} s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def terminate(self) -> None:
        """Ask pipeline.server to stop (it stops mlflow server and uvicorn); `stop` then waits and kills the rest."""
        try:
            self.family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            self.family = []
        self.proc.terminate()

    def stop(self) -> None:
        if not hasattr(self, "family"):
            self.terminate()
        try:
            self.proc.wait(timeout=5)  # a graceful stop; the rest is killed
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for child in self.family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throwaway PostgreSQL cluster listening only on a unix socket in a temporary folder (as user postgres when
    this runs as root: initdb refuses root)."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="zh-align-pg-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.sock.mkdir()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.sock):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.prefix = [RUNUSER, "-u", "postgres", "--"]
        self.started = False

    def run(self, *cmd: str) -> None:
        done = subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    def start(self) -> str:
        self.run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "mlflow", "--auth=trust", "-E", "UTF8",
                 "--no-sync")
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t",
                 "60", "-o", f"-c listen_addresses='' -k {self.sock} -c fsync=off -c full_page_writes=off", "start")
        self.started = True
        import psycopg2

        admin = psycopg2.connect(dbname="postgres", user="mlflow", host=str(self.sock))
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE mlflow")
        admin.close()
        return f"postgresql://mlflow@/mlflow?host={self.sock}"

    def stop(self) -> None:
        if self.started:
            subprocess.run([*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_missing() -> str | None:
    """Why the PostgreSQL case cannot run here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL's initdb / pg_ctl are not installed (Debian: apt-get install postgresql; .ci/run does)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[server]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no user postgres to run initdb as (initdb refuses root)"
        if RUNUSER is None:
            return "running as root without runuser to start PostgreSQL as user postgres"
    return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Both servers started at once (their start-ups overlap): backend name → URL (postgresql → the skip reason
    when PostgreSQL is not here) and the PostgreSQL socket folder."""
    tmp = tmp_path_factory.mktemp("servers")
    started: list = []
    try:
        plain = Server(f"sqlite:///{tmp / 'sqlite' / 'mlflow.db'}", tmp_path_factory.mktemp("sqlite-server"))
        started.append(plain)
        urls = {"sqlite": "", "postgresql": postgres_missing() or "", "socket": ""}
        if not urls["postgresql"]:
            pg = Postgres(postgres_bin())
            started.append(pg)
            on_pg = Server(pg.start(), tmp_path_factory.mktemp("pg-server"))
            started.append(on_pg)
            urls["postgresql"], urls["socket"] = on_pg.wait(), str(pg.sock)
        urls["sqlite"] = plain.wait()
        yield urls
    finally:
        for thing in started:  # both servers stop at once
            if isinstance(thing, Server):
                thing.terminate()
        for thing in reversed(started):
            thing.stop()


def two_stages_at_once(url: str, experiment: str, cwd: Path) -> tuple[mlflow.MlflowClient, list]:
    env = stage_env(url, experiment)
    done = finish({name: writer(name, env, cwd, STEPS) for name in ("sft-a", "sft-b")})
    for name, (code, err) in done.items():
        assert code == 0, f"{name} exited {code}:\n{err[-3000:]}"
    client = mlflow.MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["sft-a", "sft-b"]
    for run in runs:
        assert_writer_logged_every_step(client, run, STEPS)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    return client, runs


def test_two_stages_log_every_metric_through_a_server_on_its_own_sqlite_store(servers, tmp_path):
    client, runs = two_stages_at_once(servers["sqlite"], "on-sqlite", tmp_path)
    local = Path(client.download_artifacts(runs[0].info.run_id, "data/卡片.md", str(tmp_path)))
    assert local.read_text(encoding="utf-8") == f"数据卡 {runs[0].info.run_name}"


def test_two_stages_log_every_metric_through_a_server_on_postgresql(servers, tmp_path):
    if not servers["postgresql"].startswith("http"):
        pytest.skip(servers["postgresql"])
    _, runs = two_stages_at_once(servers["postgresql"], "on-postgresql", tmp_path)
    import psycopg2

    with psycopg2.connect(dbname="mlflow", user="mlflow", host=servers["socket"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)", ([r.info.run_id for r in runs],))
        assert cur.fetchone()[0] == 2 * STEPS * len(METRICS)  # every step of both stages, stored in PostgreSQL


@pytest.mark.parametrize("db, message, code", [
    ("postgres://lab:hunter2@db.lab/mlflow", "SQLAlchemy spells the scheme postgresql://", 2),
    ("./mlruns", "expected a database URI", 2),
    ("sqlite:///:memory:", "forgets every run", 2),
    ("postgresql://lab:hunter2@127.0.0.1:9/mlflow",
     "cannot connect to postgresql+psycopg2://lab:[redacted]@127.0.0.1:9/mlflow", 1),
], ids=["postgres-scheme", "a-folder", "in-memory", "postgres-down"])
def test_a_bad_store_is_named_before_any_server_starts(db, message, code, capsys):
    assert server.main(["--port", str(free_port()), "--db", db]) == code
    err = capsys.readouterr().err
    assert message in err and "hunter2" not in err


def test_a_busy_port_is_named(capsys, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert server.main(["--port", str(port), "--db", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_binding_beyond_this_machine_warns_that_there_is_no_authentication(capsys):
    server.announce("postgresql://lab:pw@db/mlflow", "server/artifacts", "0.0.0.0", 5000, 3.0)
    out = capsys.readouterr()
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in out.out and "lab:[redacted]@db" in out.out
    assert "no authentication" in out.err
    server.announce("sqlite:///server/mlflow.db", "server/artifacts", "127.0.0.1", 5000, 3.0)
    assert capsys.readouterr().err == ""
