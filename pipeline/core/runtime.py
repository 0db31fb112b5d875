"""This process's place among several (``accelerate launch`` / torchrun set RANK, LOCAL_RANK and WORLD_SIZE)."""

from __future__ import annotations

import os


def rank() -> int:
    """The global rank (0 when alone); only rank 0 logs to MLflow and prints at INFO."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def launched() -> bool:
    """Whether a launcher started this process (so a stage must not launch itself again)."""
    return "LOCAL_RANK" in os.environ
