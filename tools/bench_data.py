"""``make bench-data``: the prepare stage's data path on N synthetic zh/en rows (``bench_rows.py``: seeded, ~70 %
zh, full-width forms, code, ~5 % duplicates, empty turns). A developer harness. Cleaning: the stage's map → drop
filter → ``first_seen`` → ``bucket_of``, beside the same functions over a list in a spawned child. Token pass: every
kept row through ``pool.count`` with Qwen2.5's real tokenizer (built offline) and system prompt, beside one bare
``encode_batch`` of the same rendered texts (same lengths required). End to end: ``prepare.run`` on the rows as
COIG-PC-core (90 %) and UltraFeedback (10 %) files in their hub layouts, with its CPU seconds (``--e2e-only``: that
alone). Memory: psutil every 100 ms or less often (the sampler keeps to 5 % of one core); all processes as PSS (shared
pages split) and RSS summed (a forked worker counts shared pages again). A missed target prints FAIL, exit code 0.
``--out``: JSON with the machine, versions, command, date, load averages (a shared machine: compare within one run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any
from unittest import mock

from bench_rows import SHARD, generate

from pipeline.core.paths import repo_path
from pipeline.data import clean as C
from pipeline.data.pool import cpu_seconds
from pipeline.data.text import classify, dedup_key, normalise, script
from pipeline.prepare import PrepareConfig
from pipeline.stage.cli import setup_logging
from pipeline.stage.resolve import resolve

log = logging.getLogger("pipeline.bench")
GiB = 1024 ** 3
TARGET_SPEEDUP, TARGET_RSS, TARGET_RATIO, TARGET_E2E_S = 1.5, 2 * GiB, 0.8, 300.0  # E2E: seconds per 1M rows
SAMPLER_SHARE = 0.05  # the memory sampler's most CPU, as a share of one core (peak_memory)
MODEL = "qwen2.5-7b-instruct"  # whose tokenizer (built offline), chat template and system prompt measure tokens
BARE_CHUNK = 20_000  # rows per bare encode_batch call
DEFAULTS = PrepareConfig(sources=[])
CLEAN_KW = {"min_chars": DEFAULTS.filters.min_chars, "min_cn_ratio": DEFAULTS.filters.min_cn_ratio,
            "allow_english": DEFAULTS.filters.allow_english_fallback, "eval_fraction": DEFAULTS.eval_fraction}
EDGES = list(DEFAULTS.buckets)

# --- Measuring -------------------------------------------------------------------------------------------------------
@contextmanager
def peak_memory(every: float = 0.1, share: float = SAMPLER_SHARE) -> Iterator[dict[str, float]]:
    """Peak memory while the block runs, sampled with psutil: this process, the largest child, the children together,
    and all processes together as RSS summed and as PSS; and ``sampler_cpu_s``, what the sampling cost. A sample
    reads each process's ``smaps_rollup`` (the kernel walks its page tables: ~10 ms per GiB resident, on this
    process's clock), so after each sample the sampler waits ``every`` or long enough to keep its own CPU at ``share``
    of one core, whichever is longer: the measured block keeps the cores (a sample every 0.1 s of three 1.3 GiB
    processes took a third of one of two cores from the token pass)."""
    import psutil

    names = ("main", "worker_max", "workers_sum", "all_rss", "all_pss")
    peak, stop, me = dict.fromkeys(names, 0), threading.Event(), psutil.Process()

    def poll() -> None:
        cpu = time.thread_time()
        while not stop.is_set():
            began = time.thread_time()
            mine, kids = me.memory_full_info(), []
            for child in me.children(recursive=True):
                try:
                    kids.append(child.memory_full_info())
                except psutil.Error:  # a worker that just ended
                    pass
            rss = [k.rss for k in kids]
            now = (mine.rss, max(rss, default=0), sum(rss), mine.rss + sum(rss), mine.pss + sum(k.pss for k in kids))
            peak.update({k: max(peak[k], v) for k, v in zip(names, now, strict=True)})
            stop.wait(max(every, (time.thread_time() - began) * (1 / share - 1)))
        peak["sampler_cpu_s"] = round(time.thread_time() - cpu, 2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


@contextmanager
def clock(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - start  # a name timed again adds up


def cleaning_path(ds, num_proc: int) -> tuple[dict[str, Any], Any]:
    """The stage's map → drop filter → first_seen → bucket_of, timed step by step, with peak memory; and the kept rows."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.data import pool

    times: dict[str, float] = {}
    with peak_memory() as rss:
        with clock(times, "map"):
            cleaned = pool.clean_rows(ds, "sft", DEFAULTS, num_proc)
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
            "kept": len(kept), "buckets": _histogram(buckets), "peak_rss": dict(rss)}, kept


def _histogram(buckets) -> dict[str, int]:
    return {str(b): n for b, n in sorted(Counter(buckets).items())}


def token_pass(kept, num_proc: int) -> dict[str, Any]:
    """The stage's token pass (the kept rows compacted, then ``pool.count``) with Qwen2.5's tokenizer, beside a bare
    ``encode_batch`` of the same rows' rendered texts in this process, in chunks (rendering untimed)."""
    from pipeline.core.profiles import load_model
    from pipeline.data import pool
    from pipeline.models.qwen_tokenizer import load_qwen25_tokenizer

    tokenizer, system = load_qwen25_tokenizer(), load_model(MODEL).system_prompt
    render, backend, bare, times = C.Lengths(tokenizer, system).render, tokenizer.backend_tokenizer, [], {}
    # the stage's forked maps leave TOKENIZERS_PARALLELISM=false in this process: the bare call gets every core back
    with mock.patch.dict(os.environ, TOKENIZERS_PARALLELISM="true"):
        for chunk in pool.tables(kept, ["messages"], BARE_CHUNK):
            texts = [render(m) for m in chunk.column("messages").to_pylist()]
            with clock(times, "bare"):
                bare += [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    with peak_memory() as rss, clock(times, "stage"):
        measured = pool.count(pool.compact(kept).remove_columns(["n_tokens"]), "sft", tokenizer, system, DEFAULTS,
                              num_proc)
    stage = pool.column(measured, "n_tokens")
    rows, tokens = len(kept), sum(stage)
    speed = {k: {"seconds": t, "rows_per_s": rows / t, "tokens_per_s": tokens / t}
             for k, t in times.items()}
    return {"rows": rows, "tokens": tokens, "tokenizer": "Qwen2.5 (qwen.tiktoken, built offline)", **speed,
            "batch_size": pool.TOKEN_BATCH, "same_lengths": stage == bare, "peak_rss": dict(rss),
            "ratio": speed["stage"]["rows_per_s"] / speed["bare"]["rows_per_s"]}


def write_sources(ds, folder: Path) -> dict[str, Path]:
    """The rows as parquet in two hub layouts: the first 90 % as COIG-PC-core instructions (SFT), the rest as
    UltraFeedback-binarized pairs, each row's answer chosen over the next row's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import pool

    split, writers = len(ds) * 9 // 10, {}
    files = {"coig_pc_core": "train-00000-of-00001.parquet", "ultrafeedback_binarized": "train_prefs-00000-of-00001.parquet"}
    for start, chunk in zip(range(0, len(ds), SHARD), pool.tables(ds, ["messages", "source_id"], SHARD), strict=True):
        rows = chunk.to_pylist()  # (streamed: the harness's own rows are not left mapped in this process)
        sft_rows = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
                    for r in rows[:max(0, split - start)]]
        pairs = [{"prompt": r["messages"][0]["content"], "prompt_id": r["source_id"], "chosen": r["messages"],
                  "rejected": [r["messages"][0], rows[(i + 1) % len(rows)]["messages"][1]], "score_chosen": 8.0,
                  "score_rejected": 4.0} for i, r in enumerate(rows) if start + i >= split]
        for name, part in (("coig_pc_core", sft_rows), ("ultrafeedback_binarized", pairs)):
            if part:
                table = pa.Table.from_pylist(part)
                (folder / name / "data").mkdir(parents=True, exist_ok=True)
                writers[name] = writers.get(name) or pq.ParquetWriter(folder / name / "data" / files[name], table.schema)
                writers[name].write_table(table)
    for w in writers.values():
        w.close()
    return {name: folder / name for name in writers}


def end_to_end(ds, folder: Path, num_proc: int) -> dict[str, Any]:
    """``prepare.run`` on the rows as two local sources, configs/prepare.yaml otherwise, with Qwen2.5's tokenizer
    built offline in place of the hub's (same ranks, added tokens and template); wall time and peak memory."""
    import mlflow
    import yaml

    from pipeline import prepare
    from pipeline.models import loading
    from pipeline.models.qwen_tokenizer import load_qwen25_tokenizer

    sources = write_sources(ds, folder / "sources")
    raw = yaml.safe_load(repo_path("configs/prepare.yaml").read_text(encoding="utf-8"))
    raw.update(model=MODEL, output_dir=str(folder / "out"), num_proc=num_proc, sources=[
        {**next(s for s in raw["sources"] if s["name"] == name), "path": str(path)} for name, path in sources.items()])
    (folder / "prepare.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="bench-data")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(var, None)
    mlflow.MlflowClient().search_experiments()  # the store's tables exist before the clock starts
    hub, times = loading.load_tokenizer, {}
    loading.load_tokenizer = lambda m: load_qwen25_tokenizer() if m.name == MODEL else hub(m)
    try:
        r = resolve("prepare", config=folder / "prepare.yaml", hw="cpu")
        load, cpu = os.getloadavg(), cpu_seconds()
        with peak_memory() as rss, clock(times, "wall"):
            result = prepare.run(r)
    finally:
        loading.load_tokenizer = hub
    return {"rows": len(ds), "sources": sorted(sources), "seconds": times["wall"], "rows_per_s": len(ds) / times["wall"],
            "cpu_seconds": cpu_seconds() - cpu, "load_avg": [load, os.getloadavg()], "outputs": result.rows,
            "peak_rss": dict(rss)}


# --- The naive loop (in a spawned child) -----------------------------------------------------------------------------
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


# --- The run and its report ------------------------------------------------------------------------------------------
def run(n: int, num_proc: int, seed: int, e2e_only: bool = False) -> dict[str, Any]:
    """Generate; clean; the token pass beside a bare encode_batch; the naive loop; the stage end to end (only that
    with ``e2e_only``)."""
    import datasets

    datasets.disable_progress_bars()  # the generator's; the stage logs one line per pass (pool.mapped)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        log.info("generating %d synthetic rows into %s", n, tmp)
        start = time.perf_counter()
        ds = generate(n, seed, Path(tmp), num_proc)
        io = {"rows": n, "seconds": time.perf_counter() - start, "arrow_bytes": ds.data.nbytes}
        if e2e_only:
            e2e = end_to_end(ds, Path(tmp) / "e2e", num_proc)
            return {"rows": n, "seed": seed, "machine": machine(num_proc, load), "file_io": io, "end_to_end": e2e,
                    "targets": targets(None, None, None, e2e)}
        log.info("cleaning path with %d workers", num_proc)
        path, kept = cleaning_path(ds, num_proc)
        log.info("token pass on %d rows: bare encode_batch, then the stage's", len(kept))
        tokens = token_pass(kept, num_proc)
        del kept
        log.info("naive loop in a child process")
        with multiprocessing.get_context("spawn").Pool(1) as child:  # its memory is its own
            slow = child.apply(_naive_child, ([f["filename"] for f in ds.cache_files],))
        log.info("the prepare stage end to end on %d rows", n)
        e2e = end_to_end(ds, Path(tmp) / "e2e", num_proc)
    io["naive_read_s"] = slow.pop("read_s")
    return {"rows": n, "seed": seed, "machine": machine(num_proc, load), "file_io": io, "cleaning_path": path,
            "naive": slow, "token_pass": tokens, "end_to_end": e2e, "speedup": path["rows_per_s"] / slow["rows_per_s"],
            "targets": targets(path, slow, tokens, e2e)}


def targets(path: dict | None, slow: dict | None, tok: dict | None, e2e: dict) -> dict[str, dict[str, Any]]:
    """Each target measured: what it says, its value, shown, and PASS or FAIL."""
    per_1m, pss, rss = 1e6 / e2e["rows_per_s"], e2e["peak_rss"]["all_pss"], e2e["peak_rss"]["all_rss"]
    rows = [("e2e_seconds_per_1m", f"end to end, 1M rows <= {TARGET_E2E_S:.0f} s", per_1m, f"{per_1m:.0f} s",
             per_1m <= TARGET_E2E_S),
            ("e2e_peak_pss_all", "end to end PSS, all <= 2 GiB", pss, _gib(pss), pss <= TARGET_RSS),
            ("e2e_peak_rss_all", "end to end RSS summed <= 2 GiB", rss, _gib(rss), rss <= TARGET_RSS)]
    if path is None or slow is None or tok is None:
        return {key: {"target": t, "value": v, "shown": shown, "pass": bool(ok)} for key, t, v, shown, ok in rows}
    mem, speedup = path["peak_rss"], path["rows_per_s"] / slow["rows_per_s"]
    main, worker = mem["main"], mem["worker_max"]
    same = (path["kept"], path["buckets"]) == (slow["kept"], slow["buckets"])
    rows += [("speedup", f"cleaning >= {TARGET_SPEEDUP}x naive", speedup, f"{speedup:.2f}x", speedup >= TARGET_SPEEDUP),
            ("peak_rss_main", "cleaning RSS main <= 2 GiB", main, _gib(main), main <= TARGET_RSS),
            ("peak_rss_worker", "cleaning RSS per worker <= 2 GiB", worker, _gib(worker), worker <= TARGET_RSS),
            ("same_rows_as_naive", "same rows and buckets as naive", same, "", same),
            ("token_ratio", f"token pass >= {TARGET_RATIO}x bare", tok["ratio"], f"{tok['ratio']:.2f}x",
             tok["ratio"] >= TARGET_RATIO),
            ("same_lengths_as_bare", "same token lengths as bare", tok["same_lengths"], "", tok["same_lengths"])]
    return {key: {"target": t, "value": v, "shown": shown, "pass": bool(ok)} for key, t, v, shown, ok in rows}


def machine(num_proc: int, load: tuple[float, ...]) -> dict[str, Any]:
    """Where and with what the numbers were taken (the machine may be shared: load averages before and after)."""
    import psutil

    cpu = [x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in x]
    wanted = {"datasets", "pyarrow", "tokenizers", "transformers", "tiktoken", "qwen-tokenizer", "psutil"}
    versions = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()
                if (d.metadata["Name"] or "").lower() in wanted}
    return {"cpu_model": cpu[0] if cpu else platform.processor(), "cpu_count": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)), "num_proc": num_proc,
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "platform": platform.platform(), "versions": dict(sorted(versions.items())),
            "command": " ".join([sys.executable, *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_avg_before": load, "load_avg_after": os.getloadavg()}


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB"


def _line(name: str, rows: int, seconds: float, extra: str = "") -> str:
    return f"{name:<36}{rows:>10}{seconds:>9.1f}{rows / seconds:>11,.0f}  {extra}"


def table(res: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    io, e2e, k = res["file_io"], res["end_to_end"], res["machine"]["num_proc"]
    mem = e2e["peak_rss"]
    lines = [f"{'phase':<36}{'rows':>10}{'seconds':>9}{'rows/s':>11}  tokens/s, peak memory",
             _line("file I/O (generate + write Arrow)", io["rows"], io["seconds"], f"({_gib(io['arrow_bytes'])} Arrow)"),
             _line(f"prepare end to end (K={k})", e2e["rows"], e2e["seconds"], f"all: {_gib(mem['all_pss'])} PSS, "
                   f"{_gib(mem['all_rss'])} RSS summed; main {_gib(mem['main'])} RSS; {e2e['cpu_seconds']:.0f} CPU s; "
                   f"load {e2e['load_avg'][0][0]:.1f}→{e2e['load_avg'][1][0]:.1f}")]
    if "cleaning_path" in res:
        lines += _micro_lines(res)
    lines += [f"{t['target']:<40}{t['shown']:>10}  {'PASS' if t['pass'] else 'FAIL <<<'}" for t in res["targets"].values()]
    return "\n".join(lines)


def _micro_lines(res: dict[str, Any]) -> list[str]:
    io, path, slow, tok, e2e = (res[k] for k in ("file_io", "cleaning_path", "naive", "token_pass", "end_to_end"))
    k, rss = res["machine"]["num_proc"], path["peak_rss"]
    return [
             _line(f"cleaning path (K={k})", path["rows"], path["seconds"], f"main {_gib(rss['main'])}, worker max "
                   f"{_gib(rss['worker_max'])}; " + ", ".join(f"{s} {v:.1f}s" for s, v in path["steps_s"].items())),
             _line("naive loop (1 process)", slow["rows"], slow["seconds"],
                   f"{_gib(slow['peak_rss'])} (ru_maxrss; read {io['naive_read_s']:.1f}s)"),
             _line(f"token pass, stage (K={k}, Qwen2.5)", tok["rows"], tok["stage"]["seconds"],
                   f"{tok['stage']['tokens_per_s']:,.0f} tok/s; all: {_gib(tok['peak_rss']['all_pss'])} PSS"),
             _line("token pass, bare encode_batch", tok["rows"], tok["bare"]["seconds"],
                   f"{tok['bare']['tokens_per_s']:,.0f} tok/s ({tok['tokens']:,} tokens)"),
             f"kept {path['kept']} rows (naive {slow['kept']}); buckets {path['buckets']}; e2e outputs {e2e['outputs']}\n"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_data.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (default: 1000000)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="map workers (default: every core)")
    parser.add_argument("--out", default="outputs/bench/bench-data.json", help="the JSON report")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--e2e-only", action="store_true", help="only the stage end to end (no micro-benchmarks)")
    args = parser.parse_args(argv)
    setup_logging()
    res = run(args.rows, args.num_proc, args.seed, args.e2e_only)
    out = repo_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(table(res))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
