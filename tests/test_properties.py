"""Properties that hold for any input (hypothesis): text hygiene is idempotent and keeps Chinese punctuation; the zh
ratio stays in [0, 1]; dedup keeps the same survivors — each id from its highest-priority source — whatever the order
of the rows; the sampler is deterministic per seed and its realised zh share meets the target and converges to it
along the order; the strict loader rejects an unknown key at any depth of every shipped config."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS
from pipeline.core.profiles import HardwareProfile, HubConfig, ModelDef
from pipeline.core.strict import build, fields, load_yaml
from pipeline.data import clean
from pipeline.data.mix import RowMix
from pipeline.data.sampler import MixedBucketSampler
from pipeline.data.text import normalise, script
from pipeline.stage.spec import get

# modest and reproducible: the same examples on every run, nothing written to .hypothesis/
PROPS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])

ZH_PUNCT = "，。！？：；、（）「」『』《》〈〉【】“”‘’…—～·"
HAN = "中文你好世界模型数据训练的一是不了人我在有他这"
WIDE = "０１２３ＡＢＣｚｙ\u3000"
text_chars = st.sampled_from(list(HAN + ZH_PUNCT + WIDE + "abcXYZ019 .,!?:;()\t\n\r`-_#*") + ["```", "```py\n"])
texts = st.lists(text_chars, max_size=60).map("".join)


# ------------------------------------------------------------------------------------------------------------------
# Text hygiene and the zh ratio
# ------------------------------------------------------------------------------------------------------------------
@PROPS
@given(texts)
def test_normalise_is_idempotent_and_keeps_every_chinese_punctuation_mark(text):
    once = normalise(text)
    assert normalise(once) == once
    assert [c for c in once if c in ZH_PUNCT] == [c for c in text if c in ZH_PUNCT]


@PROPS
@given(st.one_of(texts, st.text(max_size=80)))
def test_the_zh_ratio_stays_in_0_1_and_the_language_is_one_of_three(text):
    s = script(text)
    assert 0.0 <= s.han_share <= 1.0 and s.lang in ("zh", "en", "other")
    lang, share, _ = clean._language(text, None, 0.3, True)
    assert 0.0 <= share <= 1.0 and lang in ("zh", "en", "other")


# ------------------------------------------------------------------------------------------------------------------
# Dedup: survivors do not depend on the order of the rows, only on the sources' priority
# ------------------------------------------------------------------------------------------------------------------
BASES = ["你好，世界！今天学习模型训练。", "Hello world, the data is clean.", "数据 2024 年 版本 A 说明",
         "中文 and English 混合"]
SOURCES = ["oasst1", "coig", "shp"]  # priority order: the first listed wins


def variant(base: str, how: int) -> str:
    """A text with the same dedup key as `base`: case, spacing or full-width digits and letters changed."""
    if how == 1:
        return base.upper()
    if how == 2:
        return "  " + base.replace(" ", "   ") + " \n"
    if how == 3:
        return base.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789AE"})
    return base


rows_strategy = st.lists(st.tuples(st.sampled_from(SOURCES), st.integers(0, len(BASES) - 1), st.integers(0, 3),
                                   st.integers(0, 1)), min_size=1, max_size=30)


def survivors(rows: list[tuple[str, int, int, int]]) -> dict[str, str]:
    """prepare's dedup on these rows: clean (ids from the dedup key), sources in priority order, first id wins."""
    rows = sorted(rows, key=lambda r: SOURCES.index(r[0]))  # read_sources: source by source, in priority order
    batch = {"messages": [[{"role": "user", "content": variant(BASES[b], how)},
                           {"role": "assistant", "content": f"回答 {answer}"}] for _, b, how, answer in rows],
             "lang_hint": [None] * len(rows), "group": [""] * len(rows)}
    ids = clean.clean_sft(batch, min_chars=2, min_cn_ratio=0.0, allow_english=True, eval_fraction=0.0)["id"]
    return {i: src for i, (src, *_), keep in zip(ids, rows, clean.first_seen(ids), strict=True) if keep}


@PROPS
@given(rows_strategy, st.randoms(use_true_random=False))
def test_dedup_keeps_the_same_survivors_whatever_the_order(rows, rnd):
    kept = survivors(rows)
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    assert survivors(shuffled) == kept
    # one survivor per distinct (text, answer), from the highest-priority source that has it
    best = {}
    for src, b, _, answer in rows:
        best[(b, answer)] = min(best.get((b, answer), src), src, key=SOURCES.index)
    assert sorted(kept.values(), key=SOURCES.index) == sorted(best.values(), key=SOURCES.index)


# ------------------------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------------------------
N_BUCKETS = 3
pools = st.lists(st.tuples(st.sampled_from(["zh", "en", "other"]), st.sampled_from(["coig", "oasst1", "shp"]),
                           st.integers(0, N_BUCKETS - 1), st.integers(1, 100)), min_size=30, max_size=150).filter(
    lambda p: any(r[0] == "zh" for r in p) and any(r[0] != "zh" for r in p))


def make(pool, share: float, seed: int, weights: dict[str, float]) -> MixedBucketSampler:
    langs, sources, buckets, tokens = (list(c) for c in zip(*pool, strict=True))
    return MixedBucketSampler(langs, sources, buckets, tokens, RowMix(zh_share=share, source_weights=weights),
                              kind="sft", n_buckets=N_BUCKETS, seed=seed)


@PROPS
@given(pools, st.floats(0.05, 0.95), st.integers(0, 2 ** 31), st.dictionaries(
    st.sampled_from(["coig", "oasst1", "shp"]), st.floats(0.5, 4.0), max_size=3))
def test_the_sampler_is_deterministic_per_seed_and_its_zh_share_meets_and_tracks_the_target(pool, share, seed, w):
    a, b = make(pool, share, seed, w), make(pool, share, seed, w)
    rows = a.epoch(0)
    assert rows == b.epoch(0) and a.order(1.5) == b.order(1.5) and a.report(1.0) == b.report(1.0)
    tok = [r[3] for r in pool]
    zh = [r[0] == "zh" for r in pool]
    total = sum(tok[i] for i in rows)
    zh_total = sum(tok[i] for i in rows if zh[i])
    biggest = max(tok)
    assert zh_total >= share * total - 1e-6 * total  # the target is met: downsampling or the pool's own share
    assert a.report(1.0)["zh_share"] == pytest.approx(zh_total / total)
    pool_zh = sum(t for t, z in zip(tok, zh, strict=True) if z) / sum(tok)
    if pool_zh < share:  # downsampled: as close to the target as a row allows, closer as the epoch grows
        assert zh_total / total - share <= (biggest + 1) / total
    # along the order: while both languages have rows left, the zh tokens so far stay within one row of the target
    left_zh, left_other = sum(zh[i] for i in rows), sum(not zh[i] for i in rows)
    seen = seen_zh = 0
    for i in rows:
        seen, seen_zh = seen + tok[i], seen_zh + tok[i] * zh[i]
        left_zh, left_other = left_zh - zh[i], left_other - (not zh[i])
        if left_zh and left_other:
            assert abs(seen_zh - share * seen) <= biggest + 1e-9


# ------------------------------------------------------------------------------------------------------------------
# The strict loader: an unknown key at any depth of any shipped config
# ------------------------------------------------------------------------------------------------------------------
def config_classes() -> list[tuple[Path, type]]:
    pairs = [(CONFIGS / "hub.yaml", HubConfig)]
    pairs += [(p, HardwareProfile) for p in sorted((CONFIGS / "hw").glob("*.yaml"))]
    pairs += [(p, ModelDef) for p in sorted((CONFIGS / "models").glob("*.yaml"))]
    for folder in (CONFIGS, CONFIGS / "smoke"):
        for name in ("prepare", "sft", "evaluate", "export"):
            pairs.append((folder / f"{name}.yaml", get(name).config))
        pairs += [(p, get("align").config) for p in sorted((folder / "align").glob("*.yaml"))]
    return pairs


CONFIG_FILES = config_classes()


def _dataclass_of(tp: typing.Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def mappings(cls: type, raw: dict, path: tuple = ()) -> list[tuple[tuple, type]]:
    """Every place in a raw tree that is read as a dataclass (a mapping with fixed keys): (path, class). A field of
    dataclass type that the file leaves out counts too (the key is added as a new mapping)."""
    found = [(path, cls)]
    hints = typing.get_type_hints(cls)
    for name in fields(cls):
        tp, value = hints[name], raw.get(name)
        inner = _dataclass_of(tp)
        if inner is not None and (isinstance(value, dict) or value is None):
            found += mappings(inner, value or {}, (*path, name))
        elif typing.get_origin(tp) is list and isinstance(value, list):
            item = _dataclass_of(typing.get_args(tp)[0])
            if item is not None:
                for i, v in enumerate(value):
                    if isinstance(v, dict):
                        found += mappings(item, v, (*path, name, i))
    return found


def insert(raw: dict, path: tuple, key: str) -> dict:
    node = raw
    for part in path:
        node = node[part] if isinstance(node, list) or isinstance(node.get(part), (dict, list)) else \
            node.setdefault(part, {})
        if node is None:
            node = {}
    node[key] = 1
    return raw


@PROPS
@given(st.data())
def test_the_loader_rejects_an_unknown_key_at_any_depth_of_any_config(data):
    path_file, cls = data.draw(st.sampled_from(CONFIG_FILES), label="config")
    raw = load_yaml(path_file)
    where, node_cls = data.draw(st.sampled_from(mappings(cls, raw)), label="where")
    key = data.draw(st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True).filter(lambda k: k not in fields(node_cls)),
                    label="key")
    dotted = ".".join(map(str, (*where, key)))
    with pytest.raises(ConfigError) as info:
        build(cls, insert(raw, where, key), "test.yaml")
    assert any(p.startswith(f"test.yaml: `{dotted}`: unknown key") for p in info.value.problems), info.value.problems


def test_every_shipped_config_builds_and_offers_mappings_several_levels_deep():
    """The property above is not vacuous: each file builds as it is, and the places it probes reach depth 3."""
    depths = []
    for path, cls in CONFIG_FILES:
        build(cls, load_yaml(path), "test.yaml")
        depths += [len(where) for where, _ in mappings(cls, load_yaml(path))]
    assert max(depths) >= 3 and len(CONFIG_FILES) >= 15
