"""The prepare stage's data path on Arrow: records → cleaned, deduplicated, measured pools, counted per source.

Rows live in ``datasets.Dataset`` objects backed by Arrow files in a temporary folder (memory-mapped, so a million
rows do not sit in Python lists); the per-row work runs in ``Dataset.map(batched=True, num_proc=…)``. Every step
records, per source and row type, how many rows it removed and why (``steps``), which the manifest and data card show.
Progress bars are drawn only on a terminal; in a log each step is one line (:func:`progress_bars`, :func:`map_step`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
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
TOKEN_BATCH = 4000  # rows per token-length batch: one tokenizer call each, on every core's worker


def progress_bars() -> bool:
    """Whether datasets draws its progress bars: only when stderr (where they go) is a terminal. In a log file, CI or
    a piped ``mlflow run`` they are turned off, since each update would be a line; :func:`map_step` logs one line per
    step instead."""
    from datasets.utils.logging import disable_progress_bar, is_progress_bar_enabled

    if not sys.stderr.isatty():
        disable_progress_bar()
    return is_progress_bar_enabled()


def map_step(ds, fn, desc: str, **kwargs: Any):
    """``ds.map(fn, batched=True, …)``; without progress bars, one log line with its rows, seconds and rows/s."""
    start, bars = time.perf_counter(), progress_bars()
    out = ds.map(fn, batched=True, desc=desc, **kwargs)
    if not bars:
        seconds = time.perf_counter() - start
        log.info("%s: %d rows in %.1f s (%.0f rows/s)", desc, len(ds), seconds, len(ds) / max(seconds, 1e-9))
    return out


def column(ds, name: str) -> list:
    """One column as a Python list, taken from the Arrow table at the dataset's indices (``ds[name]`` reads row by
    row, and datasets' own gather builds one slice per row: minutes at a million rows)."""
    if not len(ds):
        return []
    col = ds.data.table.column(name)
    return (col if ds._indices is None else col.take(ds._indices.column(0))).to_pylist()


def arrow_rows(ds, start: int, stop: int):
    """Rows ``[start, stop)`` of a dataset as one Arrow table: one take (not a slice per row) from the window of the
    table those rows lie in (a take over every chunk of a million-row table costs ~0.1 s however few rows it takes)."""
    import pyarrow.compute as pc

    table = ds.data.table
    if ds._indices is None:
        return table.slice(start, stop - start)
    idx = ds._indices.column(0).slice(start, max(0, stop - start))
    if len(idx) == 0:
        return table.slice(0, 0)
    lo, hi = (v.as_py() for v in pc.min_max(idx).values())
    return table.slice(lo, hi - lo + 1).take(pc.subtract(idx, lo))


def compact(ds, chunk: int = 50_000):
    """A selection's rows as their own Arrow file beside its data, written by Arrow takes. A map over an indices
    mapping gathers row by row (~0.3 ms a row: most of the map's time); over a plain table it slices."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    if ds._indices is None or not len(ds):
        return ds
    if not ds.cache_files:  # in memory: nowhere to write beside it
        return ds.flatten_indices()
    path = Path(ds.cache_files[0]["filename"]).parent / f"compact-{ds._fingerprint}.arrow"
    if path.is_file():  # the same selection, compacted before (its file may be mapped: never rewrite it)
        return Dataset.from_file(str(path))
    with ArrowWriter(features=ds.features, path=str(path)) as writer:
        for start in range(0, len(ds), chunk):
            writer.write_table(arrow_rows(ds, start, min(len(ds), start + chunk)))
        writer.finalize()
    return Dataset.from_file(str(path))


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

    start = time.perf_counter()
    records = (rec for s, files, tally in plans for rec in sources.records(s, files, tally))
    ds = Dataset.from_file(str(write_arrow(records, tmp / "arrow" / "records.arrow")))
    log.info("read: %d records from %d sources in %.1f s", len(ds), len(plans), time.perf_counter() - start)
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


def write_arrow(records: Iterator[dict[str, Any]], path: Path, chunk: int = 10_000) -> Path:
    """Records → one Arrow file in the parsed-record schema, ``chunk`` rows per Arrow table built at once (``datasets``'
    own writer encodes example by example: most of the read time at a million rows)."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    schema = features().arrow_schema
    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features(), path=str(path)) as writer:
        while rows := list(itertools.islice(records, chunk)):
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        writer.finalize()
    return path


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
    """Clean, filter, dedup, decontaminate, measure and split one row type; returns (train pool, eval pool).
    Each map reads a plain Arrow file (:func:`compact`), not a selection of one."""
    import numpy as np

    from pipeline.models.loading import load_tokenizer

    cfg = r.cfg
    if len(part) == 0:
        return part, part
    fn = C.clean_sft if kind == "sft" else C.clean_pref
    unused = ["kind", "lang_hint"] + (["prompt", "chosen", "rejected"] if kind == "sft" else ["messages"])
    cleaned = map_step(compact(part), fn, f"{kind}: clean", batch_size=1000, num_proc=num_proc, remove_columns=unused,
                       fn_kwargs={
                           "min_chars": cfg.filters.min_chars, "min_cn_ratio": cfg.filters.min_cn_ratio,
                           "allow_english": cfg.filters.allow_english_fallback, "eval_fraction": cfg.eval_fraction})
    kept = compact(_decontaminate(_first_clean_rows(cleaned, kind, steps), kind, index, steps, num_proc))
    if len(kept) == 0:
        _summarise(None, kind, steps)
        return kept, kept
    measured = count(kept, kind, load_tokenizer(r.model), r.model.system_prompt, cfg, num_proc)
    over = np.asarray(column(measured, "bucket")) >= len(cfg.buckets)
    _dropped(steps, kind, Counter((s, C.OVER_LENGTH) for s, o in zip(column(measured, "source"), over, strict=True)
                                  if o))
    measured = measured.select(np.flatnonzero(~over))
    _summarise(measured, kind, steps)
    is_eval = np.asarray(column(measured, "eval"), dtype=bool)
    return measured.select(np.flatnonzero(~is_eval)), measured.select(np.flatnonzero(is_eval))


def _first_clean_rows(cleaned, kind: str, steps: dict[str, dict]):
    """The rows without a drop reason, each the first of its id; the others counted per source and reason."""
    import numpy as np

    src, drop = column(cleaned, "source"), column(cleaned, "drop")
    _dropped(steps, kind, Counter(zip(src, drop, strict=True)))
    keep = np.flatnonzero(np.asarray(drop) == "")
    firsts = C.first_seen(column(cleaned.select(keep), "id"))
    _dropped(steps, kind, Counter((src[i], C.DUPLICATE) for i, f in zip(keep, firsts, strict=True) if not f))
    return compact(cleaned.select(keep[np.asarray(firsts, dtype=bool)]))


def count(ds, kind: str, tokenizer: Any, system: str | None, cfg: Any, num_proc: int | None):
    """The token-length pass over every row: ``n_tokens``, ``bucket``, ``truncated`` (:func:`clean.count_tokens`).
    The workers get the tokenizer's :class:`~pipeline.data.clean.Lengths`, and the fingerprint is given rather than
    hashed (datasets would pickle the whole tokenizer to hash it: seconds per map)."""
    from datasets.fingerprint import Hasher

    kwargs = {"system": system, "kind": kind, "edges": list(cfg.buckets),
              "truncate": cfg.filters.over_length == "truncate"}
    which = (tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, type(tokenizer).__name__)
    lengths = C.Lengths(tokenizer, system)
    del tokenizer  # the workers fork from this process: let the full tokenizer go first (Lengths keeps its backend)
    columns = ["messages"] if kind == "sft" else ["prompt", "chosen", "rejected"]
    return map_step(ds, _count_columns, f"{kind}: token lengths", batch_size=TOKEN_BATCH, num_proc=num_proc,
                    input_columns=columns, fn_kwargs={"names": columns, "tokenizer": lengths, **kwargs},
                    writer_batch_size=TOKEN_BATCH, new_fingerprint=Hasher.hash([ds._fingerprint, "count", which, kwargs]))


def _count_columns(*columns: list, names: list[str], **kwargs: Any) -> dict[str, list]:
    """:func:`clean.count_tokens` on the map's ``input_columns``: the conversations it reads are not written back
    from Python (re-encoding them row by row cost as much as counting their tokens); the other columns stay Arrow."""
    return C.count_tokens(dict(zip(names, columns, strict=True)), **kwargs)


def _decontaminate(ds, kind: str, index: Any, steps: dict[str, dict], num_proc: int | None):
    """Drop rows that share an n-gram with an eval item; count them per source and per eval task."""
    import numpy as np

    from pipeline.data.decontam import batch_hits

    if index is None or len(ds) == 0:
        return ds
    hits = column(map_step(ds, batch_hits, f"{kind}: decontam", batch_size=1000, num_proc=num_proc,
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
        for start in range(0, len(ds), 2000):
            batch = arrow_rows(ds, start, min(len(ds), start + 2000)).to_pydict()
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
