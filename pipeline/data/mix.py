"""How a row type (sft or pref) is mixed each epoch: the zh token share, source weights and the curriculum, as the
prepare config gives them and the pool's manifest records them; :class:`~pipeline.data.sampler.MixedBucketSampler`
reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.strict import Key, close, share


@dataclass
class CurriculumStage:
    """One stage of the curriculum: it ends when `until` of the total training tokens have been seen."""
    until: float
    bucket_weights: list[float] | None = None  # one weight per bucket; null = all 1
    zh_share: float | None = None              # null = the row type's zh_share


@dataclass
class RowMix:
    """How one row type (sft or pref) is mixed each epoch."""
    zh_share: float = 0.7                                    # at least this share of the epoch's tokens is zh
    source_weights: dict[str, float] = field(default_factory=dict)  # round-robin weight per source (default 1)
    curriculum: list[CurriculumStage] = field(default_factory=list)  # empty = one stage, every bucket weight 1

    def check(self, key: Key) -> list[str]:
        problems = share(key, "zh_share", self.zh_share)
        last = 0.0
        for i, st in enumerate(self.curriculum):
            where = f"curriculum.{i}"
            if not last < st.until <= 1.0:
                problems.append(f"{key(where + '.until')} must rise above the previous stage's ({last}) up to 1.0; "
                                f"got {st.until}")
            last = max(last, st.until)
            if st.zh_share is not None:
                problems += share(key, f"{where}.zh_share", st.zh_share)
        if self.curriculum and self.curriculum[-1].until != 1.0:
            problems.append(f"the last stage of {key('curriculum')} must have `until: 1.0` (the curriculum covers all "
                            f"the training tokens); got {self.curriculum[-1].until}")
        return problems

    def check_against(self, key: Key, sources: list[str], n_buckets: int) -> list[str]:
        """The rules that need the prepare config around it: weights name its sources and fit its buckets."""
        problems = []
        for name, w in self.source_weights.items():
            if name not in sources:
                problems.append(f"{key('source_weights.' + name)} is not a source of this config"
                                f"{close(name, sources)} (sources: {', '.join(sources)})")
            elif w < 0:
                problems.append(f"{key('source_weights.' + name)} must be >= 0; got {w}")
        for i, st in enumerate(self.curriculum):
            bw = st.bucket_weights
            if bw is not None and (len(bw) != n_buckets or min(bw) < 0 or not any(bw)):
                problems.append(f"{key(f'curriculum.{i}.bucket_weights')} needs {n_buckets} weights (one per "
                                f"bucket), >= 0 and not all 0; got {bw}")
        return problems


@dataclass
class MixConfig:
    sft: RowMix = field(default_factory=RowMix)
    pref: RowMix = field(default_factory=RowMix)
    max_repeats: int = 1                 # > 1 lets zh rows repeat up to this many times per epoch to meet zh_share
    on_shortfall: Literal["downsample", "relax", "fail"] = "downsample"

    def check(self, key: Key) -> list[str]:
        if self.max_repeats < 1:
            return [f"{key('max_repeats')} must be at least 1 (1 = no upsampling); got {self.max_repeats}"]
        return []
