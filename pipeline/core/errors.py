"""The two error types every layer raises, and the exit codes they map to (``pipeline.stage.cli.guarded``)."""

from __future__ import annotations


class StageError(RuntimeError):
    """An expected failure with a message that says what is wrong and how to fix it: printed, exit 1."""


class ConfigError(ValueError):
    """One or more problems in a config, each naming the file and the dotted path: printed, exit 2."""

    def __init__(self, problems: list[str]):
        problems = list(dict.fromkeys(problems))  # the same problem found by several stages is said once
        self.problems = problems
        super().__init__("\n".join(problems) if len(problems) == 1 else
                         f"{len(problems)} config problems:\n" + "\n".join(f"  - {p}" for p in problems))
