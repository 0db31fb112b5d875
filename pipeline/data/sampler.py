"""The MixedBucketSampler: which rows of the prepared pool each epoch trains on, and in what order.

Tokens, not rows, are what the model learns from: one 2 000-token English answer outweighs ten short Chinese ones. So the
Chinese share that guards against catastrophic forgetting (``mix.<kind>.zh_share``) is measured in tokens. When the pool
holds too little Chinese, zh rows may repeat (``mix.max_repeats``); if that is not enough, ``mix.on_shortfall`` drops
non-zh rows, keeps them (said loudly), or stops.

Rows live in cells (zh or not, source, bucket). Each epoch permutes every cell with ``default_rng([seed, epoch])``, cells
taken in a fixed order (zh first, then source name, then bucket), so reruns are identical and epochs differ. A weighted
round robin (the next row comes from the cell with the fewest tokens taken per unit of weight) picks the repeated and the
kept rows and interleaves the order, so every prefix of the training holds the sources and buckets in proportion to their
weights instead of one after another. The curriculum is set in fractions of the total training tokens, not in steps or
epochs, so one config means the same for 1 or 3 epochs, any batch size and any packing; a bucket weight of 0 postpones a
bucket until its language has nothing else left.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from pipeline.core.errors import StageError
from pipeline.data.mix import MixConfig, RowMix

log = logging.getLogger(__name__)


class ShortfallError(ValueError):
    """The pool cannot give the configured zh share of tokens and `mix.on_shortfall` says to stop."""


@dataclass(frozen=True)
class _Cell:
    zh: bool
    source: str
    bucket: int
    rows: np.ndarray  # pool indices, in pool order


@dataclass(frozen=True)
class _Stage:
    until: float
    zh_share: float
    weights: tuple[list[float], list[float]]  # round-robin weight per cell: (zh cells, non-zh cells)


@dataclass(frozen=True)
class _Plan:
    """What every epoch does about the zh share; decided once, from the pool."""
    action: str          # none | repeat | downsample | relax
    zh_tokens: int
    non_zh_tokens: int
    need: float          # zh tokens that give the target share with every non-zh row kept (inf when the share is 1)


class _Cycle:
    """`seq` repeated `times` times, without copying it."""

    def __init__(self, seq: Sequence[int], times: int):
        self.seq, self.n = seq, len(seq) * times

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.seq[i % len(self.seq)]


class _RoundRobin:
    """Weighted round robin over cells: the next row comes from the cell with the fewest tokens taken per unit of
    weight (ties: the lower cell index). Cells of weight 0 are postponed: drawn, with weight 1, once no other is left.
    `pos` (rows already taken per cell) is shared with the caller and advanced in place."""

    def __init__(self, queues: Sequence[Sequence[int]], weights: Sequence[float], tokens: Sequence[int],
                 pos: list[int] | None = None):
        self.queues, self.tokens = queues, tokens
        self.pos = [0] * len(queues) if pos is None else pos
        self.weights = [w if w > 0 else 1.0 for w in weights]
        self.taken = [0] * len(queues)
        live = [c for c, q in enumerate(queues) if self.pos[c] < len(q)]
        # sorted lists of equal keys are valid heaps
        self.heaps = ([(0.0, c) for c in live if weights[c] > 0], [(0.0, c) for c in live if weights[c] <= 0])

    def __bool__(self) -> bool:
        return bool(self.heaps[0] or self.heaps[1])

    def peek(self) -> int:
        c = (self.heaps[0] or self.heaps[1])[0][1]
        return self.queues[c][self.pos[c]]

    def pop(self) -> tuple[int, int]:
        """(cell, row) of the next row."""
        heap = self.heaps[0] or self.heaps[1]
        c = heap[0][1]
        row = self.queues[c][self.pos[c]]
        self.pos[c] += 1
        self.taken[c] += self.tokens[row]
        if self.pos[c] < len(self.queues[c]):
            heapq.heapreplace(heap, (self.taken[c] / self.weights[c], c))
        else:
            heapq.heappop(heap)
        return c, row


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class MixedBucketSampler:
    """Chooses and orders the rows of each epoch so that at least `mix.zh_share` of the tokens are zh."""

    def __init__(self, langs: Sequence[str], sources: Sequence[str], buckets: Sequence[int], n_tokens: Sequence[int],
                 mix: RowMix, *, kind: str, n_buckets: int, max_repeats: int = 1, on_shortfall: str = "downsample",
                 seed: int = 42):
        if not len(langs) == len(sources) == len(buckets) == len(n_tokens):
            raise ValueError(f"langs, sources, buckets and n_tokens differ in length: "
                             f"{len(langs)}, {len(sources)}, {len(buckets)}, {len(n_tokens)}")
        self.mix, self.kind, self.n_buckets, self.seed = mix, kind, n_buckets, seed
        self.max_repeats, self.on_shortfall = max(1, max_repeats), on_shortfall
        self._zh = [lang == "zh" for lang in langs]
        self._sources = [str(s) for s in sources]
        self._buckets = [int(b) for b in buckets]
        self._tokens = [int(t) for t in n_tokens]
        if any(not 0 <= b < n_buckets for b in self._buckets):
            raise ValueError(f"bucket indices must lie in 0..{n_buckets - 1}, "
                             f"got {min(self._buckets)}..{max(self._buckets)}")
        self._cells = self._group()
        self._lang_cells = ([c for c, cell in enumerate(self._cells) if cell.zh],
                            [c for c, cell in enumerate(self._cells) if not cell.zh])
        self._stages = self._curriculum()
        self._plan = self._decide()

    # ---------------------------------------------------------------------------------------------------------- setup
    def _source_weight(self, source: str) -> float:
        return self.mix.source_weights.get(source, 1.0)

    def _group(self) -> list[_Cell]:
        """The cells, in the fixed order (zh first, source name, bucket); sources of weight 0 are left out."""
        names, code = np.unique(np.array(self._sources, dtype=str), return_inverse=True)
        non_zh = 1 - np.array(self._zh, dtype=np.int64)
        key = (non_zh * len(names) + code.reshape(-1)) * self.n_buckets + np.array(self._buckets, dtype=np.int64)
        rows = np.argsort(key, kind="stable")
        keys, starts = np.unique(key[rows], return_index=True)
        cells = []
        for k, group in zip(keys.tolist(), np.split(rows, starts[1:]) if len(rows) else [], strict=True):
            other, src = divmod(k // self.n_buckets, len(names))
            cells.append(_Cell(not other, str(names[src]), k % self.n_buckets, group))
        return [cell for cell in cells if self._source_weight(cell.source) > 0]

    def _curriculum(self) -> list[_Stage]:
        stages = []
        for st in self.mix.curriculum or [None]:
            bucket_w = (st and st.bucket_weights) or [1.0] * self.n_buckets
            w = [self._source_weight(cell.source) * bucket_w[cell.bucket] for cell in self._cells]
            share = self.mix.zh_share if st is None or st.zh_share is None else st.zh_share
            by_lang = ([w[c] for c in self._lang_cells[0]], [w[c] for c in self._lang_cells[1]])
            stages.append(_Stage(1.0 if st is None else st.until, share, by_lang))
        return stages

    def _cell_tokens(self, zh: bool) -> int:
        return sum(self._tokens[r] for cell in self._cells if cell.zh == zh for r in cell.rows.tolist())

    def _decide(self) -> _Plan:
        """none | repeat | downsample | relax, said once here; raises ShortfallError where the pool cannot serve."""
        s, z, e = Fraction(self.mix.zh_share), self._cell_tokens(True), self._cell_tokens(False)
        need = math.ceil(s * e / (1 - s)) if s < 1 else math.inf
        if s == 0 or e == 0 or z >= need:
            return _Plan("none", z, e, need)
        if self.max_repeats * z >= need:
            action = "repeat"
        elif self.on_shortfall == "fail" or (z == 0 and self.on_shortfall != "relax"):
            raise ShortfallError(self._error_message(z, e))
        else:
            action = self.on_shortfall
        plan = _Plan(action, z, e, need)
        log.warning(self._warning(plan))
        return plan

    def _achievable(self, z: int, e: int) -> float:
        return _share(self.max_repeats * z, self.max_repeats * z + e)

    def _error_message(self, z: int, e: int) -> str:
        key, s = f"mix.{self.kind}.zh_share", self.mix.zh_share
        head = (f"{key} = {s} cannot be met: the {self.kind} pool has {z} zh and {e} non-zh tokens, a zh share of "
                f"{_share(z, z + e):.3f}, at most {self._achievable(z, e):.3f} with mix.max_repeats = {self.max_repeats}.")
        if z == 0:
            return (f"{head} There are no zh rows, so downsampling would leave nothing. Remedies: add zh data, set "
                    f"{key}: 0, or mix.on_shortfall: relax to train on the non-zh rows anyway.")
        return (f"{head} Remedies: mix.on_shortfall: downsample | relax (drop non-zh rows / accept the lower share), "
                f"a larger mix.max_repeats, more zh data, or a lower {key}.")

    def _warning(self, plan: _Plan) -> str:
        s, z, e = self.mix.zh_share, plan.zh_tokens, plan.non_zh_tokens
        head = (f"zh shortfall in the {self.kind} pool: mix.{self.kind}.zh_share = {s}, but only {z} of {z + e} tokens "
                f"are zh (share {_share(z, z + e):.3f}; at most {self._achievable(z, e):.3f} with mix.max_repeats = "
                f"{self.max_repeats}).")
        if plan.action == "repeat":
            return f"{head} Repeating zh rows (at most {self.max_repeats}x each) to about {plan.need} zh tokens per epoch."
        repeated = f"with every zh row {self.max_repeats}x, " if self.max_repeats > 1 else ""
        if plan.action == "relax":
            return (f"{head} mix.on_shortfall = relax: {repeated}keeping all {e} non-zh tokens; the realised zh share "
                    f"is {self._achievable(z, e):.3f}, below the target {s}.")
        budget = math.floor(Fraction(self.max_repeats * z) * (1 - Fraction(s)) / Fraction(s))
        return (f"{head} mix.on_shortfall = downsample: {repeated}keeping at most {budget} of {e} non-zh tokens per "
                f"epoch (dropping at least {e - budget}) so the zh share is >= {s}.")

    # ------------------------------------------------------------------------------------------------------ selection
    def _select(self, epoch: int) -> list[list[int]]:
        """Each cell's rows for the epoch, in the order the cell gives them out: its kept rows, then extra copies."""
        rng = np.random.default_rng([self.seed, epoch])
        queues = [rng.permutation(cell.rows).tolist() for cell in self._cells]
        if self._plan.action == "none":
            return queues
        extra = self._repeats(queues)
        if self._plan.action == "downsample":
            zh_tokens = self._plan.zh_tokens + sum(self._tokens[r] for q in extra for r in q)
            self._downsample(queues, zh_tokens)
        return [q + x for q, x in zip(queues, extra, strict=True)]

    def _selection_rr(self, queues: Sequence[Sequence[int]], zh: bool) -> _RoundRobin:
        """A round robin over the cells of one language, weighted by source."""
        return _RoundRobin([q if cell.zh == zh else () for cell, q in zip(self._cells, queues, strict=True)],
                           [self._source_weight(cell.source) for cell in self._cells], self._tokens)

    def _repeats(self, queues: list[list[int]]) -> list[list[int]]:
        """Extra copies of zh rows, by round robin over further passes of each zh cell, until the zh tokens reach
        the need or every zh row is there `max_repeats` times."""
        extra: list[list[int]] = [[] for _ in queues]
        rr = self._selection_rr([_Cycle(q, self.max_repeats - 1) for q in queues], zh=True)
        zh_tokens = self._plan.zh_tokens
        while rr and zh_tokens < self._plan.need:
            c, row = rr.pop()
            extra[c].append(row)
            zh_tokens += self._tokens[row]
        return extra

    def _downsample(self, queues: list[list[int]], zh_tokens: int) -> None:
        """Cut the non-zh cells to the round-robin prefix whose tokens stay within zh_tokens * (1 - s) / s."""
        s = Fraction(self.mix.zh_share)
        budget = math.floor(Fraction(zh_tokens) * (1 - s) / s)
        rr, kept = self._selection_rr(queues, zh=False), 0
        while rr and kept + self._tokens[rr.peek()] <= budget:
            kept += self._tokens[rr.pop()[1]]
        for c in self._lang_cells[1]:
            queues[c] = queues[c][:rr.pos[c]]

    # ------------------------------------------------------------------------------------------------------- ordering
    def _stage_at(self, p: float, i: int) -> int:
        """The stage at position p, searching forward from stage i (positions only grow within an epoch)."""
        while i < len(self._stages) - 1 and p >= self._stages[i].until:
            i += 1
        return i

    def _arrange(self, queues: list[list[int]], start: float, total: float) -> list[int]:
        """Walk forward: the stage at the current position sets the cell weights and the zh share to keep (a zh row
        whenever the stage's zh share of tokens so far is below it; a share of 1 takes zh rows while any remain)."""
        langs = [[queues[c] for c in cells] for cells in self._lang_cells]
        pos = [[0] * len(q) for q in langs]
        out: list[int] = []
        emitted, current, rrs = 0, -1, ()
        stage_zh = stage_tokens = 0
        for _ in range(sum(map(len, queues))):
            si = self._stage_at((start + emitted) / total if total > 0 else 1.0, max(current, 0))
            if si != current:
                current, stage_zh, stage_tokens, stage = si, 0, 0, self._stages[si]
                rrs = tuple(_RoundRobin(q, w, self._tokens, p) for q, w, p in zip(langs, stage.weights, pos, strict=True))
            zh_rr, other_rr = rrs
            below = stage.zh_share >= 1 or (stage_zh < stage.zh_share * stage_tokens if stage_tokens
                                            else stage.zh_share > 0)
            take_zh = bool(zh_rr) and (below or not other_rr)
            row = (zh_rr if take_zh else other_rr).pop()[1]
            out.append(row)
            emitted += self._tokens[row]
            stage_tokens += self._tokens[row]
            stage_zh += self._tokens[row] if take_zh else 0
        return out

    # --------------------------------------------------------------------------------------------------------- public
    def epoch(self, epoch: int, *, start: float = 0.0, total_tokens: int | None = None) -> list[int]:
        """The selected rows of one epoch, ordered. `start`: tokens trained before this epoch; `total_tokens`: tokens of
        the whole training, which place the curriculum stages (default: this epoch alone)."""
        queues = self._select(epoch)
        total = self._sum(r for q in queues for r in q) if total_tokens is None else total_tokens
        return self._arrange(queues, start, total)

    def order(self, epochs: float) -> list[int]:
        """The whole training's rows: epochs 0, 1, ... in turn; a fractional last epoch is cut, by tokens."""
        return [r for part in self._epochs(epochs) for r in part]

    def _sum(self, rows: Any) -> int:
        return sum(self._tokens[r] for r in rows)

    def _total(self, epochs: float) -> int:
        return math.floor(epochs * self._sum(r for q in self._select(0) for r in q))

    def _epochs(self, epochs: float) -> list[list[int]]:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        total, seen, parts = self._total(epochs), 0, []
        for e in range(math.ceil(epochs)):
            rows = self.epoch(e, start=seen, total_tokens=total)
            if e + 1 > epochs:
                rows = rows[:int(np.searchsorted(np.cumsum([self._tokens[r] for r in rows]), total - seen, "right"))]
            seen += self._sum(rows)
            parts.append(rows)
        return parts

    # --------------------------------------------------------------------------------------------------------- report
    def report(self, epochs: float = 1.0) -> dict:
        """Realised shares of a training of `epochs` epochs (JSON-serialisable); shortfall numbers are per epoch."""
        parts = self._epochs(epochs)
        rows = [r for part in parts for r in part]
        tokens, zh_tokens = self._sum(rows), self._sum(r for r in rows if self._zh[r])
        copies = [n for part in parts for n in Counter(part).values() if n > 1]
        return {"kind": self.kind, "epochs": float(epochs), "rows": len(rows), "tokens": tokens, "zh_tokens": zh_tokens,
                "zh_share": _share(zh_tokens, tokens), "target_zh_share": float(self.mix.zh_share),
                "shortfall": self._shortfall_report(), "sources": self._by_source(rows),
                "buckets": self._by_bucket(rows), "stages": self._by_stage(rows, self._total(epochs)),
                "repeats": {"rows": len(copies), "extra_copies": sum(copies) - len(copies)},
                "left_out_sources": sorted({s for s in self._sources if self._source_weight(s) <= 0})}

    def _shortfall_report(self) -> dict | None:
        plan = self._plan
        if plan.action == "none":
            return None
        queues = self._select(0)
        extras = [n - 1 for n in Counter(r for c in self._lang_cells[0] for r in queues[c]).values() if n > 1]
        kept = self._sum(r for c in self._lang_cells[1] for r in queues[c])
        z, e = plan.zh_tokens, plan.non_zh_tokens
        return {"target": float(self.mix.zh_share), "pool_share": _share(z, z + e), "achievable": self._achievable(z, e),
                "action": plan.action, "zh_tokens": z, "non_zh_tokens": e, "max_repeats": self.max_repeats,
                "non_zh_tokens_dropped": e - kept, "zh_rows_repeated": len(extras),
                "zh_extra_copies": sum(extras)}

    def _by_source(self, rows: list[int]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            d = out.setdefault(self._sources[r], {"rows": 0, "tokens": 0, "zh_tokens": 0})
            d["rows"] += 1
            d["tokens"] += self._tokens[r]
            d["zh_tokens"] += self._tokens[r] if self._zh[r] else 0
        return {s: {"rows": d["rows"], "tokens": d["tokens"], "zh_share": _share(d["zh_tokens"], d["tokens"])}
                for s, d in sorted(out.items())}

    def _by_bucket(self, rows: list[int]) -> list[dict[str, int]]:
        out = [{"rows": 0, "tokens": 0} for _ in range(self.n_buckets)]
        for r in rows:
            out[self._buckets[r]]["rows"] += 1
            out[self._buckets[r]]["tokens"] += self._tokens[r]
        return out

    def _by_stage(self, rows: list[int], total: int) -> list[dict[str, float]]:
        """Tokens by the stage each row was emitted in (its position: tokens before it / the training's total)."""
        tokens, zh = [0] * len(self._stages), [0] * len(self._stages)
        seen, si = 0, 0
        for r in rows:
            si = self._stage_at(seen / total if total > 0 else 1.0, si)
            tokens[si] += self._tokens[r]
            zh[si] += self._tokens[r] if self._zh[r] else 0
            seen += self._tokens[r]
        return [{"until": st.until, "target_zh_share": st.zh_share, "tokens": t, "zh_share": _share(z, t)}
                for st, t, z in zip(self._stages, tokens, zh, strict=True)]


def for_pool(columns: Mapping[str, Sequence], mix: MixConfig, kind: str, n_buckets: int, seed: int) -> MixedBucketSampler:
    """The sampler of one row type over a pool's columns (``lang``, ``source``, ``bucket``, ``n_tokens``): what
    prepare reports as epoch 0 and the training stages order by. A shortfall the mix says to stop at is a StageError."""
    try:
        return MixedBucketSampler(columns["lang"], columns["source"], columns["bucket"], columns["n_tokens"],
                                  getattr(mix, kind), kind=kind, n_buckets=n_buckets, max_repeats=mix.max_repeats,
                                  on_shortfall=mix.on_shortfall, seed=seed)
    except ShortfallError as err:
        raise StageError(str(err)) from err
