"""A stage's resolved config: what every layer below the stage contract is handed (``pipeline.stage.resolve``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.core.profiles import HardwareProfile, HubConfig, ModelDef


@dataclass
class Resolved:
    """Everything a stage needs to plan or run: its config, the profile, the model definition and hub settings."""
    stage: str
    config_path: str
    cfg: Any
    hw: HardwareProfile
    model: ModelDef
    hub: HubConfig
    overrides: list[tuple[str, Any]]
    variant: str | None = None          # the variant asked for on the command line (align: --loss orpo|dpo)

    def as_dict(self) -> dict[str, Any]:
        """The resolved config, as logged (YAML artifact + flattened params) and shown in the plan."""
        return {
            "stage": self.stage, "config_file": self.config_path,
            "config": dataclasses.asdict(self.cfg),
            "hw": _public(self.hw), "model": _public(self.model), "hub": dataclasses.asdict(self.hub),
            "cli_overrides": [f"{k}={v}" for k, v in self.overrides],
        }


def _public(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(obj).items() if k != "source_file"}
