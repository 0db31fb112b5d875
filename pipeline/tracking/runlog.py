"""A run's full log file: every log line while the run is open (ours, TRL's, PEFT's, transformers' own logger, which
does not propagate to the root, with the Trainer's INFO lines), Python warnings (``logging.captureWarnings``) and the
Trainer's log dicts (:func:`pipeline.training.trainer.metrics_callback`), secrets scrubbed. A training stage keeps it
at ``<output_dir>/logs/<run id>.log``; :func:`pipeline.tracking.runs.start_run` logs it as ``logs/<stage>.log``."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipeline.core.secrets import ScrubbingFormatter


def path(stage: str, output: str | None, run_id: str) -> Path:
    """The run's full log: ``<output_dir>/logs/<run id>.log`` for a training stage (it stays beside its checkpoints),
    else a temporary file; either is logged as the run's ``logs/<stage>.log``."""
    if output:
        try:
            (Path(output) / "logs").mkdir(parents=True, exist_ok=True)
            return Path(output) / "logs" / f"{run_id}.log"
        except OSError as err:  # the stage names an unwritable output folder itself, on its run
            logging.getLogger(__name__).warning("run log in a temporary folder: %s", err)
    return Path(tempfile.mkdtemp(prefix=f"zh-align-{stage}-")) / f"{run_id}.log"


class _Once(logging.Filter):
    """One handler on the root and on ``transformers`` (which does not propagate): a record that reaches both, should
    transformers propagate after all, is written once."""
    last: logging.LogRecord | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        seen, self.last = record is self.last, record
        return not seen


TRAINER_LOGS = "pipeline.trainer_logs"  # the Trainer's log dicts: into the file only (the Trainer prints them itself)
logging.getLogger(TRAINER_LOGS).propagate = False
logging.getLogger(TRAINER_LOGS).setLevel(logging.INFO)
CAPTURED = ("", "transformers", TRAINER_LOGS)  # the root (ours, py.warnings, TRL, PEFT), transformers' own, the dicts
# INFO whatever the root's level: ours, and the Trainer's ("***** Running training *****", the steps, saves) under the
# WARNING transformers sets its own root to
AT_INFO = ("pipeline", "transformers.trainer")


def capture(log_file: Path) -> logging.Handler:
    """A handler that writes every log line (secrets scrubbed), Python warnings and the Trainer's INFO lines to
    ``log_file`` while the run is open."""
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    handler.zh_warnings = logging._warnings_showwarning is None  # type: ignore[attr-defined]  # were they off?
    handler.zh_levels = {name: logging.getLogger(name).level for name in AT_INFO}  # type: ignore[attr-defined]
    for name in AT_INFO:
        if logging.getLogger(name).level in (logging.NOTSET, *range(logging.INFO + 1, 100)):
            logging.getLogger(name).setLevel(logging.INFO)
    for name in CAPTURED:
        logging.getLogger(name).addHandler(handler)
    logging.captureWarnings(True)
    return handler


def release(handler: logging.Handler) -> None:
    for name in CAPTURED:
        logging.getLogger(name).removeHandler(handler)
    for name, level in handler.zh_levels.items():  # type: ignore[attr-defined]
        logging.getLogger(name).setLevel(level)
    if handler.zh_warnings:  # type: ignore[attr-defined]
        logging.captureWarnings(False)
    handler.close()
