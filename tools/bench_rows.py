"""Seeded synthetic zh/en rows for ``make bench-data`` (tools/bench_data.py): ~70 % zh, full-width forms, code blocks,
~5 % exact and near duplicates, empty turns, log-uniform lengths; in the prepare stage's record schema."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data.sources.base import sft, turn

SHARD = 25_000  # rows per generator shard: each has its own seeded RNG, so the rows do not depend on --num-proc
ZH = ("今天天气很好", "我们一起去公园散步", "请解释一下这个问题", "机器学习是人工智能的一个分支",
      "这个模型的效果不错", "首先需要准备数据", "然后训练一个小模型", "最后评估它在测试集上的表现",
      "中文分词并不简单", "深度学习需要大量的计算资源", "你可以用Python来实现", "这段代码有一个错误",
      "请给出三个例子", "北京是中国的首都", "长江是亚洲最长的河流", "学习率设得太大会导致训练不稳定",
      "我觉得这个方案可行", "他们在会议上讨论了预算", "数据清洗是关键的一步", "注意不要过拟合", "可以先看看文档",
      "这本书讲的是历史", "春天来了，花都开了", "请把下面的句子翻译成英文", "第3章介绍了GPU的用法", "总共有12个样本",
      "答案是42", "用户反馈说界面太复杂", "我们应该尊重每个人的意见")
EN = ("the", "model", "data", "training", "is", "a", "of", "to", "and", "learning", "rate", "we", "can", "use",
      "this", "function", "returns", "value", "please", "explain", "why", "how", "example", "first", "then",
      "Python", "GPU", "network", "loss", "batch", "size", "token", "text", "language", "answer", "question")
CODE = ("```python\ndef add(a, b):\n    return a  +  b   \n```", "```\nfor i in range(10):\n    print(i)\n```",
        "```bash\npip install  datasets\n```", "```js\nconst x  =  [1, 2, 3];\n```")
SHORT = ("", " ", "　", "好", "a", "\n")
WIDE = {cp: cp + 0xFEE0 for cp in (*range(0x30, 0x3A), *range(0x41, 0x5B), *range(0x61, 0x7B))} | {0x20: 0x3000}


# --- Synthetic rows --------------------------------------------------------------------------------------------------
def _zh(rng: random.Random, n: int) -> str:
    parts = []
    while sum(map(len, parts)) < n:
        parts.append(rng.choice(ZH) + rng.choice("，，，。。！？") + ("\n" if rng.random() < 0.08 else ""))
    return "".join(parts)


def _en(rng: random.Random, n: int) -> str:
    words = rng.choices(EN, k=max(1, n // 5))
    return " ".join(words).capitalize() + rng.choice(".?!") + ("  \n" if rng.random() < 0.2 else "")


def _text(rng: random.Random, zh: bool, n: int) -> str:
    text = _zh(rng, n) if zh else _en(rng, n)
    if rng.random() < 0.1:  # a full-width stretch and ideographic spaces
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + "ＧＰＵ　１２８ｇｂ　" + text[cut:]
    if rng.random() < 0.05:
        text = "  " + text.replace("\n", "   \r\n") + "\t\t"
    return text


def _near(text: str, rng: random.Random) -> str:
    """A near duplicate: the same dedup key, another training text (width, case or spacing)."""
    how = rng.randrange(3)
    return text.translate(WIDE) if how == 0 else text.upper() if how == 1 else text.replace(" ", "  ") + " \n"


def _pair(rng: random.Random) -> tuple[str, str]:
    zh = rng.random() < 0.7
    # log-uniform lengths, as in real SFT sets: most turns short, a long tail (prompts 10-200, answers 50-600 chars)
    user, answer = _text(rng, zh, int(10 * 20 ** rng.random())), _text(rng, zh, int(50 * 12 ** rng.random()))
    if rng.random() < 0.08:
        answer += "\n" + rng.choice(CODE) + "\n" + _text(rng, zh, rng.randint(10, 80))
    if rng.random() < 0.02:
        user, answer = (rng.choice(SHORT), answer) if rng.random() < 0.5 else (user, rng.choice(SHORT))
    return user, answer


def _row(i: int, rng: random.Random, recent: deque[tuple[str, str]]) -> dict[str, Any]:
    r = rng.random()
    if recent and r < 0.03:
        user, answer = rng.choice(recent)
    elif recent and r < 0.05:
        user, answer = (_near(t, rng) for t in rng.choice(recent))
    else:
        user, answer = _pair(rng)
        recent.append((user, answer))
    record = sft([turn("user", user), turn("assistant", answer)], f"bench-{i}")
    return {**record, "source": "coig_pc_core", "n_tokens": len(user) + len(answer) + 16}


def rows(shards: list[int], n: int, seed: int) -> Iterator[dict[str, Any]]:
    """Rows ``[shard * SHARD, (shard + 1) * SHARD)`` of an n-row set, one seeded RNG per shard."""
    for shard in shards:
        rng, recent = random.Random(f"{seed}:{shard}"), deque(maxlen=500)
        for i in range(shard * SHARD, min(n, (shard + 1) * SHARD)):
            yield _row(i, rng, recent)


def generate(n: int, seed: int, folder: Path, num_proc: int):
    """The synthetic rows as an Arrow-backed Dataset in ``folder`` (the stage's record schema + ``n_tokens``)."""
    from datasets import Dataset, Value

    from pipeline.data.pool import features as record_features

    features = record_features()
    features["n_tokens"] = Value("int32")
    shards = list(range(-(-n // SHARD)))
    return Dataset.from_generator(rows, features=features, cache_dir=str(folder), num_proc=min(num_proc, len(shards)),
                                  gen_kwargs={"shards": shards, "n": n, "seed": seed})
