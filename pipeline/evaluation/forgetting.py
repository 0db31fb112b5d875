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


@dataclass
class Verdict:
    """One adapter judged against the base: the paired test per task group and the gate."""
    label: str              # "adapter" (the model under test) or "earlier" (an earlier adapter of the same line)
    source: str             # models:/NAME/VERSION, a folder
    pairs: list[Paired]
    gate: str               # pass | fail
    rule: str
    failed: list[str]

    def tags(self) -> dict[str, str]:
        """The eval.* tags a run and a registered version carry for this verdict."""
        return {"eval.gate": self.gate, "eval.gate_rule": self.rule, "eval.gate_failed": ",".join(self.failed) or "none",
                "eval.max_drop": f"{max((-p.delta for p in self.pairs), default=0.0) + 0.0:.4f}"}


def judge(label: str, source: str, pairs: list[Paired], cfg: GateConfig) -> Verdict:
    return Verdict(label, source, pairs, *gate(pairs, cfg.max_drop, cfg.alpha))


def report(chain: list[Verdict]) -> dict[str, Any]:
    """forgetting.json: the last model of the chain (the one under test) at the top level as before, every model's
    gate under ``gates`` and each task group as base → each model under ``chain``."""
    last = chain[-1]
    groups = [p.group for p in last.pairs]
    by_group = [{p.group: p for p in v.pairs} for v in chain]
    steps = [{"group": g, "n": by_group[-1][g].n, "base": by_group[-1][g].base_acc,
              "models": [{"model": v.label, "source": v.source, "acc": ps[g].tuned_acc, "delta": ps[g].delta,
                          "p_value": ps[g].p_value, "lost": ps[g].lost, "gained": ps[g].gained}
                         for v, ps in zip(chain, by_group, strict=True) if g in ps]} for g in groups]
    return {"gate": last.gate, "rule": last.rule, "failed": last.failed,
            "groups": [p.__dict__ | {"delta": p.delta} for p in last.pairs],
            "gates": [{"model": v.label, "source": v.source, "gate": v.gate, "failed": v.failed} for v in chain],
            "chain": steps}


def rows(chain: list[Verdict]) -> list[dict[str, Any]]:
    """forgetting.csv: one row per task group and model (the base first), accuracy and the delta against the base."""
    out, gates = [], {v.label: v for v in chain}
    for step in report(chain)["chain"]:
        out.append({"group": step["group"], "model": "base", "source": "base", "n": step["n"], "acc": step["base"],
                    "delta": 0.0, "p_value": "", "gate": ""})
        out += [{"group": step["group"], "model": m["model"], "source": m["source"], "n": step["n"], "acc": m["acc"],
                 "delta": m["delta"], "p_value": m["p_value"],
                 "gate": "fail" if step["group"] in gates[m["model"]].failed else "pass"} for m in step["models"]]
    return out


def lines(chain: list[Verdict]) -> list[str]:
    """The chain for people: per task group base → each model (Δ vs base, p), then each model's gate."""
    text = [f"{s['group']} (n={s['n']}): base {s['base']:.3f} → " + " → ".join(
        f"{m['model']} {m['acc']:.3f} ({m['delta']:+.3f}, p={m['p_value']:.2g})" for m in s["models"])
        for s in report(chain)["chain"]]
    return text + [f"gate {v.label} {v.source}: {v.gate}" + (f" ({', '.join(v.failed)})" if v.failed else "")
                   for v in chain]
