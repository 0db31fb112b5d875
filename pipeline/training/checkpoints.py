"""Checkpoints a training can continue from: whole ones only, and only under the settings that wrote them.

A checkpoint is whole when its trainer state, its weights (``*.safetensors``), its optimizer, scheduler and RNG
states all read back; what a kill during a save leaves (a missing or truncated file) is skipped for the newest whole
one, with a warning naming it. Each checkpoint carries ``zh_align_fingerprint.json``: the resolved config (less the keys
that may change on resume), the pool's and manifest's sha256, the start point, the number of processes, and the
run that wrote it. ``train.resume`` refuses a checkpoint written under other settings, naming each difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path, shown

log = logging.getLogger(__name__)

FINGERPRINT = "zh_align_fingerprint.json"
STATE = "trainer_state.json"
STATES = ("optimizer.pt", "scheduler.pt")  # with rng_state*.pth: what an exact continuation needs besides weights
# resolved-config keys that may differ between a run and the one continuing it: how to resume, where the output and
# the logs go, what the version is registered as, the file the config came from, the command line's own spelling
VOLATILE = ("config_file", "cli_overrides", "hub.", "config.train.resume", "config.output_dir", "config.register.",
            "config.log_backend", "config.train.logging_steps", "config.train.save_total_limit", "config.data.",
            "config.start_from", "hw.description")


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def fingerprint(resolved: dict[str, Any], *, pool_sha256: str, manifest: Path, start: str = "",
                world_size: int = 1, run_id: str | None = None) -> dict[str, Any]:
    """What makes a checkpoint continuable by this run: the settings (``settings``) and who wrote it (``run_id``)."""
    settings = {k: v for k, v in flat(resolved).items() if not k.startswith(VOLATILE) and k not in VOLATILE}
    settings.update({"data.sha256": pool_sha256, "data.manifest_sha256": _sha256(manifest), "world_size": world_size})
    if start:
        settings["start_from"] = start
    return {"settings": settings, "run_id": run_id or ""}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def write(folder: Path, fp: dict[str, Any]) -> None:
    path = folder / FINGERPRINT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(fp, ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def read(folder: Path) -> dict[str, Any] | None:
    path = folder / FINGERPRINT
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for each setting that differs."""
    a, b = old.get("settings", {}), new.get("settings", {})
    missing = "(not set)"
    return [f"{k}: {json.dumps(a.get(k, missing), ensure_ascii=False)} → {json.dumps(b.get(k, missing), ensure_ascii=False)}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


# ----------------------------------------------------------------------------------------------------------------
# Whole or not
# ----------------------------------------------------------------------------------------------------------------
def problem(folder: Path) -> str | None:
    """What makes a checkpoint unusable (None: whole). Reads headers and directories, never the tensors."""
    try:
        json.loads((folder / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {STATE}"
    except (OSError, ValueError):
        return f"{STATE} is unreadable"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    for path in weights:
        if not _whole_safetensors(path):
            return f"{path.name} is truncated"
    for name in [*STATES, *(p.name for p in folder.glob("rng_state*.pth"))]:
        path = folder / name
        if not path.exists():
            return f"no {name}"
        if not _whole_zip(path):
            return f"{name} is truncated"
    try:
        read(folder)
    except (OSError, ValueError):
        return f"{FINGERPRINT} is unreadable"
    return None


def _whole_safetensors(path: Path) -> bool:
    """The header parses and the file holds every byte it announces."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + size + end
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return False


def _whole_zip(path: Path) -> bool:
    """torch.save writes a zip: a truncated one has no central directory at its end."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def numbered(out: Path) -> list[Path]:
    """The checkpoint-N folders in ``out``, newest (highest N) first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def newest_whole(out: Path) -> Path | None:
    """The newest whole checkpoint in ``out``; each newer one that is not whole is skipped with a warning."""
    for folder in numbered(out) if out.is_dir() else []:
        why = problem(folder)
        if why is None:
            return folder
        log.warning("resume: skipping %s: %s (a save cut short, e.g. by a kill)", shown(folder), why)
    return None


def choose(out: Path, resume: str | None) -> Path | None:
    """``train.resume``: auto → the newest whole checkpoint in the output folder (None: start fresh); a path → that
    checkpoint, which must be whole; null → None."""
    if not resume:
        return None
    if resume == "auto":
        found = newest_whole(out)
        log.info("resume: %s", shown(found) if found else f"no whole checkpoint in {shown(out)}, starting fresh")
        return found
    folder = repo_path(resume)
    if not folder.is_dir():
        raise StageError(f"`train.resume` {resume!r} is not a checkpoint folder; use auto or a checkpoint-N folder "
                         f"(e.g. {shown(out / 'checkpoint-200')})")
    why = problem(folder)
    if why:
        older = [p for p in numbered(folder.parent) if p != folder and problem(p) is None]
        raise StageError(f"`train.resume` {resume!r} is not a whole checkpoint: {why}; "
                         + (f"use an older one ({shown(older[0])}) or auto" if older else "start fresh (resume null)"))
    return folder


def planned(output_dir: str, resume: str | None) -> list[tuple[str, str, str]]:
    """[(what, where, state)] of the checkpoint a run would continue from, for the dry run; a path that is not a whole
    checkpoint is a ConfigError there (exit 2, before anything runs)."""
    if not resume:
        return []
    out = repo_path(output_dir)
    try:
        found = choose(out, resume)
    except StageError as err:
        raise ConfigError([str(err)]) from err
    if found is None:
        return [("resume from", f"{shown(out)}/checkpoint-*", "no whole checkpoint yet: starts fresh")]
    fp = read(found) or {}
    return [("resume from", shown(found), "whole" + (f", written by run {fp['run_id']}" if fp.get("run_id") else "") + \
        "; refused at run time if written under other settings")]


def check(folder: Path, now: dict[str, Any]) -> dict[str, Any]:
    """Refuse a checkpoint written under other settings (StageError naming each difference); its fingerprint."""
    then = read(folder)
    if then is None:
        log.warning("resume: %s carries no %s (written by an older version): its settings cannot be checked",
                    shown(folder), FINGERPRINT)
        return {}
    diff = differences(then, now)
    if diff:
        raise StageError(f"{shown(folder)} was written under other settings than this run's:\n  "
                         + "\n  ".join(diff) + "\nresume with the settings it was written with, or start fresh: "
                         "`train.resume=null` and another `output_dir` (or delete its checkpoint-* folders)")
    return then
