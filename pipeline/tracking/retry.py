"""Several stages on one sqlite store: retry while it is locked, and one process at a time creating a new one.

Measured with MLflow 3.17 (tests/test_concurrency.py, README "Several runs at once"): MLflow's sqlite store waits up
to 20 s for a lock (``PRAGMA busy_timeout``), so three to six stages logging every step into one ``mlflow.db`` all
finish. Two things still fail. Processes that open a *new* store at the same moment race through its schema
migrations ("duplicate column name", "table … already exists"): :func:`first_use` lets one process at a time open it.
A write that waits more than 20 s behind a long transaction (an open ``sqlite3 mlflow.db`` shell, a backup, a store on
a network file system) gets "database is locked": :func:`retry_locked` tries again with backoff, then fails with a
message that names ``make server``. A tracking server (``http://…``) needs neither: MLflow's HTTP client retries itself.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.errors import StageError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0)  # seconds before each retry: 30 s on top of MLflow's own 20 s per try
FIRST_USE_TIMEOUT = 120.0  # seconds to wait for another process that is creating the same new store
LOCKED = ("database is locked", "database table is locked", "database schema is locked")


def is_locked(err: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is sqlite's "database is locked"."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(text in str(err) for text in LOCKED):
            return True
        err = err.__cause__ or err.__context__
    return False


def locked_message(uri: str, waited: float) -> str:
    return (f"the tracking store {uri} stayed locked for {waited:.0f} s: another process holds a long write lock on "
            f"it (an open `sqlite3` shell or transaction, a backup, a store on a network file system). Close that "
            f"and run again; for several stages or people writing at once run `make server` and "
            f"`export MLFLOW_TRACKING_URI=http://127.0.0.1:5000` (README: Several runs at once)")


class _LockNoise(logging.Filter):
    """MLflow logs every locked write with a full SQLAlchemy traceback before raising it; the retry says it in one
    line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            text = str(record.msg)
        return not (is_locked(record.exc_info[1] if record.exc_info else None) or any(t in text for t in LOCKED))


@functools.cache
def _quiet_mlflow() -> None:
    logging.getLogger("mlflow.store.db.utils").addFilter(_LockNoise())


def _store_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def retry_locked(fn: F | None = None, *, delays: Iterable[float] = DELAYS) -> Any:
    """Decorate a function that writes to the tracking store: on "database is locked" wait and call it again (the
    failed write was rolled back, and every logging call here may be repeated); after the last delay a StageError."""
    delays = tuple(delays)

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _quiet_mlflow()
            start, waits = time.monotonic(), iter(delays)
            for attempt in range(2, len(delays) + 3):  # bounded: one call, then one per delay
                try:
                    return f(*args, **kwargs)
                except Exception as err:
                    delay = next(waits, None)
                    if not is_locked(err):
                        raise
                    if delay is None:
                        raise StageError(locked_message(_store_uri(), time.monotonic() - start)) from err
                    log.warning("the tracking store is locked by another writer (%s); try %d of %d in %.0f s",
                                f.__name__, attempt, len(delays) + 1, delay)
                    time.sleep(delay)
            return None
        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI (relative to the working directory, or absolute with four
    slashes); None for an in-memory or a non-sqlite store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def first_use(uri: str) -> None:
    """Open the store once in this process while holding a lock that every zh-align process takes for the same
    sqlite file, so two stages started together on a new ``mlflow.db`` never run its migrations at the same time.
    Other stores (a server, PostgreSQL) are left to MLflow."""
    path = sqlite_path(uri)
    if path is not None:
        _first_use(uri, path)


@functools.cache
def _first_use(uri: str, path: Path) -> None:
    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"zh-align-store-{digest}.lock"
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access: any user may share it
    try:
        deadline = time.monotonic() + FIRST_USE_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StageError(f"another process has been creating the tracking store {uri} for "
                                     f"{FIRST_USE_TIMEOUT:.0f} s (lock {lock}); if none is running, delete the lock "
                                     f"file and run again") from None
                time.sleep(0.2)
        _open_store(uri)
    finally:
        os.close(fd)  # releases the lock


@retry_locked
def _open_store(uri: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).search_experiments(max_results=1)
