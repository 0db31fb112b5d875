"""The forgetting report: what a fine-tune gained and lost per task against its base, and when a drop is real.

A drop on a small eval set is often sampling noise. The gate therefore decides per task group with an exact McNemar
test on the per-item correctness of the same items under both models (``log_samples``): only the discordant items
count — ``b`` right before and wrong after, ``c`` wrong before and right after — and under "no change" b ~ Bin(b+c,
½). A group fails when its accuracy fell by more than ``max_drop`` *and* the two-sided p-value is below ``alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.core.strict import Key, share


@dataclass
class GateConfig:
    """When the forgetting report calls a drop real."""
    max_drop: float = 0.02               # accuracy a task group may lose ...
    alpha: float = 0.05                  # ... unless the exact McNemar test says the loss is not noise (p < alpha)

    def check(self, key: Key) -> list[str]:
        return share(key, "max_drop", self.max_drop) + share(key, "alpha", self.alpha)


@dataclass(frozen=True)
class Paired:
    group: str
    n: int                  # items answered by both models
    base_acc: float
    tuned_acc: float
    lost: int               # b: right before, wrong after
    gained: int             # c: wrong before, right after
    p_value: float

    @property
    def delta(self) -> float:
        return self.tuned_acc - self.base_acc


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(group: str, base: dict[Any, float], tuned: dict[Any, float]) -> Paired:
    """Compare per-item correctness (item key → 0/1) of the same items under base and tuned."""
    items = sorted(set(base) & set(tuned), key=str)
    lost = sum(1 for i in items if base[i] and not tuned[i])
    gained = sum(1 for i in items if tuned[i] and not base[i])
    n = len(items)
    return Paired(group, n, sum(base[i] for i in items) / n if n else 0.0,
                  sum(tuned[i] for i in items) / n if n else 0.0, lost, gained, mcnemar_exact(lost, gained))


def gate(results: list[Paired], max_drop: float, alpha: float) -> tuple[str, str, list[str]]:
    """("pass" | "fail", the rule in words, the groups that failed it)."""
    rule = f"fail if a task group's accuracy drops by more than {max_drop} with exact McNemar p < {alpha}"
    failed = [p.group for p in results if p.delta < -max_drop and p.p_value < alpha]
    return ("fail" if failed else "pass"), rule, failed
