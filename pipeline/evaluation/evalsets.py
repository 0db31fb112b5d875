"""Local copies ("mirrors") of lm-eval's hub tasks, and the shipped zh_smoke task.

cmmlu and ceval-exam are script-based on the hub, which datasets >= 4 refuses, and this project runs offline: each
mirrored task is rewritten as lm-eval YAML that keeps the built-in prompt (it `include`s the installed lm-eval task
file) and loads the data from a local folder (`dataset_path: csv|parquet|json` + absolute `data_files`). The written
tasks keep lm-eval's names (`cmmlu`, `cmmlu_<subject>`, `ceval-valid_<subject>`, ...) and override the built-ins when
the folder is passed as `TaskManager(include_path=...)`.

Folder layouts (what the hub publishes):

- cmmlu, zh_smoke: `test/<subject>.csv` + `dev/<subject>.csv` (few-shot); columns: an unnamed index, Question, A, B, C,
  D, Answer (a letter). zh_smoke is one subject named `zh_smoke`.
- ceval-valid: `val/<subject>_val.csv` + `dev/<subject>_dev.csv` (few-shot); columns: id, question, A, B, C, D, answer
  (+ explanation in dev). The `test` split has no answers and is not used.
- Either of the above may instead hold one parquet per subject and split: `<split>/<subject>.parquet`.
- hellaswag, winogrande: the hub's columns in `validation.{parquet,jsonl,json}` (+ optional `train.*` for few-shot),
  or parquet shards named `validation-*.parquet` / under a `validation/` folder.

Relative folders resolve from the repository root (as the evaluate plan does).
"""

from __future__ import annotations

import csv
import difflib
import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.paths import ASSETS, repo_path

ZH_SMOKE = ASSETS / "zh_smoke"
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MCLayout:
    """A per-subject multiple-choice layout (CMMLU / C-Eval style)."""

    builtin: str  # lm-eval task folder under lm_eval/tasks
    template: str  # the built-in default template in that folder
    group_file: str | None  # the built-in group YAML (None: a single task)
    prefix: str  # task name = prefix + subject
    eval_split: str  # the scored split
    eval_key: str  # lm-eval config key naming the scored split
    fewshot_split: str
    csv_suffix: bool  # C-Eval names files <subject>_<split>.csv
    columns: tuple[str, ...]
    question: str
    answer: str
    description: str  # for subjects without a built-in file


@dataclass(frozen=True)
class HubLayout:
    """A single task stored in the hub's own columns (hellaswag / winogrande)."""

    builtin_file: str  # relative to lm_eval/tasks
    columns: tuple[str, ...]


_CMMLU = dict(builtin="cmmlu", template="_default_template_yaml", eval_split="test", eval_key="test_split",
              fewshot_split="dev", csv_suffix=False, columns=("Question", *LETTERS, "Answer"), question="Question",
              answer="Answer")
LAYOUTS: dict[str, MCLayout | HubLayout] = {
    "cmmlu": MCLayout(**_CMMLU, group_file="_cmmlu.yaml", prefix="cmmlu_",
                      description="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"),
    "zh_smoke": MCLayout(**_CMMLU, group_file=None, prefix="",
                         description="以下是单项选择题，请直接给出正确答案的选项。\n\n"),
    "ceval-valid": MCLayout(builtin="ceval", template="_default_ceval_yaml", group_file="_ceval-valid.yaml",
                            prefix="ceval-valid_", eval_split="val", eval_key="validation_split", fewshot_split="dev",
                            csv_suffix=True, columns=("question", *LETTERS, "answer"), question="question",
                            answer="answer", description="以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n"),
    "hellaswag": HubLayout("hellaswag/hellaswag.yaml", ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "winogrande": HubLayout("winogrande/default.yaml", ("sentence", "option1", "option2", "answer")),
}
HUB_EXTS = (".parquet", ".jsonl", ".json")


def lm_eval_tasks_dir() -> Path:
    """The installed lm-eval's built-in task folder (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lm-eval is not installed (pip install 'lm-eval[hf]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


# ------------------------------------------------------------------------------------------------------------------
# Finding and checking the files
# ------------------------------------------------------------------------------------------------------------------
def _layout(task: str) -> MCLayout | HubLayout:
    if task not in LAYOUTS:
        raise ValueError(f"no local mirror for task {task!r}: mirrors are supported for {', '.join(LAYOUTS)}"
                         + _suggest(task, LAYOUTS))
    return LAYOUTS[task]


def _expected(task: str) -> str:
    lay = LAYOUTS[task]
    if isinstance(lay, HubLayout):
        return (f"validation.parquet|jsonl|json (+ optional train.*), or validation-*.parquet / validation/*.parquet, "
                f"with columns {', '.join(lay.columns)}")
    sub = "zh_smoke" if task == "zh_smoke" else "<subject>"
    ev, fs = lay.eval_split, lay.fewshot_split
    csv_names = (f"{ev}/{sub}_{ev}.csv + {fs}/{sub}_{fs}.csv" if lay.csv_suffix else f"{ev}/{sub}.csv + {fs}/{sub}.csv")
    return (f"{csv_names} (or {ev}/{sub}.parquet + {fs}/{sub}.parquet) with columns {', '.join(lay.columns)}"
            + (" after an unnamed index column" if not lay.csv_suffix else ""))


def _subject_file(lay: MCLayout, folder: Path, split: str, subject: str) -> Path | None:
    names = [f"{subject}_{split}.csv" if lay.csv_suffix else f"{subject}.csv", f"{subject}.parquet"]
    return next((folder / split / n for n in names if (folder / split / n).is_file()), None)


def _subjects(lay: MCLayout, folder: Path) -> list[str]:
    found = set()
    for path in (folder / lay.eval_split).glob("*"):
        if path.suffix == ".parquet":
            found.add(path.stem)
        elif path.suffix == ".csv":
            suffix = f"_{lay.eval_split}"
            if not lay.csv_suffix:
                found.add(path.stem)
            elif path.stem.endswith(suffix):
                found.add(path.stem[: -len(suffix)])
    return sorted(found)


def _hub_split_files(folder: Path, split: str) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in HUB_EXTS
             and (p.stem == split or p.stem.startswith(f"{split}-") or p.parent.name == split)]
    return sorted(files)


def mirror_files(task: str, folder: str | Path) -> dict[str, dict[str, Path | list[Path]]]:
    """{lm-eval task name: {split: file(s)}} for a mirror, after checking it (see `check_mirror`)."""
    lay, root = _layout(task), repo_path(folder).resolve()
    where = f"mirror of {task!r} at {root}"
    if not root.is_dir():
        raise ValueError(f"{where}: folder not found; `make mirrors` downloads the published files into the folder "
                         f"configs/evaluate.yaml names, or give your own copy: expected {_expected(task)}")
    if isinstance(lay, HubLayout):
        splits = {s: _hub_split_files(root, s) for s in ("validation", "train")}
        if not splits["validation"]:
            raise ValueError(f"{where}: no validation file found; expected {_expected(task)}")
        if len({p.suffix for p in splits["validation"] + splits["train"]}) > 1:
            raise ValueError(f"{where}: mixed file formats; use one of {', '.join(HUB_EXTS)}")
        return {task: {s: files for s, files in splits.items() if files}}
    subjects = _subjects(lay, root)
    if task == "zh_smoke":
        subjects = [s for s in subjects if s == "zh_smoke"]
    if not subjects:
        raise ValueError(f"{where}: no files in the expected layout; expected {_expected(task)}")
    out: dict[str, dict[str, Path | list[Path]]] = {}
    for subject in subjects:
        files = {s: _subject_file(lay, root, s, subject) for s in (lay.eval_split, lay.fewshot_split)}
        missing = [s for s, f in files.items() if f is None]
        if missing:
            raise ValueError(f"{where}: subject {subject!r} has no {missing[0]} file; expected {_expected(task)}")
        if len({f.suffix for f in files.values()}) > 1:
            raise ValueError(f"{where}: subject {subject!r} mixes csv and parquet files")
        out[lay.prefix + subject] = files
    return out


def _columns(path: Path) -> list[str]:
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return next(csv.reader(fh), [])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    rows = _read_rows(path)
    return list(next(rows, {}).keys())


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            yield from csv.DictReader(fh)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            yield from (json.loads(line) for line in fh if line.strip())
    else:  # .json: a list of rows, or JSON lines
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        yield from data if isinstance(data, list) else [data]


def _as_list(files: Path | list[Path]) -> list[Path]:
    return files if isinstance(files, list) else [files]


def check_mirror(task: str, folder: str | Path) -> None:
    """Raise ValueError naming the task, the path and the expected layout/columns when the mirror is unusable."""
    lay = _layout(task)
    for splits in mirror_files(task, folder).values():
        for path in (p for files in splits.values() for p in _as_list(files)):
            columns = _columns(path)
            missing = [c for c in lay.columns if c not in columns]
            if missing:
                raise ValueError(f"mirror of {task!r}: {path} lacks column(s) {', '.join(missing)}; has "
                                 f"{', '.join(columns) or 'none'}; expected {_expected(task)}")
            if isinstance(lay, MCLayout):
                for i, row in enumerate(_read_rows(path), start=1):
                    if str(row[lay.answer]).strip() not in LETTERS:
                        raise ValueError(f"mirror of {task!r}: {path} row {i}: {lay.answer} is "
                                         f"{row[lay.answer]!r}, expected one of A, B, C, D")


# ------------------------------------------------------------------------------------------------------------------
# Writing the task YAMLs
# ------------------------------------------------------------------------------------------------------------------
def _loader(files: dict[str, Path | list[Path]]) -> dict[str, Any]:
    suffix = _as_list(next(iter(files.values())))[0].suffix
    data_files = {s: [str(p) for p in f] if isinstance(f, list) else str(f) for s, f in files.items()}
    kwargs: dict[str, Any] = {"data_files": data_files}
    if suffix == ".csv":
        kwargs["keep_default_na"] = False  # an option reading "NA" or "None" stays text, as on the hub
    return {"dataset_path": {".csv": "csv", ".parquet": "parquet"}.get(suffix, "json"), "dataset_name": None,
            "dataset_kwargs": kwargs}


def _dump(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")


def write_task_yamls(mirrors: dict[str, str], out_dir: Path) -> list[str]:
    """Write lm-eval YAMLs under ``out_dir/<task>/`` that run each mirrored task from its local folder.

    Returns the task names to pass to lm-eval (the keys of ``mirrors``); use ``TaskManager(include_path=out_dir)``.
    """
    builtin = lm_eval_tasks_dir()
    out_dir = Path(out_dir)
    for task, folder in mirrors.items():
        lay, tasks = _layout(task), mirror_files(task, folder)
        check_mirror(task, folder)
        task_dir = out_dir / task
        task_dir.mkdir(parents=True, exist_ok=True)
        for old in task_dir.glob("*.yaml"):
            old.unlink()
        if isinstance(lay, HubLayout):
            files = tasks[task]
            _dump(task_dir / f"{task}.yaml", {"include": str(builtin / lay.builtin_file), "task": task,
                                              **_loader(files), "training_split": "train" if "train" in files else None})
            continue
        for name, files in tasks.items():
            subject = name[len(lay.prefix):]
            own = builtin / lay.builtin / f"{name}.yaml"
            if own.is_file() and lay.group_file:  # the built-in subject file: template + its description
                cfg: dict[str, Any] = {"include": str(own), "task": name}
            else:
                cfg = {"include": str(builtin / lay.builtin / lay.template), "task": name,
                       "description": lay.description.format(subject=subject)}
            cfg.update(_loader(files))
            cfg.update({lay.eval_key: lay.eval_split, "fewshot_split": lay.fewshot_split})
            _dump(task_dir / f"{name}.yaml", cfg)
        if lay.group_file:
            group = yaml.safe_load((builtin / lay.builtin / lay.group_file).read_text(encoding="utf-8"))
            group.update(group=task, task=sorted(tasks))
            _dump(task_dir / f"_{task}.yaml", group)
    return list(mirrors)


# ------------------------------------------------------------------------------------------------------------------
# Task names and items
# ------------------------------------------------------------------------------------------------------------------
def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_tasks(names: Iterable[str], task_manager: Any, mirrored: Iterable[str] = ()) -> None:
    """Raise ValueError for names that are neither lm-eval tasks/groups/tags nor mirrored, with close names.

    Also refuses cmmlu / ceval-valid tasks that would load from the hub (script-based there; datasets >= 4 refuses):
    those need a mirror.
    """
    mirrored = set(mirrored)
    known = set(task_manager.all_tasks) | mirrored
    builtin = lm_eval_tasks_dir().resolve()
    problems = []
    for name in names:
        if name not in known:
            problems.append(f"unknown task {name!r}{_suggest(name, known | set(LAYOUTS))}")
            continue
        family = next((t for t in ("cmmlu", "ceval-valid") if name == t or name.startswith(f"{t}_")), None)
        entry = task_manager.task_index.get(name)
        from_builtin = entry is not None and entry.yaml_path is not None and builtin in entry.yaml_path.resolve().parents
        if family and name not in mirrored and from_builtin:
            problems.append(f"task {name!r} loads a script-based hub dataset that datasets >= 4 refuses (and the hub "
                            f"may be offline): give a local mirror of {family!r} (`make mirrors` fetches it; "
                            f"{_expected(family)})")
    if problems:
        raise ValueError("; ".join(problems))


def mirror_problem(task: str, folder: str | Path) -> str | None:
    """`check_mirror`'s verdict as a problem text with the config key, or None (the evaluate pre-check)."""
    try:
        check_mirror(task, folder)
    except (ValueError, OSError) as err:
        return f"`mirrors.{task}`: {err}"
    return None


_NAME_LINE = re.compile(r"""^[ \t]*(?:-[ \t]*)?["']?(task|group|tag)["']?:[ \t]*(.*?)[ \t]*(?:#.*)?$""")
_LIST_ITEM = re.compile(r"""^[ \t]*-[ \t]*["']?([^\s#:{}\[\]"']+)["']?[ \t]*$""")


_NOT_TASK_FILES = (".py", ".pyc", ".md", ".json", ".jsonl", ".csv", ".txt", ".parquet")


def _names_in(text: str) -> set[str]:
    """Task, group and tag names a task YAML declares (scalar, inline list or block list)."""
    names: set[str] = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = _NAME_LINE.match(line)
        if not found:
            continue
        value = found.group(2)
        if value.startswith("["):
            names.update(v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip())
        elif value and not value.startswith(("!", "{", "|", ">")):
            names.add(value.strip("'\""))
        elif not value:
            for nxt in lines[i + 1:]:
                item = _LIST_ITEM.match(nxt)
                if not item:
                    break
                names.add(item.group(1))
    return names


@functools.cache
def known_task_names() -> frozenset[str]:
    """lm-eval's task, group and tag names read from its task files with a pattern (one to two seconds, then cached
    per lm-eval version; lm-eval's own TaskManager takes 10-20 s). On lm-eval 0.4.13 a superset of every name
    TaskManager indexes; the run checks the names again with TaskManager itself."""
    from importlib import metadata

    cache = _cache_dir() / f"lm-eval-{metadata.version('lm_eval')}-names.json"
    if cache.is_file():
        return frozenset(json.loads(cache.read_text(encoding="utf-8")))
    names: set[str] = set()
    for path in lm_eval_tasks_dir().rglob("*"):  # YAML, and the extension-less files task YAMLs `include`
        if path.is_file() and path.suffix not in _NOT_TASK_FILES and "__pycache__" not in path.parts:
            names |= _names_in(path.read_text(encoding="utf-8", errors="replace"))
    _write_cache(cache, names)
    return frozenset(names)


def _cache_dir() -> Path:
    return Path(os.environ.get("ZH_ALIGN_TASK_INDEX") or repo_path(".cache/lm-eval-index"))


def _write_cache(path: Path, names: set[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(names)), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only checkout: the index is rebuilt next time


def unknown_tasks(names: Iterable[str], mirrors: Iterable[str]) -> list[str]:
    """Problems for task names neither lm-eval nor a mirror knows, each with the closest names (the config check;
    the run checks again with lm-eval's TaskManager)."""
    local = set(mirrors) | {"zh_smoke"}
    missing = [n for n in names if n not in local]
    if not missing:
        return []
    known = known_task_names()
    return [f"unknown task {n!r}{_suggest(n, known | set(LAYOUTS))}; see `lm-eval ls tasks`, or name a mirrored task "
            f"({', '.join(LAYOUTS)})" for n in missing if n not in known]


def _item_text(lay: MCLayout | HubLayout, row: dict[str, Any]) -> str:
    if isinstance(lay, MCLayout):
        return "\n".join([str(row[lay.question]).strip(), *(f"{c}. {row[c]}" for c in LETTERS)])
    if "endings" in row:
        return "\n".join([f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b']}".strip(), *map(str, row["endings"])])
    return "\n".join([str(row["sentence"]), str(row["option1"]), str(row["option2"])])


def eval_items(mirrors: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(lm-eval task name, question text with its choices) for every row of every split of the local copies."""
    for task, folder in mirrors.items():
        lay = _layout(task)
        for name, splits in mirror_files(task, folder).items():
            for path in (p for files in splits.values() for p in _as_list(files)):
                for row in _read_rows(path):
                    yield name, _item_text(lay, row)
