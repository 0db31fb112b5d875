"""Decontamination by long shared n-grams: units, thresholds, normalisation, row kinds, pickling, stable hashes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.decontam import Index, batch_hits, grams, units
from pipeline.data.text import dedup_key

ZH_ITEM = "下列哪一项是中华人民共和国的首都城市名称？A. 上海 B. 北京 C. 广州 D. 深圳"
ZH_SPAN13 = "哪一项是中华人民共和国的首"  # 13 Han characters of the question
EN_ITEM = ("Which of the following best describes the primary function of mitochondria in eukaryotic cells? "
           "A. protein synthesis B. energy production C. lipid storage D. cell division")
EN_WORDS = EN_ITEM.split()


@pytest.fixture(scope="module")
def index() -> Index:
    return Index([("cmmlu", ZH_ITEM), ("mmlu", EN_ITEM), ("zh_smoke", "短题")], n=13)


def sft(user: str, answer: str = "好的。") -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_units_are_han_characters_and_latin_words():
    assert units("用Python 3.11写一个hello-world程序！") == ["用", "python", "3", "11", "写", "一", "个", "hello", "world",
                                                        "程", "序"]
    assert units("カタカナ 한국어") == ["カ", "タ", "カ", "ナ", "한", "국", "어"]


def test_zh_13_characters_hit_and_12_do_not(index: Index):
    assert len(ZH_SPAN13) == 13
    assert index.tasks_of(f"今天我们讨论一个问题：{ZH_SPAN13}，请大家思考。") == {"cmmlu"}
    assert index.tasks_of(f"今天我们讨论一个问题：{ZH_SPAN13[:12]}，请大家思考。") == set()
    # 12 shared characters at each end of an unrelated middle: still no 13 in a row
    assert index.tasks_of(f"{ZH_SPAN13[:12]}甲{ZH_SPAN13[1:]}") == set()


def test_en_13_words_hit_and_12_do_not(index: Index):
    assert index.tasks_of("As a warm-up: " + " ".join(EN_WORDS[2:15]) + " -- discuss.") == {"mmlu"}
    assert index.tasks_of("As a warm-up: " + " ".join(EN_WORDS[2:14]) + " -- discuss.") == set()


def test_mixed_text_counts_han_characters_and_words_as_units():
    item = "请用Python写一个函数计算斐波那契数列的第n项并给出时间复杂度"
    idx = Index([("code_zh", item)], n=13)
    assert idx.tasks_of("作业：请用 python 写一个函数计算斐波那，谢谢") == {"code_zh"}  # 请 用 python 写 … 那 = 13 units
    assert idx.tasks_of("作业：用 python 写一个函数计算斐波那，谢谢") == set()  # 用 python 写 … 那 = 12 units


def test_normalisation_full_width_case_and_spaces_still_hit(index: Index):
    wide = "ＷＨＩＣＨ ｏｆ　ｔｈｅ   FOLLOWING best describes THE primary function of MITOCHONDRIA in Eukaryotic"
    assert index.tasks_of(wide) == {"mmlu"}
    assert index.tasks_of("哪 一 项 是 中 华 人 民 共 和 国 的 首") == {"cmmlu"}
    assert len(grams(wide, 13)) == 1 and grams(wide, 13) == grams(" ".join(EN_WORDS[:13]), 13)


def test_short_texts_have_no_grams():
    assert grams("短题", 13) == set()
    assert len(grams("一二三四五六七八九十一二三", 13)) == 1
    with pytest.raises(ValueError, match="n must be"):
        grams("x", 0)


def test_batch_hits_sft_counts_user_and_assistant_not_system(index: Index):
    batch = {"messages": [
        sft("随便聊聊天气吧。"),
        sft("首都是哪里？", f"这道题问的是：{ZH_SPAN13}。答案是北京。"),
        [{"role": "system", "content": ZH_SPAN13}, *sft("你好")],
        sft(" ".join(EN_WORDS[:13]), f"{ZH_SPAN13}"),
    ]}
    assert batch_hits(batch, index=index, kind="sft") == {"contaminated": ["", "cmmlu", "", "cmmlu;mmlu"]}


def test_batch_hits_pref_contaminated_through_chosen(index: Index):
    clean = [{"role": "assistant", "content": "不知道。"}]
    batch = {"prompt": [[{"role": "user", "content": "请回答一个地理问题。"}]] * 2,
             "chosen": [[{"role": "assistant", "content": f"题目：{ZH_SPAN13}？选 B。"}], clean],
             "rejected": [clean, clean]}
    assert batch_hits(batch, index=index, kind="pref") == {"contaminated": ["cmmlu", ""]}
    with pytest.raises(ValueError, match="kind"):
        batch_hits(batch, index=index, kind="dpo")


def test_index_survives_pickling(index: Index):
    copy = pickle.loads(pickle.dumps(index))
    assert (copy.n, copy.tasks, copy.masks) == (index.n, index.tasks, index.masks)
    for text in (ZH_SPAN13, " ".join(EN_WORDS[:13]), ZH_SPAN13[:12], ZH_SPAN13 + " " + " ".join(EN_WORDS[-13:])):
        assert copy.tasks_of(text) == index.tasks_of(text)
    assert copy.tasks_of(ZH_SPAN13 + " " + " ".join(EN_WORDS[-13:])) == {"cmmlu", "mmlu"}


def test_grams_are_stable_across_processes():
    code = ("import sys; from pipeline.data.decontam import grams; "
            f"print(json.dumps(sorted(grams({ZH_ITEM + ' ' + EN_ITEM!r}, 13))))").replace("import sys", "import json")
    root = Path(__file__).resolve().parents[1]
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                                      env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}).stdout) for seed in ("1", "2")]
    assert runs[0] == runs[1] == sorted(grams(ZH_ITEM + " " + EN_ITEM, 13))
    assert len(runs[0]) > 10


def test_vectorised_units_match_the_unit_pattern_on_mixed_text():
    """The numpy unit split (what grams hashes) finds exactly the units ``units`` lists, text by text, and the same
    unit always gets the same hash."""
    import random

    from pipeline.data.decontam import _unit_hashes

    alphabet = "abcXYZ019_ \n,.!？，。你好世界カタ한국ᄀ\u3000ｆｕｌｌ²½Ⅷ\U00020001\U0003134f\U00031350é\u0301\x00-'"
    rng = random.Random(1)
    for _ in range(300):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 5))]
        hashes, text_of = _unit_hashes([dedup_key(t) for t in texts])
        expected = [(i, u) for i, t in enumerate(texts) for u in units(t)]
        assert text_of.tolist() == [i for i, _ in expected]
        seen: dict[str, int] = {}
        assert all(seen.setdefault(u, h) == h for h, (_, u) in zip(hashes.tolist(), expected, strict=True))
        assert len(set(seen.values())) == len(seen)
