"""The seven datasets, each declared once in its own module (``pipeline/data/sources/<name>.py``: parser, file
layout, options, licence, inline sample check), and reading them: from the hub at the pinned revision or a local copy
in the hub's layout (``path:``), so the same parser runs on both.

To add a source: write its module with a ``SOURCE = Source(...)``, add it to :data:`SOURCES`, ship a few rows in
``pipeline/assets/samples/<name>/`` and a fixture in ``tests/fixtures/<name>/`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.strict import Key, close
from pipeline.data.sources import coig, coig_pc_core, hh_rlhf, oasst1, pku_saferlhf, shp, ultrafeedback_binarized
from pipeline.data.sources.base import OPTIONS, BadRow, RawFile, Record, RowStream, Source, SourceConfig, SourceError
from pipeline.data.sources.files import read_rows

SOURCES: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in (
    oasst1, coig, coig_pc_core, ultrafeedback_binarized, hh_rlhf, shp, pku_saferlhf)}


def check(src: SourceConfig, key: Key) -> list[str]:
    """The rules of one configured source: a declared name, only the options its parser reads, no refused subset."""
    source = SOURCES.get(src.name)
    if source is None:
        return [f"{key('name')}: expected one of {', '.join(repr(n) for n in SOURCES)}; got {src.name!r}"
                + close(src.name, SOURCES)]
    problems = [f"{key(opt)} is read only for {' / '.join(n for n, s in SOURCES.items() if opt in s.options)}, "
                f"not {src.name}; remove it" for opt in OPTIONS if getattr(src, opt) is not None and opt not in
                source.options]
    for subset in src.subsets or []:
        if subset in source.refused_subsets:
            problems.append(f"{key('subsets')} names {subset}, which {source.refused_subsets[subset]}; remove it")
    if src.max_rows is not None and src.max_rows < 1:
        problems.append(f"{key('max_rows')} must be at least 1 or null; got {src.max_rows}")
    return problems


@dataclass
class Tally:
    """What reading one source saw: rows read from its files, and rows skipped by reason."""
    read: int = 0
    skipped: Counter = field(default_factory=Counter)


def records(src: SourceConfig, files: list[RawFile], tally: Tally) -> Iterator[Record]:
    """Every record of a source, stamped with its name; unusable rows are counted in ``tally`` by reason."""
    def stream() -> RowStream:
        for f in files:
            before, rows = Counter(tally.skipped), 0
            for n, row in read_rows(f, tally.skipped):
                tally.read += 1
                rows += 1
                yield f, n, row
            if not rows:  # a file with no usable row is the wrong file, not a few bad rows
                bad = tally.skipped - before
                what = ("holds no rows (an empty file)" if not bad else "has no usable row: "
                        + ", ".join(f"{reason}: {k}" for reason, k in bad.most_common()))
                raise ConfigError([f"source {src.name}: {f.path} {what}; point `path` at the dataset's files in "
                                   f"its hub layout (UTF-8 JSON lines of objects, a JSON array, or parquet), or "
                                   f"remove the file"])

    kept = 0
    for rec in SOURCES[src.name].parse(stream(), src):
        if isinstance(rec, BadRow):
            tally.skipped[str(rec)] += 1
            continue
        yield {**rec, "source": src.name}
        kept += 1
        if src.max_rows is not None and kept >= src.max_rows:
            return
    if not kept and tally.skipped:  # every row refused by the parser: the wrong files, or options that refuse all
        reasons = ", ".join(f"{reason}: {k}" for reason, k in tally.skipped.most_common(3))
        raise ConfigError([f"source {src.name}: none of the {tally.read} rows under {files[0].path.parent} could be "
                           f"used ({reasons}); check that `path` holds {src.name}'s files in the "
                           f"hub layout{' and its options' if SOURCES[src.name].options else ''}"])


def download(src: SourceConfig) -> Path:
    """The source's row files at its pinned revision, fetched from the hub (or its local cache) into the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = SOURCES[src.name]
    patterns = [source.subset_glob.format(s) for s in src.subsets] if src.subsets else list(source.patterns)
    where = f"{src.hub_id} @ {src.revision}"
    try:
        return Path(snapshot_download(src.hub_id, repo_type="dataset", revision=src.revision,
                                      allow_patterns=patterns))
    except GatedRepoError as err:
        raise SourceError(f"source {src.name}: {where} is gated: accept its terms at "
                          f"https://huggingface.co/datasets/{src.hub_id} and log in (`hf auth login`), "
                          f"or point `path:` at a local copy") from err
    except RevisionNotFoundError as err:
        raise SourceError(f"source {src.name}: revision {src.revision!r} of {src.hub_id} does not exist; "
                          f"fix `revision:`") from err
    except RepositoryNotFoundError as err:
        raise SourceError(f"source {src.name}: {src.hub_id} not found on the hub (or it needs a login); "
                          f"check `hub_id:`") from err
    except (LocalEntryNotFoundError, OSError) as err:
        raise SourceError(f"source {src.name}: {where} is not in the local hub cache and the hub cannot be "
                          f"reached ({type(err).__name__}); go online, or set `path:` to a local copy in the hub "
                          f"layout") from err
