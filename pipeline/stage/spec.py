"""What a stage declares about itself, and finding the stages.

A stage is a module ``pipeline/<name>.py`` with ``STAGE = Stage(...)`` at its end: its config class, ``plan`` and
``run``, and what the commands over the stages need — how the pipeline links it to earlier stages, which metrics the
pipeline's parent run copies, what ``make rerun`` compares and pins. The chain order follows from the declarations:
each stage comes after the stages it links to or names in ``after`` (ties by name).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.paths import ROOT
from pipeline.core.resolved import Resolved
from pipeline.core.strict import close


@dataclass(frozen=True)
class Stage:
    name: str                                # Make target, MLproject entry point, module, config and test file name
    config: type                             # its config dataclass (configs/<name>.yaml)
    plan: Callable[[Resolved], Any]          # the dry run's Plan
    run: Callable[[Resolved], Any]           # the work; returns a small result dataclass
    summary: str                             # one line for --help
    links: Mapping[str, str] = field(default_factory=dict)   # config key → the earlier stage whose run id it takes
    after: tuple[str, ...] = ()              # earlier stages it must follow without taking their output
    key_metrics: tuple[str, ...] = ()        # prefixes of the metrics the pipeline's parent run copies
    checks: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # rerun: name → fingerprint of a run
    pinned: Mapping[str, str] = field(default_factory=dict)  # rerun: config key → the run tag with the exact version
    rerun_sets: Mapping[str, tuple[Any, str]] = field(default_factory=dict)  # rerun: key → (value, why)
    pool: str | None = None                  # the prepared pool it trains on (rerun checks its sha256)
    accel: bool = False                      # may run as several processes under `accelerate launch` (--accel)
    variants: tuple[str, ...] = ()           # configs/<name>/<variant>.yaml, picked by --<variant_flag> (first: default)
    variant_flag: str = ""                   # the flag naming the variant, also a config key that must agree

    @property
    def needs(self) -> set[str]:
        """The stages this one runs after in the chain."""
        return set(self.links.values()) | set(self.after)

    def parameters(self, *, hw: str, overrides: str, variant: str = "", accel: str = "",
                   config: str | None = None) -> dict[str, str]:
        """The `mlflow run` parameters of a real run: exactly what its MLproject entry point declares."""
        params = {"hw": hw, "dry_run": "false", "overrides": overrides}
        if config is not None:
            params["config"] = config
        if self.variant_flag:
            params[self.variant_flag] = variant
        if self.accel:
            params["accel"] = accel
        return params


@functools.cache
def stages() -> tuple[Stage, ...]:
    """Every stage, in chain order."""
    found: dict[str, Stage] = {}
    for info in pkgutil.iter_modules([str(ROOT / "pipeline")]):
        if not info.ispkg:
            stage = getattr(importlib.import_module(f"pipeline.{info.name}"), "STAGE", None)
            if isinstance(stage, Stage):
                found[stage.name] = stage
    ordered: list[Stage] = []
    while len(ordered) < len(found):
        done = {s.name for s in ordered}
        ready = sorted(n for n, s in found.items() if n not in done and s.needs <= done)
        if not ready:
            raise RuntimeError(f"stages {sorted(set(found) - done)} need stages that do not exist or need each other: "
                               + ", ".join(f"{n} needs {sorted(found[n].needs)}" for n in sorted(set(found) - done)))
        ordered.append(found[ready[0]])
    return tuple(ordered)


def names() -> tuple[str, ...]:
    return tuple(s.name for s in stages())


def get(name: str | Stage) -> Stage:
    if isinstance(name, Stage):
        return name
    for stage in stages():
        if stage.name == name:
            return stage
    raise ConfigError([f"unknown stage {name!r}; stages: {', '.join(names())}" + close(str(name), names())])


def variant_flags() -> dict[str, Stage]:
    """Each variant flag (``loss``) → the stage that takes it."""
    return {s.variant_flag: s for s in stages() if s.variant_flag}
