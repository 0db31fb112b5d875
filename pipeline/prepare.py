"""prepare: the seven public datasets → cleaned, deduplicated, length-bucketed SFT and preference pools + data card.

Steps, each counted per source in the manifest: read the hub layout (pinned revision, or `path:`) → parse into
SFT / preference records (bad rows counted by reason) → text hygiene and empty turns → language and Han-share filter
→ exact dedup across sources in their configured order (the first source listed wins) → token lengths with the
model's chat template and system prompt → length buckets → eval split by tree / post / prompt. The pools are
written whole; the training stages mix them per epoch with :class:`~pipeline.data.sampler.MixedBucketSampler`,
whose epoch-0 shares the manifest reports.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core import atomic
from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.core.strict import Key, at_least, share
from pipeline.data import sources
from pipeline.data.decontam import Index
from pipeline.data.inline import run_inline_checks
from pipeline.data.mix import MixConfig
from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import SourceConfig
from pipeline.evaluation import evalsets
from pipeline.hardware.planner import Estimate
from pipeline.stage import cli
from pipeline.stage.dryrun import Item, Plan, base_model_input, dir_output
from pipeline.stage.resolve import resolve
from pipeline.stage.spec import Stage
from pipeline.tracking import fingerprints, runs

POOLS = ("sft.jsonl", "sft_eval.jsonl", "pref.jsonl", "pref_eval.jsonl")
OUTPUT_FILES = (*POOLS, "manifest.json", "DATA_CARD.md")
SMALL = 20_000  # below this many records, cleaning runs in-process (worker start-up would cost more than it saves)
log = logging.getLogger("pipeline.prepare")


@dataclass
class FilterConfig:
    min_cn_ratio: float = 0.3
    allow_english_fallback: bool = True
    min_chars: int = 2                   # a turn shorter than this after normalising counts as empty
    over_length: Literal["drop", "truncate"] = "drop"  # rows over the largest bucket edge: dropped, or cut by turns

    def check(self, key: Key) -> list[str]:
        return share(key, "min_cn_ratio", self.min_cn_ratio) + at_least(key, self, ("min_chars",))


@dataclass
class DecontamConfig:
    ngram: int = 13                      # n (zh characters / en words) of a shared span that drops a row; 0 = off

    def check(self, key: Key) -> list[str]:
        return [] if self.ngram >= 0 else [f"{key('ngram')} must be >= 0 (0 = off); got {self.ngram}"]


@dataclass
class PrepareConfig:
    sources: list[SourceConfig]
    model: str = "qwen2.5-7b-instruct"
    output_dir: str = "outputs/data/default"
    seed: int = 42
    eval_fraction: float = 0.02          # share of conversation trees / prompts held out as *_eval.jsonl
    num_proc: int | None = None          # worker processes for the cleaning and token maps; null = every core
    filters: FilterConfig = field(default_factory=FilterConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    buckets: list[int] = field(default_factory=lambda: [256, 1024, 2048, 4096])
    mix: MixConfig = field(default_factory=MixConfig)

    def check(self, key: Key) -> list[str]:
        edges = self.buckets
        problems = share(key, "eval_fraction", self.eval_fraction)
        if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            problems.append(f"{key('buckets')} must be positive and strictly ascending; got {edges}")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"{key('sources')} lists {', '.join(dupes)} more than once")
        for i, s in enumerate(self.sources):
            problems += sources.check(s, lambda name, i=i: key(f"sources.{i}.{name}"))
        problems += at_least(key, self, ("num_proc",), nullable=True)
        for kind in ("sft", "pref"):
            problems += getattr(self.mix, kind).check_against(lambda name, k=kind: key(f"mix.{k}.{name}"), names,
                                                              len(edges))
        return problems



@dataclass
class PrepareResult:
    output_dir: str
    rows: dict[str, int]            # output file → rows
    zh_share: dict[str, float]      # realised zh token share of the epoch-0 mix, per row type
    noncommercial: list[str]        # sources with non-commercial or unclear terms that reached the output

    def __str__(self) -> str:
        rows = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        return f"{rows} → {self.output_dir}"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    inputs = [Item(f"source {s.name}", (s.path or f"{s.hub_id} @ {s.revision}") + _options(s),
                   ("exists" if repo_path(s.path).exists() else "MISSING") if s.path else "read from the hub",
                   problem=None if not s.path or repo_path(s.path).exists() else _missing(r.config_path, i, s))
              for i, s in enumerate(cfg.sources)]
    return Plan(r, facts=[
        ("parsers", run_inline_checks([s.name for s in cfg.sources])),
        ("filters", f"min_cn_ratio {cfg.filters.min_cn_ratio}, English fallback "
                    f"{'kept' if cfg.filters.allow_english_fallback else 'dropped'}, turns under "
                    f"{cfg.filters.min_chars} chars dropped, over-length rows {cfg.filters.over_length}"),
        ("buckets", " / ".join(f"≤{b}" for b in cfg.buckets) + " tokens"),
        ("eval split", f"{cfg.eval_fraction:.1%} of trees / posts / prompts"),
        ("decontam", f"drop rows sharing a {cfg.decontam.ngram}-gram (zh characters / en words) with an item of "
                     f"zh_smoke or a mirrored eval set" if cfg.decontam.ngram else "off"),
        ("mix", f"zh share of tokens: sft {cfg.mix.sft.zh_share}, pref {cfg.mix.pref.zh_share}; "
                f"on shortfall: {cfg.mix.on_shortfall}; max repeats {cfg.mix.max_repeats}; seed {cfg.seed}"),
    ], inputs=[*inputs, base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "pools + manifest + data card")]
               + [Item("file", f"{cfg.output_dir}/{f}", "written atomically") for f in OUTPUT_FILES],
       estimate=Estimate([("memory", f"CPU only: batched passes on {_workers(cfg.num_proc)}, the rows "
                                     f"streamed from Arrow files (make bench-data measures time and peak memory); "
                                     f"no GPU")]))


def _workers(num_proc: int | None) -> str:
    return "every core" if num_proc is None else f"{num_proc} worker process{'es' if num_proc > 1 else ''}"


def _options(s: SourceConfig) -> str:
    opts = {k: getattr(s, k) for k in ("subsets", "splits", "max_rows", "min_score_ratio", "chosen_by")}
    shown = ", ".join(f"{k} {v}" for k, v in opts.items() if v is not None)
    return f" ({shown}; licence {SOURCES[s.name].licence})" if shown else f" (licence {SOURCES[s.name].licence})"


def run(r: Resolved) -> PrepareResult:
    cfg: PrepareConfig = r.cfg
    _check_paths(cfg, r.config_path)
    atomic.check_replaceable(repo_path(cfg.output_dir), "manifest.json", "prepared pool")
    with runs.start_run(STAGE.name, r.as_dict(), hw=r.hw.name, model=r.model.name):
        with tempfile.TemporaryDirectory(prefix="zh-align-prepare-") as tmp:
            built = build(r, Path(tmp))
            out = repo_path(cfg.output_dir)
            written = _write_all(built, r, out)
        _track(built, written, out)
    return PrepareResult(cfg.output_dir, {f: built.rows[f] for f in POOLS},
                         {k: built.mix[k]["zh_share"] for k in built.mix}, built.noncommercial)


def _missing(src: str, i: int, s: Any) -> str:
    return (f"{src}: `sources.{i}.path` {s.path!r} does not exist; fix it, or set `path: null` to read {s.hub_id} "
            f"from the hub")


def _check_paths(cfg: PrepareConfig, src: str) -> None:
    missing = [_missing(src, i, s) for i, s in enumerate(cfg.sources) if s.path and not repo_path(s.path).exists()]
    if missing:
        raise ConfigError(missing)


# ----------------------------------------------------------------------------------------------------------------
# Building the pools
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    pools: dict[str, Any]           # file name → datasets.Dataset
    steps: dict[str, dict]          # source → counts of every step
    rows: dict[str, int]
    mix: dict[str, dict]            # row type → the sampler's epoch-0 report
    noncommercial: list[str]
    tokenizer: str
    eval_sets: list[str]            # the eval sets the pools were decontaminated against


def build(r: Resolved, tmp: Path) -> Built:
    """Read, clean, dedup, measure and split every source; returns the four pools as Arrow-backed datasets."""
    from pipeline.data import pool
    from pipeline.data.clean import Lengths
    from pipeline.models.loading import load_tokenizer

    cfg: PrepareConfig = r.cfg
    steps: dict[str, dict] = {s.name: {} for s in cfg.sources}
    records = pool.read_sources(cfg, steps, tmp)
    num_proc = cfg.num_proc or (os.cpu_count() if len(records) >= SMALL else None)
    index, eval_sets = eval_index(r)
    # the token counter, made once for both row types when needed; the full tokenizer is not kept (Lengths keeps its
    # backend), so the map workers fork from a smaller process
    tokenizer = functools.cache(lambda: Lengths(load_tokenizer(r.model), r.model.system_prompt))
    pools: dict[str, Any] = {}
    for kind in ("sft", "pref"):
        part = pool.of_kind(records, kind)
        train, held_out = pool.clean(part, kind, r, steps, num_proc, index, tokenizer)
        pools[f"{kind}.jsonl"], pools[f"{kind}_eval.jsonl"] = train, held_out
    rows = {name: len(ds) for name, ds in pools.items()}
    for name, st in steps.items():
        if not st.get("kept"):
            why = {k: v for kind in ("sft", "pref") for k, v in st.get(kind, {}).get("dropped", {}).items()}
            log.warning("source %s ends with 0 rows (read %d; skipped %s; dropped %s)", name, st.get("rows_read", 0),
                        st.get("skipped") or "none", why or "none")
    for name in ("sft.jsonl", "pref.jsonl"):
        if rows[name] == 0:
            raise StageError(pool.empty_reason(name.split(".")[0], steps))
    for name in ("sft_eval.jsonl", "pref_eval.jsonl"):
        if rows[name] == 0:
            log.warning("%s is empty: no tree / prompt fell into the eval split (eval_fraction %s)", name,
                        cfg.eval_fraction)
    mix = {kind: pool.epoch0(pools[f"{kind}.jsonl"], kind, cfg) for kind in ("sft", "pref")}
    reached = [n for n, s in steps.items() if s.get("kept", 0) and SOURCES[n].noncommercial]
    return Built(pools, steps, rows, mix, reached, r.model.ref, eval_sets)


def eval_index(r: Resolved) -> tuple[Any, list[str]]:
    """The n-gram index of every eval item with a local copy: the shipped zh_smoke and the mirrors the evaluate
    config of this hardware profile names. (None, []) when `decontam.ngram` is 0."""
    if not r.cfg.decontam.ngram:
        return None, []
    mirrors = {"zh_smoke": str(evalsets.ZH_SMOKE)}
    mirrors.update({t: str(repo_path(f)) for t, f in resolve("evaluate", hw=r.hw.name).cfg.mirrors.items()
                    if repo_path(f).is_dir()})
    return Index(evalsets.eval_items(mirrors), r.cfg.decontam.ngram), sorted(mirrors)


# ----------------------------------------------------------------------------------------------------------------
# Writing: everything into a folder beside the output, which then replaces it whole (pipeline.core.atomic)
# ----------------------------------------------------------------------------------------------------------------
def _write_all(built: Built, r: Resolved, out: Path) -> list[Path]:
    from pipeline.data import card, pool

    with atomic.replacing(out, marker="manifest.json", what="prepared pool") as stage:
        digests = {name: pool.write_jsonl(ds, stage / name, name.split(".")[0].split("_")[0])
                   for name, ds in built.pools.items()}
        manifest = card.manifest(r, built, digests)
        (stage / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
                                             encoding="utf-8")
        (stage / "DATA_CARD.md").write_text(card.data_card(manifest), encoding="utf-8")
        charts = card.charts(built, manifest, stage)
        names = [*OUTPUT_FILES, *(c.name for c in charts)]
    log.info("wrote %s", ", ".join(f"{n} ({built.rows[n]} rows)" for n in POOLS))
    return [out / n for n in names]


def _track(built: Built, written: list[Path], out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    metrics: dict[str, float] = {f"rows.{n.removesuffix('.jsonl')}": v for n, v in built.rows.items()}
    for kind, rep in built.mix.items():
        metrics[f"{kind}.epoch0.zh_share"] = rep["zh_share"]
        metrics[f"{kind}.epoch0.tokens"] = rep["tokens"]
    for name, s in built.steps.items():
        metrics[f"{name}.rows_read"] = s.get("rows_read", 0)
        metrics[f"{name}.skipped"] = sum(s.get("skipped", {}).values())
        for kind in ("sft", "pref"):
            if kind in s:
                metrics[f"{name}.{kind}.parsed"] = s[kind]["parsed"]
                metrics[f"{name}.{kind}.kept"] = s[kind]["kept"]
                metrics[f"{name}.{kind}.tokens"] = s[kind]["tokens"]
    runs.log_metrics(metrics)
    runs.log_artifacts([p for p in written if p.name not in POOLS], "data")
    for name in POOLS:
        info = manifest["outputs"][name]
        runs.log_file_input(out / name, name=name.removesuffix(".jsonl"), digest=info["sha256"],
                                context="eval" if "eval" in name else "train", tags={"rows": info["rows"]})
    runs.set_tags({"licence.noncommercial": str(bool(built.noncommercial)).lower(),
                       "licence.noncommercial_sources": ",".join(built.noncommercial) or "none"})
    if built.noncommercial:
        log.warning("non-commercial or unclear licences reached the output: %s (run tagged licence.noncommercial)",
                    ", ".join(built.noncommercial))

STAGE = Stage("prepare", PrepareConfig, plan, run, __doc__.split("\n\n")[0], key_metrics=("rows.",),
              checks={"data_manifest": fingerprints.manifest_digest})


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
