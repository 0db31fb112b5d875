"""The row files of a source in its hub repository's layout, and reading their rows.

A file's subset and split come from its place in that layout: the split is the file name up to the first ``-`` or
``.`` (``data/train_prefs-00000-of-00001.parquet`` → ``train_prefs``, ``helpful-base/test.jsonl.gz`` → ``test``), the
subset is the folder above it unless that folder is ``data`` (``helpful-base``, ``askculinary``, ``Alpaca-7B``); a
source whose files are its subsets (COIG) takes the file stem (``Source.subset_is_file``). JSON lines, JSON arrays,
parquet, gzip of those and a tar of JSON files are read; unusable rows are counted by reason, never fatal.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.data.sources.base import RawFile, Source, SourceConfig

ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".tar.gz")


def _strip_suffix(name: str) -> str:
    for suffix in sorted(ROW_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def raw_file(path: Path, rel: str, source: Source) -> RawFile:
    parts = rel.split("/")
    stem = _strip_suffix(parts[-1])
    if source.subset_is_file:
        return RawFile(path, rel, stem, None)
    folder = parts[-2] if len(parts) > 1 and parts[-2] != "data" else None
    return RawFile(path, rel, folder, re.split(r"[-.]", stem, maxsplit=1)[0])


def list_files(root: Path, src: SourceConfig, source: Source) -> list[RawFile]:
    """The row files of a source under ``root`` (a folder in the hub layout, or one file), filtered by subsets/splits."""
    if root.is_file():
        rel = root.name if root.parent.name in ("", "data") else f"{root.parent.name}/{root.name}"
        found = [raw_file(root, rel, source)]
    else:
        found = [raw_file(p, p.relative_to(root).as_posix(), source) for p in sorted(root.rglob("*"))
                 if p.is_file() and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat)
                                        for pat in source.patterns)]
    return [f for f in found
            if (src.subsets is None or f.subset in src.subsets) and (src.splits is None or f.split in src.splits)]


MAX_ROW_BYTES = 1 << 20  # a JSON line over 1 MiB is no conversation (a dump, a base64 blob): counted, not parsed


def _lines(raw: bytes, bad: Counter) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_ROW_BYTES:
            bad["row over 1 MiB"] += 1
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad["non-UTF-8 bytes"] += 1
            continue
        except json.JSONDecodeError:
            bad["malformed JSON"] += 1
            continue
        if isinstance(row, dict):
            yield n, row
        else:
            bad["row is not a JSON object"] += 1


def read_rows(f: RawFile, bad: Counter) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) of one file: JSON lines, a JSON array, parquet, gzip of those, or a tar of JSON files."""
    name = f.path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(f.path)
        except (pa.ArrowException, OSError) as err:
            raise ConfigError([f"{f.path} is not a parquet file ({err}); replace it with the dataset's own file, or "
                               f"remove it"]) from None
        n = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if name.endswith(".tar.gz"):
        try:
            tar = tarfile.open(f.path, "r:gz")  # noqa: SIM115 - closed by the `with` below; opening is what fails
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ConfigError([f"{f.path} is not a gzipped tar ({err}); replace it with the dataset's own file, or "
                               f"remove it"]) from None
        with tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")),
                             key=lambda m: m.name)
            for n, m in enumerate(members, 1):
                yield from ((n, row) for _, row in _json_document(tar.extractfile(m).read(), bad))
        return
    try:
        raw = gzip.decompress(f.path.read_bytes()) if name.endswith(".gz") else f.path.read_bytes()
    except (OSError, EOFError) as err:  # not gzip, or cut short
        raise ConfigError([f"{f.path} cannot be read as {'gzip' if name.endswith('.gz') else 'a file'} ({err}); "
                           f"replace it with the dataset's own file, or remove it"]) from None
    yield from _json_document(raw, bad)


def _json_document(raw: bytes, bad: Counter) -> Iterator[tuple[int, dict[str, Any]]]:
    """A JSON array (or one object) when the text starts with ``[`` / parses whole, else JSON lines."""
    head = raw.lstrip()[:1]
    if head == b"[":
        try:
            rows = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield from _lines(raw, bad)  # a JSON-lines file whose first row is an array; counted row by row
            return
        for n, row in enumerate(rows, 1):
            if isinstance(row, dict):
                yield n, row
            else:
                bad["row is not a JSON object"] += 1
        return
    yield from _lines(raw, bad)
