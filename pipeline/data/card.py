"""What prepare says about its output: the manifest (machine-readable), the data card (English + 中文) and charts.

Everything here is a function of the counts and the pools alone — no clock, no absolute path — so a rerun with the
same inputs and seed writes the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.resolved import Resolved
from pipeline.data.pool import column
from pipeline.data.sources import SOURCES

MANIFEST_VERSION = 1


def _pool_shares(ds) -> dict[str, Any]:
    tokens, langs, srcs = (column(ds, c) for c in ("n_tokens", "lang", "source"))
    by_lang, by_source = Counter(), Counter()
    for n, lang, src in zip(tokens, langs, srcs, strict=True):
        by_lang[lang] += n
        by_source[src] += n
    total = sum(tokens)
    return {"rows": len(tokens), "tokens": total, "zh_share": round(by_lang["zh"] / total, 4) if total else 0.0,
            "lang_tokens": dict(sorted(by_lang.items())), "source_tokens": dict(sorted(by_source.items()))}


def manifest(r: Resolved, built: Any, digests: dict[str, dict]) -> dict[str, Any]:
    cfg = r.cfg
    srcs = {}
    for s in cfg.sources:
        d = SOURCES[s.name]
        srcs[s.name] = {"licence": d.licence, "licence_source": d.licence_source, "noncommercial": d.noncommercial,
                        **built.steps[s.name]}
    return {
        "manifest_version": MANIFEST_VERSION,
        "model": r.model.name, "tokenizer": built.tokenizer, "system_prompt": r.model.system_prompt,
        "seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "buckets": list(cfg.buckets),
        "decontam": {"ngram": cfg.decontam.ngram, "eval_sets": built.eval_sets},
        "filters": dataclasses.asdict(cfg.filters), "mix": dataclasses.asdict(cfg.mix),
        "sources": srcs,
        "outputs": digests,
        "pool": {kind: _pool_shares(built.pools[f"{kind}.jsonl"]) for kind in ("sft", "pref")},
        "mix_epoch0": built.mix,
        "licence": {"noncommercial": bool(built.noncommercial), "sources": built.noncommercial},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _source_table(m: dict[str, Any], zh: bool) -> list[str]:
    head = ("| 数据源 | 许可 | 读取行 | 解析时跳过 | SFT 保留 | 偏好对保留 | 词元 | 中文词元占比 |" if zh else
            "| source | licence | rows read | skipped at parse | SFT kept | pairs kept | tokens | zh token share |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in m["sources"].items():
        sft, pref = s.get("sft", {}), s.get("pref", {})
        tokens = sft.get("tokens", 0) + pref.get("tokens", 0)
        zh = sft.get("zh_tokens", 0) + pref.get("zh_tokens", 0)
        lines.append(f"| {name} | {s['licence']}{' ⚠' if s['noncommercial'] else ''} | {s.get('rows_read', 0)} | "
                     f"{sum(s.get('skipped', {}).values())} | {sft.get('kept', '–')} | {pref.get('kept', '–')} | "
                     f"{tokens} | {_pct(zh / tokens) if tokens else '–'} |")
    return lines


def _steps_table(m: dict[str, Any], zh: bool) -> list[str]:
    head = ("| 数据源 / 类型 | 解析 | 清洗后 | 语言过滤后 | 去重后 | 去污染后 | 长度过滤后 | 其中评测 |" if zh else
            "| source / type | parsed | after hygiene | after language | after dedup | after decontam | after length "
            "| of which eval |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in m["sources"].items():
        for kind in ("sft", "pref"):
            k = s.get(kind)
            if not k or "after" not in k:
                continue
            a = k["after"]
            lines.append(f"| {name} / {kind} | {a['parsed']} | {a['hygiene']} | {a['language']} | {a['dedup']} | "
                         f"{a['decontam']} | {a['length']} | {k['eval']} |")
    return lines


def _reasons(m: dict[str, Any]) -> list[str]:
    lines = []
    for name, s in m["sources"].items():
        bits = [f"{reason}: {n}" for reason, n in s.get("skipped", {}).items()]
        for kind in ("sft", "pref"):
            bits += [f"{kind} {reason}: {n}" for reason, n in s.get(kind, {}).get("dropped", {}).items()]
            bits += [f"{kind} overlapping {task}: {n}" for task, n in s.get(kind, {}).get("contaminated_by", {}).items()]
        if bits:
            lines.append(f"- **{name}** — " + "; ".join(bits))
    return lines or ["- (none)"]


def _mix_lines(m: dict[str, Any], zh: bool) -> list[str]:
    lines = []
    for kind, rep in m["mix_epoch0"].items():
        pool = m["pool"][kind]
        short = rep.get("shortfall")
        if zh:
            line = (f"- **{kind}**：池 {pool['rows']} 行 / {pool['tokens']} 词元，中文占比 {_pct(pool['zh_share'])}；"
                    f"第 0 轮混合 {rep['rows']} 行 / {rep['tokens']} 词元，中文占比 {_pct(rep['zh_share'])}"
                    f"（目标 ≥ {_pct(rep['target_zh_share'])}）")
            if short:
                line += f"。**不足**：可达 {_pct(short['achievable'])}，处理方式 `{short['action']}`"
        else:
            line = (f"- **{kind}**: pool {pool['rows']} rows / {pool['tokens']} tokens, zh share "
                    f"{_pct(pool['zh_share'])}; epoch-0 mix {rep['rows']} rows / {rep['tokens']} tokens, zh share "
                    f"{_pct(rep['zh_share'])} (target ≥ {_pct(rep['target_zh_share'])})")
            if short:
                line += (f". **Shortfall**: achievable {_pct(short['achievable'])}, action `{short['action']}`, "
                         f"{short['non_zh_tokens_dropped']} non-zh tokens left out")
        lines.append(line)
    return lines


def data_card(m: dict[str, Any]) -> str:
    outputs = "\n".join(f"| `{name}` | {o['rows']} | {o['tokens']} | `{o['sha256'][:16]}…` |"
                        for name, o in m["outputs"].items())
    nc = m["licence"]["sources"]
    warn_en = (f"> **Licence warning**: {', '.join(nc)} carry non-commercial or unclear terms; this output (and "
               f"models trained on it) is for research use. The MLflow run is tagged `licence.noncommercial=true`."
               if nc else "> All sources in this output carry permissive licences.")
    warn_zh = (f"> **许可提示**：{', '.join(nc)} 的条款为非商业或不明确；本输出（及用其训练的模型）仅供研究使用。"
               f"MLflow 运行已标记 `licence.noncommercial=true`。" if nc else "> 本输出的所有数据源均为宽松许可。")
    buckets = " / ".join(f"≤{b}" for b in m["buckets"])
    return "\n".join([
        "# Data card — zh-align prepare", "",
        f"Tokenizer `{m['tokenizer']}` (model `{m['model']}`), chat template with the model's system prompt; "
        f"buckets {buckets} tokens (`bucket` in each row is the index); seed {m['seed']}; eval split "
        f"{_pct(m['eval_fraction'])} of trees / posts / prompts. Decontaminated against "
        f"{', '.join(m['decontam']['eval_sets']) or 'nothing (decontam off)'} "
        f"({m['decontam']['ngram']}-grams). Counts below are this run's, not estimates.", "",
        warn_en, "",
        "## Sources", "", *_source_table(m, zh=False), "",
        "## Rows after each step", "", *_steps_table(m, zh=False), "",
        "## Why rows were removed", "", *_reasons(m), "",
        "## Mix (epoch 0 of the sampler)", "", *_mix_lines(m, zh=False), "",
        "## Files", "", "| file | rows | tokens | sha256 |", "|---|---:|---:|---|", outputs, "",
        "Charts: `token_lengths.png` (token lengths by bucket), `shares.png` (language and source shares of the pool "
        "and of the epoch-0 mix).", "",
        "# 数据卡 — zh-align 数据准备", "",
        f"分词器 `{m['tokenizer']}`（模型 `{m['model']}`），按聊天模板并含系统提示计算长度；长度分桶 {buckets} 词元"
        f"（每行的 `bucket` 为桶序号）；随机种子 {m['seed']}；"
        f"按对话树 / 帖子 / 提示划出 {_pct(m['eval_fraction'])} 作评测集。以下均为本次运行的实际计数。", "",
        warn_zh, "",
        "## 数据源", "", *_source_table(m, zh=True), "",
        "## 各步骤后的行数", "", *_steps_table(m, zh=True), "",
        "## 混合（采样器第 0 轮）", "", *_mix_lines(m, zh=True), "",
    ])


def charts(built: Any, m: dict[str, Any], out: Path) -> list[Path]:
    """token_lengths.png and shares.png, rendered without any timestamp or version in the file."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = m["buckets"]
    labels = [f"{lo + 1}–{hi}" for lo, hi in zip([0, *edges], edges, strict=False)]
    bins = sorted({round(x) for x in np.geomspace(16, edges[-1], 49)} | set(edges))  # edges are bin edges too
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind in zip(axes, ("sft", "pref"), strict=True):
        pool = built.pools[f"{kind}.jsonl"]
        n, b = np.asarray(column(pool, "n_tokens"), dtype=int), np.asarray(column(pool, "bucket"), dtype=int)
        ax.hist([n[b == i] for i in range(len(edges))], bins=bins, stacked=True, label=labels)
        ax.set_xscale("log")
        for e in edges:
            ax.axvline(e, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{kind}: token lengths ({len(n)} rows)")
        ax.set_xlabel("tokens (chat template + system prompt)")
        ax.set_ylabel("rows")
        ax.legend(title="bucket", fontsize=8)
    fig.tight_layout()
    paths = [out / "token_lengths.png"]
    fig.savefig(paths[0], dpi=100, metadata={"Software": None})
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for row, kind in enumerate(("sft", "pref")):
        pool, mix = m["pool"][kind], m["mix_epoch0"][kind]
        mix_lang = {"zh": mix["zh_tokens"], "non-zh": mix["tokens"] - mix["zh_tokens"]}
        pool_lang = {"zh": pool["lang_tokens"].get("zh", 0),
                     "non-zh": pool["tokens"] - pool["lang_tokens"].get("zh", 0)}
        _bars(axes[row][0], pool_lang, mix_lang, f"{kind}: language share of tokens")
        _bars(axes[row][1], pool["source_tokens"], {s: v["tokens"] for s, v in mix["sources"].items()},
              f"{kind}: source share of tokens")
    fig.tight_layout()
    paths.append(out / "shares.png")
    fig.savefig(paths[1], dpi=100, metadata={"Software": None})
    plt.close(fig)
    return paths


def _bars(ax: Any, pool: dict[str, int], mix: dict[str, int], title: str) -> None:
    names = sorted(set(pool) | set(mix))
    tp, tm = sum(pool.values()) or 1, sum(mix.values()) or 1
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [pool.get(k, 0) / tp for k in names], width=0.4, label="pool")
    ax.bar([x + 0.2 for x in xs], [mix.get(k, 0) / tm for k in names], width=0.4, label="epoch-0 mix")
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
