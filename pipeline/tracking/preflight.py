"""The tracking store checked before anything costs: reachable, readable, writable, not corrupt — one line each.

Without it a stage meets a bad store only when it first logs: an unreachable ``MLFLOW_TRACKING_URI`` retries for
minutes (MLflow's client: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 7, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 120 s) and then
prints five tracebacks; a read-only or corrupt ``mlflow.db`` prints hundreds of SQLAlchemy lines. :func:`check_store`
answers in seconds: an http(s) server is asked once, no retry, a :data:`TIMEOUT_S` timeout; an sqlite file is opened
read-only with the standard library; a file store's folder is checked for writing. Nothing here imports MLflow.
Problems are :class:`~pipeline.core.errors.ConfigError` (exit 2): nothing has run.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.core.errors import ConfigError
from pipeline.core.secrets import redact_urls

TIMEOUT_S = 4                # the one request's timeout: a dead server is named well within 10 s
PROBED = {"alembic_version", "experiments", "runs", "metrics", "params", "tags", "registered_models", "model_versions"}
FIX = "set MLFLOW_TRACKING_URI to a store you can use (the default is sqlite:///mlflow.db in the repository)"


def check_store(uri: str | None = None) -> None:
    """Raise ConfigError with one line naming the store, what is wrong and the fix; return when it can be used."""
    from pipeline.tracking.runs import tracking_uri

    uri = uri or tracking_uri()
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("", "file"):
        _check_folder(uri, Path(unquote(urlsplit(uri).path) if scheme == "file" else uri))
    # postgresql, mysql, databricks, …: left to MLflow


def _fail(uri: str, problem: str) -> None:
    raise ConfigError([f"tracking store {_shown(uri)}: {problem}"])


def _shown(uri: str) -> str:
    """The URI without the password of its userinfo."""
    return redact_urls(uri)


def _check_server(uri: str) -> None:
    """One GET of MLflow's REST API with no retry and a short timeout (``requests``, which MLflow's client uses, without
    importing MLflow: the answer comes in well under 10 s), with the credentials MLflow would send."""
    import requests

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    verify = False if insecure else os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    try:
        response = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                                timeout=TIMEOUT_S, verify=verify, auth=(user, password) if user else None,
                                headers={"Authorization": f"Bearer {token}"} if token else None)
    except requests.RequestException as err:
        text = str(err).lower()
        reason = ("connection refused" if "refused" in text else "timed out" if "timed out" in text or "timeout" in text
                  else "name not resolved" if "resolve" in text or "name or service" in text else type(err).__name__)
        _fail(uri, f"no answer within {TIMEOUT_S} s ({reason}); start the server (`make server`, or `mlflow server "
                   f"--host 127.0.0.1 --port …`), or {FIX}")
    if response.status_code in (401, 403):
        _fail(uri, f"the server refused the credentials (HTTP {response.status_code}); set MLFLOW_TRACKING_USERNAME "
                   f"/ MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it")
    if response.status_code >= 400:
        _fail(uri, f"answers HTTP {response.status_code} to MLflow's REST API: is it an MLflow tracking server? {FIX}")


def _sqlite_path(uri: str) -> Path | None:
    """The file of ``sqlite:///relative.db`` / ``sqlite:////abs.db`` (None: in memory)."""
    rest = uri.split("://", 1)[1].split("?", 1)[0]
    if rest in ("", "/", "/:memory:"):
        return None
    return Path(unquote(rest[1:] if rest.startswith("/") else rest))


def _check_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        _fail(uri, f"the folder {folder} does not exist; create it (mkdir -p {folder}) or {FIX}")
    if path.exists() and not path.is_file():
        _fail(uri, f"{path} is not a file; {FIX}")
    writable = os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    if not writable:
        what = path if path.exists() and not os.access(path, os.W_OK) else folder
        _fail(uri, f"{what} is read-only for this user, and every run writes to the store (sqlite also writes a "
                   f"journal beside the file); make it writable (chmod u+w {what}), or {FIX}")
    if not path.exists() or path.stat().st_size == 0:
        return  # MLflow creates the store on first use
    try:
        with closing(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=5)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table in sorted(tables & PROBED):  # their first pages, not the whole file (a store grows to GBs)
                db.execute(f"SELECT * FROM {table} LIMIT 1").fetchall()  # noqa: S608 - names from sqlite_master
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return  # another run is writing: MLflow waits for the lock itself
        _fail(uri, f"{path} cannot be read ({err}); {FIX}")
    except sqlite3.DatabaseError as err:
        _fail(uri, f"{path} is not a readable SQLite database ({err}): it is corrupted; move it aside "
                   f"(mv {path} {path}.broken) to start an empty store, or restore a backup")
    if tables and "experiments" not in tables:
        _fail(uri, f"{path} is an SQLite database but not an MLflow store (no experiments table); {FIX}")


def _check_folder(uri: str, path: Path) -> None:
    """A file store (``mlruns``): its folder, or the nearest existing parent, must be writable."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        _fail(uri, f"{probe} is a file, not a folder of runs; {FIX}")
    if not os.access(probe, os.W_OK):
        _fail(uri, f"{probe} is read-only for this user; make it writable (chmod u+w {probe}), or {FIX}")
