"""``make bench-data``: the prepare stage's cleaning path on N synthetic zh/en SFT rows, beside a naive loop.

A developer harness (``tools/``, not part of the package).

The rows are seeded and made by a generator straight into an Arrow-backed ``Dataset`` in a temporary folder (timed as
file I/O): the stage's record layout, ~70 % zh, turns of about 10–600 characters, some full-width letters and digits
and U+3000, fenced code, ~5 % exact and near duplicates, some empty or one-character turns. The cleaning path is the
stage's own — ``Dataset.map(clean_sft, batched=True, num_proc=K)`` → rows without a drop reason → ``first_seen`` →
``bucket_of`` — bucketed on a characters-based token estimate, so tokenising (the stage's ``count_tokens`` with the
tiny model's tokenizer) is timed apart on a sample. The naive loop runs the same per-row functions over a Python list
of every row in a spawned child process, whose memory is its own. Peak RSS is sampled with psutil every 100 ms (this
process; the map workers, the largest one and all together); the naive child reports ``getrusage``'s ``ru_maxrss``.
Targets: the cleaning path at least 1.5× the naive loop, peak RSS at most 2 GiB. A missed target prints FAIL, yet the
exit code is 0: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import random
import resource
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.paths import repo_path
from pipeline.data import clean as C
from pipeline.data.sources.base import sft, turn
from pipeline.data.text import classify, dedup_key, normalise, script
from pipeline.prepare import PrepareConfig
from pipeline.stage.cli import setup_logging

log = logging.getLogger("pipeline.bench")
GiB = 1024 ** 3
TARGET_SPEEDUP, TARGET_RSS = 1.5, 2 * GiB
SHARD = 25_000  # rows per generator shard: each has its own seeded RNG, so the rows do not depend on --num-proc
UNUSED = ["kind", "lang_hint", "prompt", "chosen", "rejected"]  # what the stage's SFT map removes
DEFAULTS = PrepareConfig(sources=[])
CLEAN_KW = {"min_chars": DEFAULTS.filters.min_chars, "min_cn_ratio": DEFAULTS.filters.min_cn_ratio,
            "allow_english": DEFAULTS.filters.allow_english_fallback, "eval_fraction": DEFAULTS.eval_fraction}
EDGES = list(DEFAULTS.buckets)

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


# ------------------------------------------------------------------------------------------------------------------
# Synthetic rows
# ------------------------------------------------------------------------------------------------------------------
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
    return {**record, "source": "bench", "n_tokens": len(user) + len(answer) + 16}


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


# ------------------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process and of its children (the map workers), sampled with psutil."""

    def __init__(self, every: float = 0.1) -> None:
        self.every, self.main, self.worker, self.workers = every, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            self.main = max(self.main, me.memory_info().rss)
            kids = []
            for child in me.children(recursive=True):
                try:
                    kids.append(child.memory_info().rss)
                except psutil.Error:  # a worker that just ended
                    pass
            self.worker, self.workers = max(self.worker, max(kids, default=0)), max(self.workers, sum(kids))
            if self._stop.wait(self.every):
                return


@contextmanager
def clock(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start


def cleaning_path(ds, num_proc: int) -> tuple[dict[str, Any], Any]:
    """The stage's map → drop filter → first_seen → bucket_of, timed step by step, with peak RSS; and the kept rows.
    The columns these steps need are read whole from the Arrow table, not row by row (lazy ``Column``s) nor through
    an indices mapping (``fast_gather``), which at 1M rows cost seconds each."""
    import numpy as np
    import pyarrow.compute as pc

    times: dict[str, float] = {}
    with PeakRSS() as rss:
        with clock(times, "map"):
            cleaned = ds.map(C.clean_sft, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=UNUSED,
                             desc="sft: clean", fn_kwargs=CLEAN_KW)
        with clock(times, "filter"):
            table = cleaned.data  # a fresh map output: no indices mapping, so rows are table rows
            keep = np.flatnonzero(pc.equal(table.column("drop"), "").to_numpy(False))
        with clock(times, "dedup"):
            keep = keep[np.asarray(C.first_seen(table.column("id").take(keep).to_pylist()), dtype=bool)]
            kept = cleaned.select(keep)
        with clock(times, "bucket"):
            buckets = [C.bucket_of(n, EDGES) for n in table.column("n_tokens").take(keep).to_pylist()]
    seconds = sum(times.values())
    return {"rows": len(ds), "seconds": seconds, "rows_per_s": len(ds) / seconds, "steps_s": times,
            "kept": len(kept), "buckets": _histogram(buckets), "peak_rss": {
                "main": rss.main, "worker_max": rss.worker, "workers_sum": rss.workers}}, kept


def _histogram(buckets) -> dict[str, int]:
    return {str(b): n for b, n in sorted(Counter(buckets).items())}


def tokenise(kept, sample: int, num_proc: int) -> dict[str, Any]:
    """The stage's ``count_tokens`` map with the tiny model's tokenizer over the first ``sample`` kept rows."""
    from pipeline.core.profiles import load_model
    from pipeline.models.loading import load_tokenizer

    model = load_model("tiny-qwen2")
    tokenizer = load_tokenizer(model)
    part = kept.select(range(min(sample, len(kept))))
    start = time.perf_counter()
    part.map(C.count_tokens, batched=True, batch_size=500, num_proc=num_proc, desc="sft: token lengths", fn_kwargs={
        "tokenizer": tokenizer, "system": model.system_prompt, "kind": "sft", "edges": EDGES, "truncate": False})
    seconds = time.perf_counter() - start
    return {"rows": len(part), "seconds": seconds, "rows_per_s": len(part) / seconds, "tokenizer": model.name}


# ------------------------------------------------------------------------------------------------------------------
# The naive loop (in a spawned child)
# ------------------------------------------------------------------------------------------------------------------
def _naive_key(turns: list[dict[str, str]]) -> str:
    return "\x1e".join(f"{m['role']}\x1f{dedup_key(m['content'])}" for m in turns)


def naive_clean(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same cleaning, row by row in plain Python, with a set for dedup: the rows kept, in order."""
    min_chars, min_cn_ratio, allow_english = CLEAN_KW["min_chars"], CLEAN_KW["min_cn_ratio"], CLEAN_KW["allow_english"]
    seen, out = set(), []
    for row in records:
        turns = []
        for m in row["messages"]:
            text = normalise(m["content"])
            if len(text) < min_chars:
                break
            turns.append({"role": m["role"], "content": text})
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        if not any(m["role"] == "user" for m in turns):
            continue
        text = "\n".join(m["content"] for m in turns)
        lang, share = classify(text, row["lang_hint"]), script(text).han_share
        if lang == "other" or (share < min_cn_ratio and (lang == "zh" or not allow_english)):
            continue
        row_id = C.sha256(_naive_key(turns))
        if row_id in seen:
            continue
        seen.add(row_id)
        prompt = turns[:next(i for i, m in enumerate(turns) if m["role"] == "assistant")]
        group = row["group"] or C.sha256(_naive_key(prompt))
        out.append({"messages": turns, "id": row_id, "group": group, "lang": lang, "han_share": round(share, 4),
                    "eval": C.is_eval(group, CLEAN_KW["eval_fraction"]), "bucket": C.bucket_of(row["n_tokens"], EDGES)})
    return out


def _naive_child(files: list[str]) -> dict[str, Any]:
    from datasets import Dataset, concatenate_datasets

    start = time.perf_counter()
    records = concatenate_datasets([Dataset.from_file(f) for f in files]).to_list()
    read = time.perf_counter() - start
    start = time.perf_counter()
    kept = naive_clean(records)
    seconds = time.perf_counter() - start
    return {"rows": len(records), "read_s": read, "seconds": seconds, "rows_per_s": len(records) / seconds,
            "kept": len(kept), "buckets": _histogram(r["bucket"] for r in kept),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def naive(files: list[str]) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_naive_child, (files,))


# ------------------------------------------------------------------------------------------------------------------
# The run and its report
# ------------------------------------------------------------------------------------------------------------------
def run(n: int, num_proc: int, seed: int, sample: int) -> dict[str, Any]:
    """Generate, clean, tokenise a sample, run the naive loop; every number of the report."""
    import datasets
    import pyarrow

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        log.info("generating %d synthetic rows into %s", n, tmp)
        start = time.perf_counter()
        ds = generate(n, seed, Path(tmp), num_proc)
        io = {"rows": n, "seconds": time.perf_counter() - start, "arrow_bytes": ds.data.nbytes}
        log.info("cleaning path with %d workers", num_proc)
        path, kept = cleaning_path(ds, num_proc)
        log.info("tokenising a sample of %d rows", sample)
        tokens = tokenise(kept, sample, num_proc)
        log.info("naive loop in a child process")
        slow = naive([f["filename"] for f in ds.cache_files])
    io["naive_read_s"] = slow.pop("read_s")
    speedup = path["rows_per_s"] / slow["rows_per_s"]
    rss, same = path["peak_rss"], path["kept"] == slow["kept"] and path["buckets"] == slow["buckets"]
    targets = {"speedup": {"value": speedup, "pass": speedup >= TARGET_SPEEDUP},
               "peak_rss_main": {"value": rss["main"], "pass": rss["main"] <= TARGET_RSS},
               "peak_rss_worker": {"value": rss["worker_max"], "pass": rss["worker_max"] <= TARGET_RSS},
               "same_rows_as_naive": {"value": same, "pass": same}}
    machine = {"cpu_count": os.cpu_count(), "num_proc": num_proc, "python": platform.python_version(),
               "datasets": datasets.__version__, "pyarrow": pyarrow.__version__, "platform": platform.platform(),
               "rss": "psutil RSS sampled every 100 ms (map path); getrusage ru_maxrss (naive child)"}
    return {"rows": n, "seed": seed, "machine": machine, "file_io": io, "cleaning_path": path, "naive": slow,
            "tokenisation": tokens, "speedup": speedup, "targets": targets}


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB"


def table(res: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    io, path, slow, tok = res["file_io"], res["cleaning_path"], res["naive"], res["tokenisation"]
    rss = path["peak_rss"]
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in path["steps_s"].items())
    lines = [f"{'phase':<34}{'rows':>10}{'seconds':>10}{'rows/s':>11}  peak RSS",
             f"{'file I/O (generate + write Arrow)':<34}{io['rows']:>10}{io['seconds']:>10.1f}"
             f"{io['rows'] / io['seconds']:>11,.0f}  ({_gib(io['arrow_bytes'])} of Arrow)",
             f"{'cleaning path (K=' + str(res['machine']['num_proc']) + ')':<34}{path['rows']:>10}"
             f"{path['seconds']:>10.1f}{path['rows_per_s']:>11,.0f}  main {_gib(rss['main'])}, "
             f"worker max {_gib(rss['worker_max'])} (all {_gib(rss['workers_sum'])})",
             f"{'  ' + steps:<34}",
             f"{'tokenisation (' + tok['tokenizer'] + ', sample)':<34}{tok['rows']:>10}{tok['seconds']:>10.1f}"
             f"{tok['rows_per_s']:>11,.0f}",
             f"{'naive loop (1 process)':<34}{slow['rows']:>10}{slow['seconds']:>10.1f}{slow['rows_per_s']:>11,.0f}"
             f"  {_gib(slow['peak_rss'])} (ru_maxrss; read {io['naive_read_s']:.1f}s)",
             f"kept {path['kept']} rows (naive {slow['kept']}); buckets {path['buckets']}", ""]
    t = res["targets"]
    checks = [(f"speed-up >= {TARGET_SPEEDUP}x", f"{res['speedup']:.2f}x", t["speedup"]["pass"]),
              ("peak RSS main <= 2 GiB", _gib(rss["main"]), t["peak_rss_main"]["pass"]),
              ("peak RSS per worker <= 2 GiB", _gib(rss["worker_max"]), t["peak_rss_worker"]["pass"]),
              ("same rows and buckets as naive", "", t["same_rows_as_naive"]["pass"])]
    lines += [f"{name:<34}{value:>12}  {'PASS' if ok else 'FAIL <<<'}" for name, value, ok in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_data.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (default: 1000000)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="map workers (default: every core)")
    parser.add_argument("--out", default="outputs/bench/bench-data.json", help="the JSON report")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--token-sample", type=int, default=20_000, help="rows tokenised (default: 20000)")
    args = parser.parse_args(argv)
    setup_logging()
    res = run(args.rows, args.num_proc, args.seed, args.token_sample)
    out = repo_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(table(res))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
