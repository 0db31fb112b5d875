"""The repository's folders, and the one way a path from a config or the command line is resolved and shown."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ASSETS = ROOT / "pipeline" / "assets"


def repo_path(p: str | Path) -> Path:
    """A path as configs and commands give it: absolute as it is (``~`` expanded), else relative to the repository."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else ROOT / path


def shown(path: str | Path) -> str:
    """A path as plans, logs and written configs show it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)
