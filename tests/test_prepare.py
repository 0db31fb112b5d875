"""The prepare stage's building blocks. Text hygiene: Chinese punctuation survives, the dedup key folds, language."""

from __future__ import annotations

import pytest

from pipeline.data.text import classify, dedup_key, normalise, script


def test_normalise_keeps_chinese_punctuation_and_superscripts():
    assert normalise("你好，世界！（测试）x²") == "你好，世界！（测试）x²"


def test_normalise_maps_only_fullwidth_letters_digits_and_ideographic_space():
    assert normalise("ＡＢＣ　ｘｙｚ１２３：") == "ABC xyz123："


def test_normalise_compresses_spaces_trims_line_ends_and_keeps_lines():
    assert normalise("  第一行   有空格  \r\n第二行\t\t结束  \n\n\n第三行 ") == "第一行 有空格\n第二行 结束\n\n\n第三行"


def test_normalise_leaves_fenced_code_byte_for_byte():
    code = "```python\nfor i in  range(3):   \n    print( ｉ )\n```"
    assert normalise(f"代码如下：  \n{code}\n完毕　") == f"代码如下：\n{code}\n完毕"
    unclosed = "```\n  x  =  1  "
    assert normalise(f"看：\n{unclosed}") == f"看：\n{unclosed}".rstrip()


def test_dedup_key_folds_width_case_and_whitespace_but_the_text_does_not():
    a, b = "Hello，ＷＯＲＬＤ\n\n  你好 ", "hello,world 你好"
    assert dedup_key(a) == dedup_key(b) == "hello,world 你好"
    assert normalise(a) != normalise(b)


@pytest.mark.parametrize("text,lang", [
    ("你好，世界！今天天气很好。", "zh"),
    ("The quick brown fox jumps over the lazy dog.", "en"),
    ("使用 Python 和 PyTorch 训练模型", "zh"),
    ("Use 中文 in one word of a long English sentence here", "en"),
    ("こんにちは、世界。日本語の文章です。", "other"),
    ("안녕하세요, 세계", "other"),
    ("Привет, как дела?", "other"),
    ("", "other"),
])
def test_classify_by_character_classes(text, lang):
    assert classify(text) == lang


def test_code_blocks_are_left_out_of_the_language_ratio():
    answer = "下面是解法：\n```python\ndef two_sum(nums, target):\n    seen = {}\n    return seen\n```\n复杂度是线性的。"
    assert script(answer).latin_words == 0 and classify(answer) == "zh"


def test_the_datasets_own_language_tag_wins():
    assert [classify("Hello", tag) for tag in ("zh", "zh-TW", "en", "ja")] == ["zh", "zh", "en", "other"]


def test_han_share():
    assert script("中文 text").han_share == pytest.approx(2 / 3)
    assert script("").han_share == 0.0
