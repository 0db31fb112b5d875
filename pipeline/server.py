"""server: `make server` — an MLflow tracking server on 127.0.0.1 with its own store, for several stages (or several
people) logging at once.

``python -m pipeline.server [--host 127.0.0.1] [--port 5000] [--db URI] [--artifacts DIR] [--workers N]`` starts
``mlflow server`` on the backend store ``--db`` (default ``sqlite:///server/mlflow.db`` in the repository;
``postgresql://USER@HOST/DB`` for a lab: the backend MLflow recommends for many writers) with the artifacts it
receives kept in ``--artifacts`` (default ``server/artifacts``), waits until it answers ``/health``, prints the
``MLFLOW_TRACKING_URI`` to export and runs until Ctrl-C. The store URI reaches MLflow through its environment
(``MLFLOW_BACKEND_STORE_URI``), never a command line that ``ps`` shows. The server has no authentication: it binds
127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import ROOT, repo_path, shown
from pipeline.core.secrets import redact_urls
from pipeline.stage.cli import guarded, setup_logging

DEFAULT_DB = "sqlite:///server/mlflow.db"
DEFAULT_ARTIFACTS = "server/artifacts"
SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy dialects MLflow's store supports
LOOPBACK = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT = 180.0  # seconds for the server to answer /health (its first start creates the store's tables)
STOP_TIMEOUT = 15.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 exposes the server, which has no authentication, to the network)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--db", default=os.environ.get("MLFLOW_BACKEND_STORE_URI") or DEFAULT_DB,
                        help=f"backend store (default {DEFAULT_DB}; postgresql://USER@HOST/DB for a lab)")
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS,
                        help=f"where the server keeps the artifacts it receives (default {DEFAULT_ARTIFACTS})")
    parser.add_argument("--workers", type=int, default=4, help="uvicorn worker processes (default 4)")
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(lambda: serve(args))


def masked(uri: str) -> str:
    """A store URI as it is shown: a password in it redacted."""
    return redact_urls(uri)


def store_uri(db: str) -> str:
    """The backend store URI, checked: a known dialect, its driver installed, a sqlite path made absolute (relative
    paths are relative to the repository, as everywhere here) with its folder created."""
    scheme = db.split("://", 1)[0].split("+", 1)[0] if "://" in db else ""
    if scheme == "postgres":
        raise ConfigError([f"DB={masked(db)}: SQLAlchemy spells the scheme postgresql://, not postgres://"])
    if scheme not in SCHEMES:
        raise ConfigError([f"DB={masked(db)}: expected a database URI, one of "
                           f"{', '.join(s + '://…' for s in SCHEMES)} (e.g. sqlite:///server/mlflow.db or "
                           f"postgresql://mlflow@127.0.0.1:5432/mlflow)"])
    if db.startswith("postgresql://"):  # SQLAlchemy 2.1 reads this as psycopg 3; the driver installed is psycopg2
        db = "postgresql+psycopg2://" + db.removeprefix("postgresql://")
    if db.startswith("postgresql+psycopg2://") and importlib.util.find_spec("psycopg2") is None:
        raise ConfigError([f"DB={masked(db)} needs the PostgreSQL driver: .venv/bin/pip install -e '.[server]' "
                           f"(psycopg2-binary)"])
    if scheme != "sqlite":
        return db
    path = db.split(":///", 1)[1] if ":///" in db else ""
    if not path or path.startswith(":memory:"):
        raise ConfigError([f"DB={db}: an in-memory store forgets every run when the server stops; give a file, "
                           f"e.g. {DEFAULT_DB}"])
    file, _, query = path.partition("?")
    file_path = repo_path(file)
    file_path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file_path}" + (f"?{query}" if query else "")


def check_postgres(db: str) -> None:
    """Connect once (5 s) so a database that is down or missing is named in one line, not in MLflow's traceback."""
    if not db.startswith("postgresql+psycopg2://"):
        return
    import psycopg2

    try:
        psycopg2.connect("postgresql://" + db.removeprefix("postgresql+psycopg2://"), connect_timeout=5).close()
    except psycopg2.Error as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StageError(f"cannot connect to {masked(db)}: {first}. Is PostgreSQL running there, and does the "
                         f"database exist (createdb -O USER DB)? A password belongs in ~/.pgpass or PGPASSWORD, "
                         f"not in DB=") from err


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise StageError(f"cannot listen on {host}:{port}: {err.strerror} (another `make server` or `make ui` "
                             f"there?); choose another port with PORT=") from err


def local_url(host: str, port: int) -> str:
    """The URL this machine reaches the server at."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def launch(db: str, artifacts: str, host: str, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": db}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # MLflow's GenAI job runner: a process we never use
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers),
           "--serve-artifacts", "--artifacts-destination", artifacts]
    return subprocess.Popen(cmd, cwd=ROOT, env=env)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = START_TIMEOUT) -> float:
    """Seconds until ``url``/health answers OK; a StageError if the server exits first or never answers."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise StageError(f"mlflow server exited with code {proc.returncode} before it answered; its messages "
                             f"are above")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StageError(f"mlflow server did not answer {url}/health within {timeout:.0f} s; its messages are above")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (uvicorn's workers), by pid; killed after STOP_TIMEOUT."""
    import psutil

    try:
        family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    if proc.poll() is None:
        proc.terminate()  # mlflow server passes SIGTERM on to uvicorn
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    for pid in family:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=STOP_TIMEOUT)


def announce(db: str, artifacts: str, host: str, port: int, seconds: float) -> None:
    url = local_url(host, port)
    print(f"MLflow server up on {host}:{port} after {seconds:.0f} s (store {masked(db)}, artifacts {artifacts})\n"
          f"point the stages at it (in each shell, or add it to ~/.bashrc):\n"
          f"  export MLFLOW_TRACKING_URI={url}\n"
          f"browse it at {url}; Ctrl-C stops it", flush=True)
    if host not in LOOPBACK:
        print(f"warning: bound to {host}: anyone who can reach port {port} can read, change and delete every run, "
              f"model and artifact in this store — MLflow's server has no authentication. Use it only on a trusted "
              f"network, or put a proxy with authentication in front of it", file=sys.stderr, flush=True)


def serve(args: argparse.Namespace) -> None:
    db = store_uri(args.db)
    artifacts = args.artifacts if "://" in args.artifacts else str(repo_path(args.artifacts))
    check_postgres(db)
    check_port(args.host, args.port)
    proc = launch(db, artifacts, args.host, args.port, args.workers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`, `docker stop`: stop the server too
    try:
        seconds = wait_healthy(proc, local_url(args.host, args.port))
        announce(db, shown(artifacts) if "://" not in artifacts else artifacts, args.host, args.port, seconds)
        code = proc.wait()
        if code:
            raise StageError(f"mlflow server exited with code {code}; its messages are above")
    except KeyboardInterrupt:
        print("stopping the MLflow server", file=sys.stderr, flush=True)
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
