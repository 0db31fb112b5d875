"""This process's place among several (``accelerate launch`` / torchrun set RANK, LOCAL_RANK and WORLD_SIZE)."""

from __future__ import annotations

import os


def rank() -> int:
    """The global rank (0 when alone); only rank 0 logs to MLflow and prints at INFO."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def local_rank() -> int:
    """This process's GPU on its machine (0 when alone)."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def launched() -> bool:
    """Whether a launcher started this process (so a stage must not launch itself again)."""
    return "LOCAL_RANK" in os.environ


def sharded() -> bool:
    """Whether ``accelerate launch`` split the weights across the processes (FSDP, DeepSpeed ZeRO-3): then no rank
    holds the whole model, and a forward pass on one rank alone waits forever for the others."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
