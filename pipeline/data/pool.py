"""The prepare stage's data path on Arrow: records → cleaned, deduplicated, measured pools, counted per source.

Rows live in ``datasets.Dataset`` objects backed by Arrow files in a temporary folder (memory-mapped, so a million
rows do not sit in Python lists); the per-row work runs in ``Dataset.map(batched=True, num_proc=…)``. Every step
records, per source and row type, how many rows it removed and why (``steps``), which the manifest and data card show.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageError
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.data import clean as C
from pipeline.data import sources
from pipeline.data.sources import SOURCES
from pipeline.data.sources.files import list_files

log = logging.getLogger("pipeline.prepare")
STEPS = ("parsed", "hygiene", "language", "dedup", "decontam", "length")  # counts after each step, per source and type
STEP_OF = {C.EMPTY_TURN: "hygiene", C.SAME_ANSWER: "hygiene", C.OTHER_LANG: "language", C.LOW_HAN: "language",
           C.CONTAMINATED: "decontam",
           C.NO_FALLBACK: "language", C.DUPLICATE: "dedup", C.OVER_LENGTH: "length"}


def column(ds, name: str) -> list:
    """One column as a Python list, read as Arrow (``ds[name]`` reads row by row: minutes at a million rows)."""
    return ds.with_format("arrow")[name].to_pylist() if len(ds) else []


def features():
    """The Arrow schema of parsed records (both row types in one table)."""
    from datasets import Features, List, Value

    turns = List({"role": Value("string"), "content": Value("string")})
    return Features({"kind": Value("string"), "messages": turns, "prompt": turns, "chosen": turns,
                     "rejected": turns, "source_id": Value("string"), "lang_hint": Value("string"),
                     "group": Value("string"), "meta": Value("string"), "source": Value("string")})


def read_sources(cfg: Any, steps: dict[str, dict], tmp: Path):
    """Every source's records in one Arrow dataset, in the configured source order (the dedup priority)."""
    from datasets import Dataset

    plans = []
    for s in cfg.sources:
        root = repo_path(s.path) if s.path else sources.download(s)
        files = list_files(root, s, SOURCES[s.name])
        if not files:
            raise StageError(f"source {s.name}: no row files under {root} (expected the hub layout, e.g. "
                             f"{', '.join(SOURCES[s.name].patterns[:2])}"
                             + (f"; subsets {s.subsets}" if s.subsets else "")
                             + (f"; splits {s.splits}" if s.splits else "") + ")")
        steps[s.name].update(hub_id=s.hub_id, revision=s.revision, path=s.path,
                             files=[f.rel for f in files])
        plans.append((s, files, sources.Tally()))

    def generate():
        for s, files, tally in plans:
            yield from sources.records(s, files, tally)

    ds = Dataset.from_generator(generate, features=features(), cache_dir=str(tmp / "arrow"))
    parsed = Counter(zip(column(ds, "source"), column(ds, "kind"), strict=True))
    for s, _, tally in plans:
        st = steps[s.name]
        st["rows_read"] = tally.read
        st["skipped"] = {k: tally.skipped[k] for k in sorted(tally.skipped)}
        for kind in SOURCES[s.name].kinds:
            st[kind] = {"parsed": parsed[(s.name, kind)], "dropped": {}}
        if not any(parsed[(s.name, k)] for k in ("sft", "pref")):
            log.warning("source %s gave 0 rows (%d rows read; skipped: %s)", s.name, tally.read,
                        st["skipped"] or "none")
    return ds


def of_kind(records, kind: str):
    import numpy as np
    import pyarrow.compute as pc

    return records.select(np.flatnonzero(pc.equal(records.data.column("kind"), kind).to_numpy(zero_copy_only=False)))


def _dropped(steps: dict[str, dict], kind: str, pairs: Counter) -> None:
    for (source, reason), n in sorted(pairs.items()):
        if reason:
            d = steps[source][kind]["dropped"]
            d[reason] = d.get(reason, 0) + n


def clean(part, kind: str, r: Resolved, steps: dict[str, dict], num_proc: int | None, index: Any = None):
    """Clean, filter, dedup, decontaminate, measure and split one row type; returns (train pool, eval pool)."""
    import numpy as np

    cfg = r.cfg
    if len(part) == 0:
        return part, part
    fn = C.clean_sft if kind == "sft" else C.clean_pref
    unused = ["kind", "lang_hint"] + (["prompt", "chosen", "rejected"] if kind == "sft" else ["messages"])
    cleaned = part.map(fn, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=unused,
                       desc=f"{kind}: clean", fn_kwargs={
                           "min_chars": cfg.filters.min_chars, "min_cn_ratio": cfg.filters.min_cn_ratio,
                           "allow_english": cfg.filters.allow_english_fallback, "eval_fraction": cfg.eval_fraction})
    src, drop = column(cleaned, "source"), column(cleaned, "drop")
    _dropped(steps, kind, Counter(zip(src, drop, strict=True)))
    keep = np.flatnonzero(np.asarray(drop) == "")
    firsts = C.first_seen(column(cleaned.select(keep), "id"))
    _dropped(steps, kind, Counter((src[i], C.DUPLICATE) for i, f in zip(keep, firsts, strict=True) if not f))
    kept = _decontaminate(cleaned.select(keep[np.asarray(firsts, dtype=bool)]), kind, index, steps, num_proc)
    if len(kept) == 0:
        _summarise(None, kind, steps)
        return kept, kept
    from pipeline.models.loading import load_tokenizer

    measured = kept.map(C.count_tokens, batched=True, batch_size=500, num_proc=num_proc,
                        desc=f"{kind}: token lengths", fn_kwargs={
                            "tokenizer": load_tokenizer(r.model), "system": r.model.system_prompt, "kind": kind,
                            "edges": list(cfg.buckets), "truncate": cfg.filters.over_length == "truncate"})
    over = np.asarray(column(measured, "bucket")) >= len(cfg.buckets)
    _dropped(steps, kind, Counter((s, C.OVER_LENGTH) for s, o in zip(column(measured, "source"), over, strict=True)
                                  if o))
    measured = measured.select(np.flatnonzero(~over))
    _summarise(measured, kind, steps)
    is_eval = np.asarray(column(measured, "eval"), dtype=bool)
    return measured.select(np.flatnonzero(~is_eval)), measured.select(np.flatnonzero(is_eval))


def _decontaminate(ds, kind: str, index: Any, steps: dict[str, dict], num_proc: int | None):
    """Drop rows that share an n-gram with an eval item; count them per source and per eval task."""
    import numpy as np

    from pipeline.data.decontam import batch_hits

    if index is None or len(ds) == 0:
        return ds
    hits = column(ds.map(batch_hits, batched=True, batch_size=1000, num_proc=num_proc, desc=f"{kind}: decontam",
                         fn_kwargs={"index": index, "kind": kind}, remove_columns=ds.column_names), "contaminated")
    sources = column(ds, "source")
    _dropped(steps, kind, Counter((s, C.CONTAMINATED) for s, h in zip(sources, hits, strict=True) if h))
    for s, h in zip(sources, hits, strict=True):
        for task in filter(None, h.split(";")):
            by = steps[s][kind].setdefault("contaminated_by", {})
            by[task] = by.get(task, 0) + 1
    return ds.select(np.flatnonzero(np.asarray(hits) == ""))


def _summarise(ds, kind: str, steps: dict[str, dict]) -> None:
    """Counts after each step, kept rows, tokens and zh share per source."""
    cols = {c: column(ds, c) if ds is not None else [] for c in ("source", "lang", "n_tokens", "eval", "truncated")}
    for name, st in steps.items():
        if kind not in st:
            continue
        k = st[kind]
        left = k["parsed"]
        k["after"] = {"parsed": left}
        for step in STEPS[1:]:
            left -= sum(n for reason, n in k["dropped"].items() if STEP_OF[reason] == step)
            k["after"][step] = left
        mine = [i for i, s in enumerate(cols["source"]) if s == name]
        tokens = sum(cols["n_tokens"][i] for i in mine)
        zh = sum(cols["n_tokens"][i] for i in mine if cols["lang"][i] == "zh")
        k.update(kept=len(mine), eval=sum(1 for i in mine if cols["eval"][i]),
                 truncated=sum(1 for i in mine if cols["truncated"][i]), tokens=tokens, zh_tokens=zh,
                 zh_share=round(zh / tokens, 4) if tokens else 0.0,
                 dropped={reason: k["dropped"][reason] for reason in C.REASONS if reason in k["dropped"]})
        st["kept"] = st.get("kept", 0) + len(mine)


def empty_reason(kind: str, steps: dict[str, dict]) -> str:
    """The error for an empty pool, naming the step that removed the last rows."""
    after = Counter()
    for st in steps.values():
        for step, n in st.get(kind, {}).get("after", {}).items():
            after[step] += n
    if not any(kind in st for st in steps.values()):
        return (f"no source of this config gives {kind} rows; add one "
                f"({', '.join(n for n, d in SOURCES.items() if kind in d.kinds)})")
    parsed = sum(st[kind]["parsed"] for st in steps.values() if kind in st)
    if parsed == 0:
        return f"the {kind} sources gave 0 parseable rows (see `skipped` per source in the log); check `path:` / files"
    step = next((s for s in STEPS if after[s] == 0), "eval split")
    if step == "eval split":
        return f"every {kind} row went to the eval split; lower `eval_fraction`"
    hint = {"hygiene": "every turn was empty or shorter than `filters.min_chars`",
            "language": "lower `filters.min_cn_ratio` or set `filters.allow_english_fallback: true`",
            "length": "raise the last of `buckets` or set `filters.over_length: truncate`"}.get(step, "")
    return f"the {kind} pool is empty: the {step} step removed all {parsed} parsed rows ({hint})"


def epoch0(ds, kind: str, cfg: Any) -> dict[str, Any]:
    """The sampler's report for epoch 0 of the configured mix over this pool."""
    from pipeline.data.sampler import for_pool

    columns = {c: column(ds, c) for c in ("lang", "source", "bucket", "n_tokens")}
    return for_pool(columns, cfg.mix, kind, len(cfg.buckets), cfg.seed).report(1.0)


def write_jsonl(ds, path: Path, kind: str) -> dict[str, Any]:
    """One JSON object per line, UTF-8, fixed key order; returns rows, tokens and the file's SHA256."""
    digest, rows, tokens = hashlib.sha256(), 0, 0
    texts = ("messages",) if kind == "sft" else ("prompt", "chosen", "rejected")
    with open(path, "wb") as f:
        for batch in ds.iter(batch_size=2000):
            for i in range(len(batch["id"])):
                source = batch["source"][i]
                row = {"id": batch["id"][i], "source": source, "source_id": batch["source_id"][i],
                       "lang": batch["lang"][i], "n_tokens": batch["n_tokens"][i], "bucket": batch["bucket"][i],
                       "licence": SOURCES[source].licence, **{t: batch[t][i] for t in texts}}
                if batch["truncated"][i]:
                    row["truncated"] = True
                if batch["meta"][i]:
                    row["meta"] = json.loads(batch["meta"][i])
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                f.write(line)
                digest.update(line)
                rows += 1
                tokens += row["n_tokens"]
    return {"rows": rows, "tokens": tokens, "sha256": digest.hexdigest()}
