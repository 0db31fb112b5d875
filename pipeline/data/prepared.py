"""The prepared pool as the training stages read it: found by prepare run id or folder, rows over the profile's
max_length left out, ordered for the whole training by the sampler and seed that prepare reported.

The pool is ordered once, up front, by the same :class:`~pipeline.data.sampler.MixedBucketSampler` and seed that
prepare reported (so epoch 0 is the mix in the data card), for the whole training (1.5 epochs included); the Trainer
then reads that ordered dataset sequentially, which keeps resume and DDP sharding exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path
from pipeline.core.profiles import ModelDef
from pipeline.core.resolved import Resolved
from pipeline.core.strict import build
from pipeline.data.mix import MixConfig
from pipeline.tracking.lineage import prepared_folder

log = logging.getLogger(__name__)


@dataclass
class DataRef:
    """Where a training stage reads the prepared pool: an MLflow run id of a prepare run, or a folder."""
    run_id: str | None = None
    path: str | None = "outputs/data/default"


@dataclass
class Pool:
    folder: Path
    run_id: str | None
    manifest: dict[str, Any]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    over_length: int            # rows dropped because they exceed the profile's max_length
    kind: str = "sft"

    @property
    def digest(self) -> str:
        return self.manifest["outputs"][f"{self.kind}.jsonl"]["sha256"]


def pool_folder(ref: DataRef) -> tuple[Path, str | None]:
    """The folder of a prepared pool: the output folder of the prepare run `data.run_id`, or `data.path`."""
    if ref.run_id:
        return prepared_folder(ref.run_id), ref.run_id
    folder = repo_path(ref.path or "")
    if not ref.path or not (folder / "manifest.json").exists():
        raise StageError(f"`data.path` {ref.path!r} holds no prepared pool (no manifest.json); run `make prepare` "
                         f"(HW=cpu for the offline fixtures) or set `data.run_id` to a prepare run")
    return folder, None


def verify_pool(folder: Path, names: list[str]) -> dict[str, Any]:
    """The manifest, after checking each named pool file against the size and sha256 it records (a file truncated
    by a full disk or a kill, or edited since prepare, is refused before a row is read)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        recorded = {name: manifest["outputs"][name]["sha256"] for name in names}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError([f"{folder / 'manifest.json'}: not a manifest prepare wrote ({type(err).__name__}: {err}); "
                           f"run `make prepare` again into {folder}"]) from None
    problems = []
    for name, sha in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing, though {folder / 'manifest.json'} lists it")
            continue
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha:
            problems.append(f"{path} has sha256 {digest.hexdigest()[:12]}…, but the manifest recorded {sha[:12]}… "
                            f"(truncated by a full disk or a kill, or edited since prepare)")
    if problems:
        raise ConfigError([*problems[:-1], problems[-1] + f"; run `make prepare` again into {folder} (or point "
                                                            f"`data.path` / `data.run_id` at a whole pool)"])
    return manifest


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_pool(ref: DataRef, kind: str, r: Resolved) -> Pool:
    """The pool of one row type, rows over the profile's max_length dropped (and counted). Token counts are
    measured again when the pool was prepared with another model's tokenizer."""
    folder, run_id = pool_folder(ref)
    manifest = verify_pool(folder, [f"{kind}.jsonl", f"{kind}_eval.jsonl"])
    train, held = _rows(folder / f"{kind}.jsonl"), _rows(folder / f"{kind}_eval.jsonl")
    if manifest.get("tokenizer") != r.model.ref:
        log.warning("the pool was measured with %s, this run uses %s: measuring token lengths again",
                    manifest.get("tokenizer"), r.model.ref)
        for rows in (train, held):
            _measure(rows, kind, r.model, manifest["buckets"])
    limit = r.hw.max_length
    fits = [row for row in train if row["n_tokens"] <= limit]
    over = len(train) - len(fits)
    if over:
        log.warning("%d of %d %s rows are longer than max_length %d (profile %s) and are left out", over, len(train),
                    kind, limit, r.hw.name)
    if not fits:
        raise StageError(f"no {kind} row fits max_length {limit} of profile {r.hw.name}; raise `hw.max_length`")
    return Pool(folder, run_id, manifest, fits, [row for row in held if row["n_tokens"] <= limit], over, kind)


def _measure(rows: list[dict[str, Any]], kind: str, model: ModelDef, edges: list[int]) -> None:
    from pipeline.data.clean import count_tokens
    from pipeline.models.loading import load_tokenizer

    keys = ("messages",) if kind == "sft" else ("prompt", "chosen", "rejected")
    batch = {k: [row[k] for row in rows] for k in keys}
    out = count_tokens(batch, tokenizer=load_tokenizer(model), system=model.system_prompt, kind=kind, edges=edges,
                       truncate=False)
    for row, n, b in zip(rows, out["n_tokens"], out["bucket"], strict=True):
        row["n_tokens"], row["bucket"] = n, min(b, len(edges) - 1)


def order(pool: Pool, epochs: float) -> tuple[list[int], dict[str, Any]]:
    """The whole training's row order by the prepare stage's sampler and seed; and its report."""
    from pipeline.data.sampler import for_pool

    mix = build(MixConfig, pool.manifest["mix"], f"{pool.folder}/manifest.json")
    columns = {k: [row[k] for row in pool.train] for k in ("lang", "source", "bucket", "n_tokens")}
    sampler = for_pool(columns, mix, pool.kind, len(pool.manifest["buckets"]), pool.manifest["seed"])
    return sampler.order(epochs), sampler.report(epochs)


def data_tags(pool: Pool) -> dict[str, str]:
    """Lineage and licence tags of a run that trains on `pool` (the run's tags and its registered version's)."""
    licence = pool.manifest.get("licence", {})
    return {"data.run_id": pool.run_id or "", "data.sha256": pool.digest,
            "licence.noncommercial": str(bool(licence.get("noncommercial"))).lower(),
            "licence.noncommercial_sources": ",".join(licence.get("sources", [])) or "none"}


def sampling_plan(ref: DataRef, kind: str, r: Resolved, epochs: float) -> dict[str, Any] | None:
    """What the training stage's sampler will do with the pool, for the dry run, without loading a model: the pool
    read and cut at the profile's max_length as :func:`load_pool` does, ordered for ``epochs`` as :func:`order` does;
    the sampler's report plus rows and tokens per (source, bucket, lang). None when no prepared pool exists yet. A pool
    measured with another tokenizer is planned on its recorded counts (``remeasured``: the run counts again)."""
    try:
        folder, run_id = pool_folder(ref)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        train = _rows(folder / f"{kind}.jsonl")
    except (ConfigError, StageError, OSError, ValueError):
        return None
    fits = [row for row in train if row["n_tokens"] <= r.hw.max_length]
    plan: dict[str, Any] = {"folder": str(folder), "seed": manifest.get("seed"), "edges": manifest.get("buckets", []),
                            "over_length": len(train) - len(fits), "measured_by": manifest.get("tokenizer"),
                            "remeasured": manifest.get("tokenizer") != r.model.ref, "problem": None}
    if not fits:
        plan["problem"] = f"no {kind} row fits max_length {r.hw.max_length} of profile {r.hw.name}"
        return plan
    try:
        rows, plan["report"] = order(Pool(folder, run_id, manifest, fits, [], plan["over_length"], kind), epochs)
    except (ConfigError, StageError) as err:
        plan["problem"] = str(err)
        return plan
    except (KeyError, TypeError, ValueError) as err:  # a manifest made by hand or by another version
        plan["problem"] = (f"{folder}/manifest.json lacks what the sampler reads ({type(err).__name__}: {err}); "
                           f"prepare the pool again with `make prepare`")
        return plan
    cells: dict[tuple[str, int, str], list[int]] = {}
    for i in rows:
        row = fits[i]
        cell = cells.setdefault((row["source"], row["bucket"], row["lang"]), [0, 0])
        cell[0] += 1
        cell[1] += row["n_tokens"]
    plan["cells"] = [{"source": s, "bucket": b, "lang": lang, "rows": n, "tokens": t}
                     for (s, b, lang), (n, t) in sorted(cells.items())]
    return plan
