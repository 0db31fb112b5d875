"""The prepare stage's data path on Arrow: records → cleaned, deduplicated, measured pools, counted per source.

Rows live in ``datasets.Dataset`` objects backed by Arrow files in a temporary folder (a million rows never sit in
Python lists); the per-row work runs in batches on every core (:mod:`pipeline.data.batches`: the files streamed, not
memory-mapped), and the counts between the passes are Arrow / numpy operations on columns. Every step records, per
source and row type, how many rows it removed and why (``steps``), which the manifest and data card show. Each pass
logs one line (rows, seconds, rows/s, CPU seconds), never a progress bar (:func:`mapped`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageError
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.data import batches, sources
from pipeline.data import clean as C
from pipeline.data.batches import arrow_column, codes, pair_counts, value_counts
from pipeline.data.sources import SOURCES
from pipeline.data.sources.files import list_files

log = logging.getLogger("pipeline.prepare")
STEPS = ("parsed", "hygiene", "language", "dedup", "decontam", "length")  # counts after each step, per source and type
STEP_OF = {C.EMPTY_TURN: "hygiene", C.SAME_ANSWER: "hygiene", C.OTHER_LANG: "language", C.LOW_HAN: "language",
           C.CONTAMINATED: "decontam",
           C.NO_FALLBACK: "language", C.DUPLICATE: "dedup", C.OVER_LENGTH: "length"}
TOKEN_BATCH = 1000  # rows per token-length batch (one tokenizer call); 4 000 cost a worker 0.15 GiB, same speed
WRITE_CHUNK = 20_000  # rows per write of a pool's lines


def cpu_seconds() -> float:
    """CPU time of this process and its ended children (map workers), user + system: on a shared machine a steadier
    measure of a step's work than its wall time."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))


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
    """A selection's rows as their own Arrow file beside its data, streamed from the files behind it
    (:func:`batches.read`, nothing memory-mapped), else written by Arrow takes. A map over an indices mapping gathers
    row by row (~0.3 ms a row: most of the map's time); over a plain table it slices."""
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
        for table in tables(ds, chunk=chunk):
            writer.write_table(table)
        writer.finalize()
    return Dataset.from_file(str(path))


def tables(ds, columns: list[str] | None = None, chunk: int = 50_000) -> Iterator[Any]:
    """A dataset's rows in order as Arrow tables of ``chunk`` rows: streamed from its files where it can be
    (:func:`batches.read`), else by takes from its memory-mapped table."""
    streamed = batches.read(ds, columns)
    if streamed is not None:
        yield from batches.rebatch(streamed, chunk)
        return
    for start in range(0, len(ds), chunk):
        table = arrow_rows(ds, start, min(len(ds), start + chunk))
        yield table if columns is None else table.select(columns)


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


def clean(part, kind: str, r: Resolved, steps: dict[str, dict], num_proc: int | None, index: Any = None,
          tokenizer: Callable[[], Any] | None = None):
    """Clean, filter, dedup, decontaminate, measure and split one row type; returns (train pool, eval pool).
    Each map reads a plain Arrow file (:func:`compact`), not a selection of one. The cleaning map also finds the eval
    tasks each row shares an n-gram with (from the dedup keys it computes anyway); rows are dropped by reason, then as
    duplicates, then as contaminated, counted at each step, and the rest written once for the token pass.
    ``tokenizer``: gives the model's tokenizer or its :class:`~pipeline.data.clean.Lengths` (called only when rows
    are left; default: load the tokenizer)."""
    import numpy as np

    from pipeline.models.loading import load_tokenizer

    cfg = r.cfg
    if len(part) == 0:
        return part, part
    cleaned = clean_rows(part, kind, cfg, num_proc, index)
    keep = _decontaminate(cleaned, _first_clean_rows(cleaned, kind, steps), kind, steps)
    kept = compact(cleaned.select(keep))
    del cleaned
    if len(kept) == 0:
        _summarise(None, kind, steps)
        return kept, kept
    tok = tokenizer() if tokenizer is not None else load_tokenizer(r.model)
    measured = count(kept, kind, tok, r.model.system_prompt, cfg, num_proc)
    del tok
    over = np.asarray(arrow_column(measured, "bucket")) >= len(cfg.buckets)
    _dropped(steps, kind, Counter({(s, C.OVER_LENGTH): n for s, n in value_counts(
        arrow_column(measured, "source").filter(over)).items()}))
    measured = measured.select(np.flatnonzero(~over))
    _summarise(measured, kind, steps)
    is_eval = np.asarray(arrow_column(measured, "eval"), dtype=bool)
    return measured.select(np.flatnonzero(~is_eval)), measured.select(np.flatnonzero(is_eval))


def clean_rows(part, kind: str, cfg: Any, num_proc: int | None, index: Any = None):
    """The cleaning map (:func:`clean.clean_sft` / :func:`clean.clean_pref`, with decontamination by ``index``) over
    one row type's records on ``num_proc`` workers: the cleaned texts and the added columns, the other columns kept
    as they are (``kind`` and ``lang_hint`` left out)."""
    import pyarrow as pa

    part = compact(part)
    texts = {t: part.features.arrow_schema.field(t).type for t in TEXTS[kind]}
    types = {**texts, **dict.fromkeys(("id", "group", "lang", "drop", "contaminated"), pa.string()),
             "han_share": pa.float64(), "eval": pa.bool_()}
    keep = [c for c in part.column_names if c not in (*TEXTS["sft"], *TEXTS["pref"], "kind", "lang_hint", *types)]
    return mapped(part, C.clean_sft if kind == "sft" else C.clean_pref, f"{kind}: clean", num_proc=num_proc,
                  batch_size=1000, input_columns=[*texts, "lang_hint", "group"], keep=keep, types=types, fn_kwargs={
                      "min_chars": cfg.filters.min_chars, "min_cn_ratio": cfg.filters.min_cn_ratio,
                      "allow_english": cfg.filters.allow_english_fallback, "eval_fraction": cfg.eval_fraction,
                      "index": index})


def _first_clean_rows(cleaned, kind: str, steps: dict[str, dict]):
    """The positions of rows without a drop reason, each the first of its id; the others counted per source and
    reason."""
    import numpy as np
    import pyarrow.compute as pc

    src, drop = arrow_column(cleaned, "source"), arrow_column(cleaned, "drop")
    _dropped(steps, kind, pair_counts(src, drop))
    keep = np.flatnonzero(np.asarray(pc.equal(drop, "").to_numpy(zero_copy_only=False)))
    ids, _ = codes(arrow_column(cleaned, "id").take(keep))
    first = np.zeros(len(keep), dtype=bool)
    first[np.unique(ids, return_index=True)[1]] = True  # the first row of each id, in pool order
    _dropped(steps, kind, Counter({(s, C.DUPLICATE): n for s, n in value_counts(src.take(keep[~first])).items()}))
    return keep[first]


def _decontaminate(cleaned, keep, kind: str, steps: dict[str, dict]):
    """Of the rows at ``keep``, those that share no n-gram with an eval item (the cleaning map's ``contaminated``);
    the others counted per source and per eval task."""
    import numpy as np
    import pyarrow.compute as pc

    hits = arrow_column(cleaned, "contaminated").take(keep)
    bad = np.flatnonzero(np.asarray(pc.not_equal(hits, "").to_numpy(zero_copy_only=False)))
    if not len(bad):
        return keep
    sources = arrow_column(cleaned, "source").take(keep[bad]).to_pylist()
    found = hits.take(bad).to_pylist()
    _dropped(steps, kind, Counter((s, C.CONTAMINATED) for s in sources))
    for s, h in zip(sources, found, strict=True):
        for task in filter(None, h.split(";")):
            by = steps[s][kind].setdefault("contaminated_by", {})
            by[task] = by.get(task, 0) + 1
    return np.delete(keep, bad)


def count(ds, kind: str, tokenizer: Any, system: str | None, cfg: Any, num_proc: int | None):
    """The token-length pass over every row: ``n_tokens``, ``bucket``, ``truncated`` (:func:`clean.count_tokens`)
    and ``line``, the row as prepare writes it (:func:`json_lines`), made by the workers beside the count; of the
    other columns only ``source``, ``lang`` and ``eval`` are kept. ``tokenizer``: a transformers tokenizer, or the
    :class:`~pipeline.data.clean.Lengths` made of it and ``system``; the workers, forked, use this process's
    ``Lengths`` (its tokenizer backend) as it is."""
    import pyarrow as pa

    kwargs = {"system": system, "kind": kind, "edges": list(cfg.buckets),
              "truncate": cfg.filters.over_length == "truncate"}
    lengths = tokenizer if isinstance(tokenizer, C.Lengths) else C.Lengths(tokenizer, system)
    del tokenizer  # the workers fork from this process: let the full tokenizer go first (Lengths keeps its backend)
    types = {"n_tokens": pa.int64(), "bucket": pa.int64(), "truncated": pa.bool_(), "line": pa.string()}
    return mapped(compact(ds), _count_batch, f"{kind}: token lengths", num_proc=num_proc, batch_size=TOKEN_BATCH,
                  input_columns=[*LINE_COLUMNS, *TEXTS[kind]], keep=["source", "lang", "eval"], types=types,
                  fn_kwargs={"tokenizer": lengths, **kwargs})


def mapped(ds, fn, desc: str, **kwargs: Any):
    """:func:`batches.map_files` into a new folder beside the dataset's files, logged as one line: rows, seconds,
    rows/s and CPU seconds (this process and its workers)."""
    import tempfile

    start, cpu = time.perf_counter(), cpu_seconds()
    folder = Path(tempfile.mkdtemp(prefix="map-", dir=Path(ds.cache_files[0]["filename"]).parent))
    out = batches.map_files(ds, fn, folder, **kwargs)
    seconds = time.perf_counter() - start
    log.info("%s: %d rows in %.1f s (%.0f rows/s; %.1f CPU s)", desc, len(ds), seconds, len(ds) / max(seconds, 1e-9),
             cpu_seconds() - cpu)
    return out


LINE_COLUMNS = ("id", "source", "source_id", "lang", "meta")  # what a written row holds besides its texts and counts
TEXTS = {"sft": ("messages",), "pref": ("prompt", "chosen", "rejected")}


def _count_batch(batch: dict[str, list], **kwargs: Any) -> dict[str, list]:
    """:func:`clean.count_tokens` on a batch, and each row's JSON line (:func:`json_lines`)."""
    out = C.count_tokens(batch, **kwargs)
    out["line"] = json_lines({**batch, **out}, kwargs["kind"])
    out.pop("messages" if kwargs["kind"] == "sft" else "prompt", None)  # the line holds them
    return out


def json_lines(batch: dict[str, list], kind: str) -> list[str]:
    """Each row as one line of the written pool: a JSON object in a fixed key order, UTF-8 text, newline-ended."""
    lines = []
    for i in range(len(batch["id"])):
        source = batch["source"][i]
        row = {"id": batch["id"][i], "source": source, "source_id": batch["source_id"][i], "lang": batch["lang"][i],
               "n_tokens": batch["n_tokens"][i], "bucket": batch["bucket"][i], "licence": SOURCES[source].licence,
               **{t: batch[t][i] for t in TEXTS[kind]}}
        if batch["truncated"][i]:
            row["truncated"] = True
        if batch["meta"][i]:
            row["meta"] = json.loads(batch["meta"][i])
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


def _summarise(ds, kind: str, steps: dict[str, dict]) -> None:
    """Counts after each step, kept rows, tokens and zh share per source (numpy sums over the Arrow columns)."""
    import numpy as np

    if ds is not None and len(ds):
        src, names = codes(arrow_column(ds, "source"))
        n = np.asarray(arrow_column(ds, "n_tokens"), dtype=np.int64)
        zh = np.asarray(arrow_column(ds, "lang").to_numpy(zero_copy_only=False) == "zh")
        ev, tr = (np.asarray(arrow_column(ds, c), dtype=bool) for c in ("eval", "truncated"))
        sums = {name: (int((src == c).sum()), int(ev[src == c].sum()), int(tr[src == c].sum()), int(n[src == c].sum()),
                       int(n[(src == c) & zh].sum())) for c, name in enumerate(names)}
    else:
        sums = {}
    for name, st in steps.items():
        if kind not in st:
            continue
        k = st[kind]
        left = k["parsed"]
        k["after"] = {"parsed": left}
        for step in STEPS[1:]:
            left -= sum(n for reason, n in k["dropped"].items() if STEP_OF[reason] == step)
            k["after"][step] = left
        rows, evals, truncated, tokens, zh_tokens = sums.get(name, (0, 0, 0, 0, 0))
        k.update(kept=rows, eval=evals, truncated=truncated, tokens=tokens, zh_tokens=zh_tokens,
                 zh_share=round(zh_tokens / tokens, 4) if tokens else 0.0,
                 dropped={reason: k["dropped"][reason] for reason in C.REASONS if reason in k["dropped"]})
        st["kept"] = st.get("kept", 0) + rows


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
    """One JSON object per line, UTF-8, fixed key order (each row's ``line`` from the token pass, written as the
    bytes Arrow holds them); returns rows, tokens and the file's SHA256."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    digest, rows, tokens = hashlib.sha256(), 0, 0
    with open(path, "wb") as f:
        for table in tables(ds, chunk=WRITE_CHUNK) if len(ds) else ():
            lines = table.column("line").combine_chunks() if "line" in table.column_names else \
                pa.array(json_lines(table.to_pydict(), kind), type=pa.string())
            _, offsets, data = lines.buffers()
            lo, hi = np.frombuffer(offsets, dtype=np.int32)[[lines.offset, lines.offset + len(lines)]].tolist()
            chunk = memoryview(data)[lo:hi]
            f.write(chunk)
            digest.update(chunk)
            rows += len(lines)
            tokens += pc.sum(table.column("n_tokens")).as_py() or 0
    return {"rows": rows, "tokens": tokens, "sha256": digest.hexdigest()}
