"""Batched maps over Arrow files on every core, in bounded memory: the prepare stage's two per-row passes.

``datasets.map`` reads its input memory-mapped, and a mapped file's pages count in a process's resident memory for as
long as the file stays mapped: at a million rows every pass left about a GiB resident in each process that read it.
Here the Arrow files behind a dataset (IPC streams, as ``datasets`` writes them) are read as streams, one record batch
at a time; each worker process, forked from this one, takes a contiguous share of the rows and writes its own Arrow
file, and the result is those files, concatenated in order. The columns a map does not read are copied batch to batch
as Arrow (never turned into Python objects); the ones it returns are typed explicitly, so every batch and every worker
writes the same schema.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

COLUMN_ONLY = {"drop", "remove_column", "select", "replace_schema_metadata", "combine_chunks"}  # replays keeping rows


def files_of(table) -> tuple[list[tuple[str, int]], int, int] | None:
    """The Arrow files behind a table (a dataset's ``.data``), in row order with their row counts, and the window of
    their rows it holds (``start``, ``stop``); None where it is not a window of those files' rows (in memory,
    filtered, columns added)."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if isinstance(table, MemoryMappedTable):
        start, stop = 0, None
        for name, args, kwargs in table.replays:
            if name == "slice":
                offset, length = args[0], args[1] if len(args) > 1 else kwargs.get("length")
                end = stop if length is None else start + offset + length
                start, stop = start + offset, end if stop is None or end is None else min(stop, end)
            elif name not in COLUMN_ONLY:
                return None
        stop = table.num_rows if stop is None else stop  # (a sliced file has at least `stop` rows: enough to read)
        return [(table.path, stop)], start, stop
    if isinstance(table, ConcatenationTable) and all(len(row) == 1 for row in table.blocks):
        files = []
        for row in table.blocks:
            part = files_of(row[0])
            if part is None or part[1] != 0 or part[2] != sum(n for _, n in part[0]):
                return None
            files += part[0]
        return files, 0, sum(n for _, n in files)
    return None


def stream(files: Sequence[tuple[str, int]], start: int = 0, stop: int | None = None,
           columns: Sequence[str] | None = None) -> Iterator[Any]:
    """Rows ``[start, stop)`` of the files' concatenation as Arrow record batches, read without memory-mapping."""
    import pyarrow as pa

    stop = sum(n for _, n in files) if stop is None else stop
    at = 0
    for path, rows in files:
        if at + rows <= start or at >= stop:
            at += rows
            continue
        with pa.OSFile(path) as f:
            for batch in pa.ipc.open_stream(f):
                lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
                at += batch.num_rows
                if hi > lo:
                    part = batch.slice(lo, hi - lo)
                    yield part.select(list(columns)) if columns is not None else part
                if at >= stop:
                    return


def map_files(ds, fn: Callable[..., dict[str, list]], folder: Path, *, num_proc: int | None, batch_size: int,
              input_columns: Sequence[str], keep: Sequence[str], types: dict[str, Any],
              fn_kwargs: dict[str, Any]):
    """``fn(batch, **fn_kwargs)`` on every ``batch_size`` rows of ``ds`` (a dict of the ``input_columns`` as Python
    lists) → a dataset of the ``keep`` columns, as they were, and the columns ``fn`` returns, typed by ``types``
    (name → Arrow type). ``ds`` must be files only (:func:`files_of`; :func:`~pipeline.data.pool.compact` makes it so).
    ``num_proc`` > 1: that many worker processes, forked."""
    from datasets import Dataset, concatenate_datasets

    found = files_of(ds.data) if ds._indices is None else None
    if found is None:
        raise ValueError("map_files reads the Arrow files behind a dataset: compact it first (pool.compact)")
    files, first, _ = found
    folder.mkdir(parents=True, exist_ok=True)
    n, k = len(ds), max(1, min(num_proc or 1, len(ds)))
    cuts = [first + n * i // k for i in range(k + 1)]
    jobs = [(files, cuts[i], cuts[i + 1], fn, str(folder / f"part-{i:02d}.arrow"), batch_size, list(input_columns),
             list(keep), types, fn_kwargs) for i in range(k)]
    if k == 1:
        done = [_map_range(*jobs[0])]
    else:
        if "tokenizers" in __import__("sys").modules:  # a forked worker must not start the tokenizer's thread pool
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with multiprocessing.get_context("fork").Pool(k) as pool:
            done = pool.starmap(_map_range, jobs)
    parts = [Dataset.from_file(path) for path in done]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _map_range(files, start: int, stop: int, fn, out: str, batch_size: int, input_columns: list[str],
               keep: list[str], types: dict[str, Any], fn_kwargs: dict[str, Any]) -> str:
    """One worker's share: rows ``[start, stop)``, in batches of ``batch_size``, written to ``out``."""
    import pyarrow as pa

    writer = None
    try:
        for batch in rebatch(stream(files, start, stop, sorted(set(input_columns) | set(keep))), batch_size):
            made = fn(batch.select(input_columns).to_pydict(), **fn_kwargs)
            names = [c for c in keep if c not in made] + list(made)
            arrays = [batch.column(c) if c not in made else pa.chunked_array([pa.array(made[c], type=types[c])])
                      for c in names]
            table = pa.Table.from_arrays(arrays, names=names)
            if writer is None:
                writer = pa.ipc.new_stream(out, table.schema)
            writer.write_table(table)
        if writer is None:  # no rows: an empty file of the right schema
            with pa.OSFile(files[0][0]) as f:
                given = pa.ipc.open_stream(f).schema
            schema = pa.schema([given.field(c) for c in keep if c not in types] + [(c, t) for c, t in types.items()])
            writer = pa.ipc.new_stream(out, schema)
    finally:
        if writer is not None:
            writer.close()
    return out


def rebatch(batches: Iterator[Any], size: int) -> Iterator[Any]:
    """Record batches (or tables) regrouped into tables of ``size`` rows (the last one shorter)."""

    held, rows = [], 0
    for b in batches:
        while b.num_rows:
            take = min(size - rows, b.num_rows)
            held.append(b.slice(0, take))
            rows += take
            b = b.slice(take)
            if rows == size:
                yield _table(held)
                held, rows = [], 0
    if rows:
        yield _table(held)


def _table(parts: list) -> Any:
    import pyarrow as pa

    return pa.concat_tables([p if isinstance(p, pa.Table) else pa.Table.from_batches([p]) for p in parts])


def read(ds, columns: Sequence[str] | None = None) -> Iterator[Any] | None:
    """A dataset's rows in order as Arrow tables, streamed from its files (a selection's rows taken batch by batch);
    None where its table is not files (:func:`files_of`) or its selection is not in ascending order."""
    import numpy as np
    import pyarrow as pa

    found = files_of(ds.data)
    idx = None if ds._indices is None else np.asarray(ds._indices.column(0).to_numpy(zero_copy_only=False))
    if found is None or (idx is not None and not bool((idx[1:] > idx[:-1]).all())):  # (uint64: no np.diff)
        return None
    files, start, stop = found
    columns = list(ds.column_names if columns is None else columns)

    def tables() -> Iterator[Any]:
        at, j = 0, 0
        if idx is not None and not len(idx):
            return
        for batch in stream(files, start, stop, columns):
            n = batch.num_rows
            if idx is None:
                yield pa.Table.from_batches([batch])
            else:
                k = int(np.searchsorted(idx, at + n))
                if k > j:
                    yield pa.Table.from_batches([batch.take(pa.array(idx[j:k] - at))])
                j = k
                if j == len(idx):
                    return
            at += n

    return tables()


def arrow_column(ds, name: str):
    """One column as a single Arrow array, taken at the dataset's indices (no Python objects)."""
    col = ds.data.table.column(name)
    return (col if ds._indices is None else col.take(ds._indices.column(0))).combine_chunks()


def codes(values) -> tuple[Any, list]:
    """An Arrow column as (an int array of codes, the distinct values in order of first appearance)."""
    import numpy as np

    enc = values.dictionary_encode()
    return np.asarray(enc.indices.to_numpy(zero_copy_only=False)), enc.dictionary.to_pylist()


def value_counts(values) -> dict[str, int]:
    """How often each value occurs in an Arrow column."""
    return {v["values"]: v["counts"] for v in values.value_counts().to_pylist()}


def pair_counts(a, b) -> Counter:
    """Counter of (a, b) pairs over two aligned Arrow columns: a count per distinct pair, no loop over rows."""
    import numpy as np

    (ca, va), (cb, vb) = codes(a), codes(b)
    pairs, n = np.unique(ca.astype(np.int64) * max(1, len(vb)) + cb, return_counts=True)
    return Counter({(va[p // max(1, len(vb))], vb[p % max(1, len(vb))]): int(k)
                    for p, k in zip(pairs.tolist(), n.tolist(), strict=True)})
