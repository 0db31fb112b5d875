"""Speeds ``make bench`` measured, which the planner prefers to its scaled estimate: ``configs/measured.yaml``.

``make bench`` on a CUDA card records its ``profile`` result there, and ``make bench-log OUT=DIR`` (``python -m
pipeline.bench --log-results DIR``) those of every ``summary.json`` under DIR, e.g. bench-gpu's brought back from a GPU
box (commit the file: every user's plan then uses it). Full-length runs only (no ``--data``). An entry matches a plan
when the stage, model and the settings that set the speed (precision, QLoRA, Liger, micro-batch, length, recomputed
layers) are the same. Measured on the profile's own card, its tokens/s is the plan's; measured on another card (a 4090
profile under a 24 GiB cap on an H200), its MFU is scaled to the profile's peak TFLOP/s — still an estimate, but of
this profile's own kernels rather than the anchors'.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS, shown
from pipeline.core.profiles import load_model
from pipeline.hardware import gpus

PATH = CONFIGS / "measured.yaml"
HEADER = ("# Written by `make bench` on a CUDA card and `make bench-log OUT=DIR` (each run's profile variant); read by\n"
          "# the planner (pipeline/hardware/measured.py). Commit it: plans then use measured speeds.\n")


@dataclass(frozen=True)
class Measured:
    stage: str                      # sft | dpo | orpo
    hw: str
    model: str
    device: str                     # as torch names it: NVIDIA H200
    precision: str
    qlora: bool
    liger: bool
    micro_batch: int
    max_length: int
    checkpoint_layers: int          # decoder layers that recomputed (0: no checkpointing)
    tokens_per_s: float
    mfu: float | None
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    mem_cap_gib: float | None
    date: str

    def settings(self) -> tuple:
        """What sets the speed: a plan with these takes this measurement."""
        return (self.stage, self.model, self.precision, self.qlora, self.liger, self.micro_batch, self.max_length,
                self.checkpoint_layers)

    def key(self) -> tuple:
        """One entry per profile, card and settings: a newer result replaces it."""
        return (self.hw, self.device, *self.settings())

    def same_card(self, description: str) -> bool:
        """Whether it ran on the card a profile is for (its ``description``, e.g. NVIDIA RTX 4090)."""
        mine = gpus.find(description)
        return mine is not None and gpus.find(self.device) == mine


def load(path: Path | None = None) -> list[Measured]:
    path = path or PATH
    if not path.is_file():
        return []
    try:
        rows = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("measurements") or []
        return [Measured(**{k: v for k, v in row.items() if k in _names()}) for row in rows]
    except (yaml.YAMLError, AttributeError, TypeError) as err:
        raise ConfigError([f"{shown(path)} is not a list of `measurements` as make bench writes them ({err}); "
                           f"restore it with `git checkout {shown(path)}`, or delete it to plan with estimates"]) from err


def _names() -> set[str]:
    return {f.name for f in fields(Measured)}


def find(stage: str, hw: Any, model: str, checkpoint_layers: int) -> Measured | None:
    """The newest measurement of these settings, one on the profile's own card first."""
    wanted = (stage, model, hw.precision, hw.qlora, hw.liger, hw.micro_batch, hw.max_length, checkpoint_layers)
    found = [m for m in load() if m.settings() == wanted]
    return max(found, key=lambda m: (m.same_card(hw.description), m.date), default=None)


def record(summaries: list[Path]) -> list[Measured]:
    """The ``profile`` results of these ``summary.json`` files that ran on CUDA on full-length rows (no ``--data``),
    merged into configs/measured.yaml (a new result replaces the one with the same key); returns those recorded."""
    new = []
    for file in summaries:
        summary = json.loads(file.read_text(encoding="utf-8"))
        if summary.get("data"):  # rows of a pool's lengths: not the full-length step the planner times
            continue
        for r in summary["results"]:
            if r["variant"] != "profile" or r["status"] != "ok" or r["device"] == "cpu":
                continue
            copied = {k: r.get(k) for k in _names() - {"checkpoint_layers", "mem_cap_gib"}}
            new.append(Measured(**copied, checkpoint_layers=_recomputed(r), mem_cap_gib=summary.get("mem_cap_gib")))
    if new:
        kept = {m.key(): m for m in load()} | {m.key(): m for m in new}
        rows = [asdict(m) for m in sorted(kept.values(), key=lambda m: m.key())]
        PATH.write_text(HEADER + yaml.safe_dump({"measurements": rows}, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
    return new


def _recomputed(result: dict[str, Any]) -> int:
    """The decoder layers a bench result recomputed (its ``checkpoint_layers`` None with checkpointing on: all)."""
    if not result["checkpointing"]:
        return 0
    if result["checkpoint_layers"] is not None:
        return result["checkpoint_layers"]
    return load_model(result["model"]).architecture_config()["num_hidden_layers"]


def describe(m: Measured) -> str:
    return f"make bench on {m.device}, {m.date}"
