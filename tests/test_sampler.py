"""The MixedBucketSampler: the zh share of tokens holds, shortfalls are handled as configured, orders are reproducible."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from pipeline.data.mix import CurriculumStage, RowMix
from pipeline.data.sampler import MixedBucketSampler, ShortfallError

Row = tuple[str, str, int, int]  # lang, source, bucket, n_tokens


def make_pool(groups: list[tuple[str, str, int, int]], seed: int = 0) -> list[Row]:
    """(lang, source, bucket, n_rows) groups → rows with random token counts (10..200)."""
    rng = np.random.default_rng(seed)
    return [(lang, src, b, int(rng.integers(10, 200))) for lang, src, b, n in groups for _ in range(n)]


def sampler(pool: list[Row], mix: RowMix, *, kind: str = "sft", n_buckets: int = 2, **kw) -> MixedBucketSampler:
    langs, sources, buckets, tokens = (list(col) for col in zip(*pool, strict=True))
    return MixedBucketSampler(langs, sources, buckets, tokens, mix, kind=kind, n_buckets=n_buckets, **kw)


def tokens_of(pool: list[Row], rows: list[int]) -> int:
    return sum(pool[r][3] for r in rows)


def zh_share(pool: list[Row], rows: list[int]) -> float:
    return tokens_of(pool, [r for r in rows if pool[r][0] == "zh"]) / tokens_of(pool, rows)


# a pool whose zh share (~0.25) is well under the default target of 0.7
SHORT = make_pool([("zh", "coig", 0, 20), ("zh", "coig", 1, 10), ("en", "oasst1", 0, 30), ("en", "oasst1", 1, 20),
                   ("other", "shp", 0, 25), ("en", "shp", 1, 15)])
# a pool with enough zh (~0.7) and two sources per language
RICH = make_pool([("zh", "coig", 0, 120), ("zh", "coig", 1, 60), ("zh", "oasst1", 0, 100), ("zh", "oasst1", 1, 80),
                  ("en", "oasst1", 0, 60), ("en", "shp", 1, 50)], seed=1)


def reference_downsample(pool: list[Row], s: float, weights: dict[str, float], seed: int, epoch: int) -> set[int]:
    """Non-zh rows kept, computed the slow way: cells in the documented order, each permuted in turn; then a plain
    weighted round robin (min tokens taken / weight, ties by cell order) until the next row would pass the budget."""
    cells: dict[tuple[bool, str, int], list[int]] = {}
    for i, (lang, src, b, _) in enumerate(pool):
        cells.setdefault((lang != "zh", src, b), []).append(i)
    keys = sorted(cells)
    rng = np.random.default_rng([seed, epoch])
    perms = {k: rng.permutation(cells[k]).tolist() for k in keys}
    zh_tokens = sum(t for lang, *_, t in pool if lang == "zh")
    budget = math.floor(Fraction(zh_tokens) * (1 - Fraction(s)) / Fraction(s))
    taken, pos, kept, total = Counter(), Counter(), set(), 0
    en_keys = [k for k in keys if k[0]]
    while live := [k for k in en_keys if pos[k] < len(perms[k])]:
        k = min(live, key=lambda k: (taken[k] / weights.get(k[1], 1.0), keys.index(k)))
        row = perms[k][pos[k]]
        if total + pool[row][3] > budget:
            break
        kept.add(row)
        total += pool[row][3]
        taken[k] += pool[row][3]
        pos[k] += 1
    return kept


def test_downsample_meets_the_share_by_tokens_and_keeps_the_round_robin_rows():
    weights = {"oasst1": 2.0, "shp": 1.0}
    s = sampler(SHORT, RowMix(zh_share=0.7, source_weights=weights), seed=7)
    for epoch in (0, 1):
        rows = s.epoch(epoch)
        assert Counter(rows).most_common(1)[0][1] == 1
        assert {r for r in rows if SHORT[r][0] == "zh"} == {i for i, row in enumerate(SHORT) if row[0] == "zh"}
        assert {r for r in rows if SHORT[r][0] != "zh"} == reference_downsample(SHORT, 0.7, weights, 7, epoch)
        assert 0.7 <= zh_share(SHORT, rows) < 0.75
    assert s.epoch(0) != s.epoch(1)


def test_relax_keeps_every_row_and_reports_the_share_below_target(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sampler"):
        s = sampler(SHORT, RowMix(zh_share=0.7), on_shortfall="relax")
    assert sorted(s.order(1.0)) == list(range(len(SHORT)))
    report = s.report()
    pool_share = zh_share(SHORT, list(range(len(SHORT))))
    assert report["zh_share"] == pytest.approx(pool_share) and report["zh_share"] < 0.7
    assert report["shortfall"]["action"] == "relax" and report["shortfall"]["non_zh_tokens_dropped"] == 0
    assert "mix.sft.zh_share = 0.7" in caplog.text and "relax" in caplog.text


def test_fail_raises_naming_the_key_the_shares_and_the_remedies():
    with pytest.raises(ShortfallError, match=r"mix\.pref\.zh_share = 0\.7") as err:
        sampler(SHORT, RowMix(zh_share=0.7), kind="pref", on_shortfall="fail")
    pool_share = zh_share(SHORT, list(range(len(SHORT))))
    for text in (f"{pool_share:.3f}", "mix.on_shortfall: downsample | relax", "mix.max_repeats", "more zh data"):
        assert text in str(err.value)


def test_fail_does_not_raise_when_repeats_close_the_gap():
    s = sampler(SHORT, RowMix(zh_share=0.5), on_shortfall="fail", max_repeats=10)
    assert zh_share(SHORT, s.epoch(0)) >= 0.5


def test_no_zh_rows_raise_unless_relaxed():
    pool = [row for row in SHORT if row[0] != "zh"]
    for action in ("downsample", "fail"):
        with pytest.raises(ShortfallError, match="no zh rows"):
            sampler(pool, RowMix(zh_share=0.5), on_shortfall=action)
    assert sorted(sampler(pool, RowMix(zh_share=0.5), on_shortfall="relax").epoch(0)) == list(range(len(pool)))
    assert sorted(sampler(pool, RowMix(zh_share=0.0)).epoch(0)) == list(range(len(pool)))


def test_max_repeats_caps_the_copies_and_raises_the_share():
    zh_rows = [i for i, row in enumerate(SHORT) if row[0] == "zh"]
    capped = sampler(SHORT, RowMix(zh_share=0.7), max_repeats=2, on_shortfall="relax").epoch(0)
    counts = Counter(capped)
    assert all(counts[r] == 2 for r in zh_rows) and all(counts[r] == 1 for r in set(capped) - set(zh_rows))
    once = zh_share(SHORT, list(range(len(SHORT))))
    assert once < zh_share(SHORT, capped) < 0.7
    enough = sampler(SHORT, RowMix(zh_share=0.5), max_repeats=10).epoch(0)
    counts = Counter(enough)
    assert max(counts.values()) <= 10 and len(enough) - len(set(enough)) > 0
    assert len(set(enough)) == len(SHORT)  # nothing dropped: the repeats were enough
    zh = tokens_of(SHORT, [r for r in enough if SHORT[r][0] == "zh"])
    non_zh = tokens_of(SHORT, [r for r in enough if SHORT[r][0] != "zh"])
    assert non_zh <= zh < non_zh + 200  # copies stop as soon as the share is met


def test_a_source_of_weight_zero_is_left_out():
    pool = RICH + make_pool([("en", "hh", 0, 200)], seed=3)  # would pull the share far below 0.7
    s = sampler(pool, RowMix(zh_share=0.7, source_weights={"hh": 0.0}))
    rows = s.order(1.0)
    assert sorted(rows) == list(range(len(RICH)))
    report = s.report()
    assert report["shortfall"] is None and "hh" not in report["sources"] and report["left_out_sources"] == ["hh"]


def test_source_weights_two_to_one_give_two_to_one_tokens_over_a_prefix():
    pool = make_pool([("zh", "a", 0, 400), ("zh", "b", 0, 400)], seed=4)
    rows = sampler(pool, RowMix(zh_share=0.7, source_weights={"a": 2.0, "b": 1.0}), n_buckets=1).epoch(0)
    head, budget = [], tokens_of(pool, list(range(len(pool)))) * 0.3
    for r in rows:
        if tokens_of(pool, head) >= budget:
            break
        head.append(r)
    a, b = (tokens_of(pool, [r for r in head if pool[r][1] == src]) for src in "ab")
    assert a / b == pytest.approx(2.0, rel=0.05)


def test_bucket_weight_zero_postpones_the_bucket_in_its_stage_and_the_rows_still_come():
    pool = make_pool([("zh", "coig", 0, 140), ("zh", "coig", 1, 60), ("en", "shp", 0, 70), ("en", "shp", 1, 30)])
    mix = RowMix(zh_share=0.6, curriculum=[CurriculumStage(0.5, [1.0, 0.0]), CurriculumStage(1.0, [1.0, 1.0])])
    rows = sampler(pool, mix).epoch(0)
    total, seen, first_stage = tokens_of(pool, rows), 0, []
    for r in rows:
        if seen >= 0.5 * total:
            break
        first_stage.append(r)
        seen += pool[r][3]
    assert {pool[r][2] for r in first_stage} == {0} and len(first_stage) > 50
    assert sorted(rows) == list(range(len(pool)))


def test_bucket_weight_zero_rows_follow_once_their_language_runs_dry():
    pool = make_pool([("zh", "coig", 0, 30), ("zh", "coig", 1, 30)])
    rows = sampler(pool, RowMix(zh_share=0.7, curriculum=[CurriculumStage(1.0, [1.0, 0.0])])).epoch(0)
    assert [pool[r][2] for r in rows] == [0] * 30 + [1] * 30


def test_a_stage_zh_share_of_one_front_loads_zh_rows():
    mix = RowMix(zh_share=0.7, curriculum=[CurriculumStage(0.3, zh_share=1.0), CurriculumStage(1.0)])
    rows = sampler(RICH, mix).epoch(0)
    total, seen, head = tokens_of(RICH, rows), 0, []
    for r in rows:
        if seen >= 0.3 * total:
            break
        head.append(r)
        seen += RICH[r][3]
    assert len(head) > 50 and {RICH[r][0] for r in head} == {"zh"}
    plain = sampler(RICH, RowMix(zh_share=0.7)).epoch(0)
    assert {RICH[r][0] for r in plain[:len(head)]} == {"zh", "en"}


def test_zh_rows_interleave_at_the_target_share_along_the_order():
    rows = sampler(RICH, RowMix(zh_share=0.7)).epoch(0)
    for cut in (len(rows) // 4, len(rows) // 2):
        assert zh_share(RICH, rows[:cut]) == pytest.approx(0.7, abs=0.03)


def test_order_of_one_and_a_half_epochs_is_reproducible_and_epochs_differ():
    mix = RowMix(zh_share=0.7)
    s = sampler(RICH, mix, seed=3)
    one = s.epoch(0)
    rows = s.order(1.5)
    budget = math.floor(1.5 * tokens_of(RICH, one))
    assert budget - 200 < tokens_of(RICH, rows) <= budget
    epoch0, epoch1 = rows[:len(one)], rows[len(one):]
    assert sorted(epoch0) == list(range(len(RICH))) and len(set(epoch1)) == len(epoch1)
    assert epoch1 != epoch0[:len(epoch1)]
    assert sampler(RICH, mix, seed=3).order(1.5) == rows
    assert sampler(RICH, mix, seed=4).order(1.5) != rows


def test_report_is_json_and_matches_a_recount_of_the_order():
    mix = RowMix(zh_share=0.7, curriculum=[CurriculumStage(0.4, [1.0, 0.5], zh_share=0.9), CurriculumStage(1.0)])
    s = sampler(SHORT, mix, max_repeats=2)
    report = s.report(1.5)
    assert json.loads(json.dumps(report)) == report
    rows = s.order(1.5)
    zh = [r for r in rows if SHORT[r][0] == "zh"]
    assert (report["rows"], report["tokens"], report["zh_tokens"]) == (len(rows), tokens_of(SHORT, rows),
                                                                      tokens_of(SHORT, zh))
    assert report["zh_share"] == pytest.approx(0.7, abs=0.02) and report["target_zh_share"] == 0.7
    assert zh_share(SHORT, s.epoch(0)) >= 0.7  # a full epoch meets the share; the cut half-epoch about meets it
    for src, d in report["sources"].items():
        mine = [r for r in rows if SHORT[r][1] == src]
        assert (d["rows"], d["tokens"]) == (len(mine), tokens_of(SHORT, mine))
        assert d["zh_share"] == pytest.approx(zh_share(SHORT, mine))
    for b, d in enumerate(report["buckets"]):
        mine = [r for r in rows if SHORT[r][2] == b]
        assert (d["rows"], d["tokens"]) == (len(mine), tokens_of(SHORT, mine))
    total, seen, stage_tokens = math.floor(1.5 * tokens_of(SHORT, s.epoch(0))), 0, [0, 0]
    for r in rows:
        stage_tokens[0 if seen / total < 0.4 else 1] += SHORT[r][3]
        seen += SHORT[r][3]
    assert [d["tokens"] for d in report["stages"]] == stage_tokens
    assert report["stages"][0]["zh_share"] > report["stages"][1]["zh_share"]
    epoch0 = s.epoch(0)
    assert report["repeats"]["rows"] >= sum(1 for n in Counter(epoch0).values() if n > 1) > 0
    shortfall = report["shortfall"]
    assert shortfall["action"] == "downsample" and shortfall["achievable"] < 0.7
    assert shortfall["non_zh_tokens_dropped"] == shortfall["non_zh_tokens"] - tokens_of(
        SHORT, [r for r in epoch0 if SHORT[r][0] != "zh"])


def test_a_shortfall_is_warned_once_per_sampler(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sampler"):
        s = sampler(SHORT, RowMix(zh_share=0.7))
        s.order(2.0)
        s.report()
    assert len([r for r in caplog.records if "zh shortfall" in r.message]) == 1
    assert "downsample" in caplog.text


def test_enough_zh_or_share_zero_keeps_every_row_once_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sampler"):
        for share in (0.0, 0.6):
            s = sampler(RICH, RowMix(zh_share=share))
            assert sorted(s.epoch(0)) == list(range(len(RICH))) and s.report()["shortfall"] is None
    assert not caplog.records


def test_a_share_of_one_keeps_no_non_zh_rows():
    rows = sampler(SHORT, RowMix(zh_share=1.0)).epoch(0)
    assert {SHORT[r][0] for r in rows} == {"zh"} and len(rows) == sum(row[0] == "zh" for row in SHORT)


def test_numpy_columns_give_the_same_order_as_lists():
    langs, sources, buckets, tokens = (list(col) for col in zip(*SHORT, strict=True))
    arrays = MixedBucketSampler(np.array(langs), np.array(sources), np.array(buckets), np.array(tokens),
                                RowMix(zh_share=0.7), kind="sft", n_buckets=2, max_repeats=2)
    assert arrays.order(1.5) == sampler(SHORT, RowMix(zh_share=0.7), max_repeats=2).order(1.5)
