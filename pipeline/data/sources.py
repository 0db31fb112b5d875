"""The seven datasets: where their files are, how their rows become SFT and preference records, their licences.

Every source is read from files in the hub repository's own layout — downloaded at the pinned revision, or a local
copy named by ``path:`` — so the same parser runs on both. A file's subset and split come from its place in that
layout: the split is the file name up to the first ``-`` or ``.`` (``data/train_prefs-00000-of-00001.parquet`` →
``train_prefs``, ``helpful-base/test.jsonl.gz`` → ``test``), the subset is the folder above it unless that folder is
``data`` (``helpful-base``, ``askculinary``, ``Alpaca-7B``); for COIG, whose files are its subsets, the file stem.

A record is a plain dict, before any cleaning:
``kind`` (``sft`` | ``pref``), ``messages`` (SFT) or ``prompt`` / ``chosen`` / ``rejected`` (pref) as lists of
``{"role", "content"}``, ``source``, ``source_id``, ``lang_hint`` (the dataset's own language tag, or None), ``group``
(what the eval split keeps together: an OASST1 tree, an SHP post; None = the prompt) and ``meta`` (JSON text).
A row that cannot be parsed becomes a :class:`BadRow`, which the reader counts by reason before going on.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.config import SourceConfig

Message = dict[str, str]
Record = dict[str, Any]
RowStream = Iterator[tuple["RawFile", int, dict[str, Any]]]


class BadRow(ValueError):
    """A row the parser cannot use; the message is the reason it is counted under."""


class SourceError(StageError):
    """A source that cannot be read at all (missing path, gated, offline); the message says how to fix it."""


@dataclass(frozen=True)
class RawFile:
    path: Path
    rel: str            # path inside the repository layout, with forward slashes
    subset: str | None
    split: str | None


@dataclass(frozen=True)
class Dataset:
    """What the project knows about one source: its files, parser, licence and where the licence claim comes from."""
    name: str
    kinds: tuple[str, ...]
    patterns: tuple[str, ...]          # files of the repository that hold rows (fnmatch on the relative path)
    parse: Callable[[RowStream, SourceConfig], Iterator[Record | BadRow]]
    licence: str
    licence_source: str
    noncommercial: bool                # non-commercial or unclear terms: tags the run `licence.noncommercial`
    subset_glob: str = "{}/*"          # the files of one subset in the repository (what `subsets:` downloads)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".tar.gz")


def _strip_suffix(name: str) -> str:
    for suffix in sorted(ROW_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def raw_file(path: Path, rel: str, dataset: Dataset) -> RawFile:
    parts = rel.split("/")
    stem = _strip_suffix(parts[-1])
    if dataset.name == "coig":
        return RawFile(path, rel, stem, None)
    folder = parts[-2] if len(parts) > 1 and parts[-2] != "data" else None
    return RawFile(path, rel, folder, re.split(r"[-.]", stem, maxsplit=1)[0])


def list_files(root: Path, src: SourceConfig, dataset: Dataset) -> list[RawFile]:
    """The row files of a source under ``root`` (a folder in the hub layout, or one file), filtered by subsets/splits."""
    if root.is_file():
        rel = root.name if root.parent.name in ("", "data") else f"{root.parent.name}/{root.name}"
        found = [raw_file(root, rel, dataset)]
    else:
        found = [raw_file(p, p.relative_to(root).as_posix(), dataset) for p in sorted(root.rglob("*"))
                 if p.is_file() and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat)
                                        for pat in dataset.patterns)]
    return [f for f in found
            if (src.subsets is None or f.subset in src.subsets) and (src.splits is None or f.split in src.splits)]


def _lines(raw: bytes, bad: Counter) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
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
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(f.path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if name.endswith(".tar.gz"):
        with tarfile.open(f.path, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")),
                             key=lambda m: m.name)
            for n, m in enumerate(members, 1):
                yield from ((n, row) for _, row in _json_document(tar.extractfile(m).read(), bad))
        return
    raw = gzip.decompress(f.path.read_bytes()) if name.endswith(".gz") else f.path.read_bytes()
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


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers of the parsers
# ----------------------------------------------------------------------------------------------------------------
def field_text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    """A string field; a missing or non-string required field is a bad row named after the field."""
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"`{key}` missing or not text")
    return value


def user_turn(instruction: str, inp: str) -> str:
    """The one rule for instruction-style sources, so the same item from two sources dedups."""
    inp = inp.strip()
    return instruction.strip() + ("\n" + inp if inp else "")


def turn(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def sft(messages: list[Message], source_id: str, *, lang: str | None = None, group: str | None = None,
        meta: dict[str, Any] | None = None) -> Record:
    return {"kind": "sft", "messages": messages, "prompt": None, "chosen": None, "rejected": None,
            "source_id": source_id, "lang_hint": lang, "group": group, "meta": _meta(meta)}


def pref(prompt: list[Message], chosen: str, rejected: str, source_id: str, *, lang: str | None = None,
         group: str | None = None, meta: dict[str, Any] | None = None) -> Record:
    return {"kind": "pref", "messages": None, "prompt": prompt, "chosen": [turn("assistant", chosen)],
            "rejected": [turn("assistant", rejected)], "source_id": source_id, "lang_hint": lang, "group": group,
            "meta": _meta(meta)}


def _meta(meta: dict[str, Any] | None) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else ""


def rowwise(fn: Callable[[RawFile, int, dict[str, Any], SourceConfig], Iterable[Record]]):
    """Turn a one-row parser into a stream parser that yields a row's BadRow (for counting) and goes on."""
    def parse(rows: RowStream, src: SourceConfig) -> Iterator[Record | BadRow]:
        for f, n, row in rows:
            try:
                yield from list(fn(f, n, row, src))
            except BadRow as err:
                yield err
    return parse


def _row_id(f: RawFile, n: int) -> str:
    return f"{f.rel}:{n}"


# ----------------------------------------------------------------------------------------------------------------
# OASST1: message rows → trees → best path (SFT) and ranked sibling pairs (pref)
# ----------------------------------------------------------------------------------------------------------------
def parse_oasst1(rows: RowStream, src: SourceConfig) -> Iterator[Record | BadRow]:
    """Rebuild each tree from its message rows. Deleted messages and those that failed review leave with their
    subtree. SFT: from the root, follow the best-ranked assistant reply (lowest ``rank``; a lone unranked reply is
    taken), then the best-ranked prompter follow-up, until a step has no reply — one conversation per tree.
    Preference: every prompter message with at least two ranked assistant replies gives every (better, worse) pair by
    rank, with all earlier turns of that branch as the prompt. ``lang`` is the tree's own tag."""
    messages: dict[str, dict[str, Any]] = {}
    for _, _, row in rows:
        if not (isinstance(row.get("message_id"), str) and isinstance(row.get("text"), str)
                and row.get("role") in ("prompter", "assistant")):
            yield BadRow("message without id, text or role")
            continue
        messages[row["message_id"]] = row
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in messages.values():
        if m.get("parent_id") is not None:
            children[m["parent_id"]].append(m)
    for m in messages.values():
        if m.get("parent_id") is not None and m["parent_id"] not in messages:
            yield BadRow("message whose parent is missing")
        elif _dropped(m) and not _below_dropped(m, messages):
            reason = "deleted message (with its subtree)" if m.get("deleted") else "failed review (with its subtree)"
            yield from (BadRow(reason) for _ in range(_size(m, children)))
    roots = sorted((m for m in messages.values() if m.get("parent_id") is None and m["role"] == "prompter"),
                   key=lambda m: (m.get("message_tree_id") or "", m["message_id"]))
    for root in roots:
        if not _dropped(root):
            yield from _oasst_tree(root, children)


def _below_dropped(m: dict[str, Any], messages: dict[str, dict[str, Any]]) -> bool:
    while (parent := messages.get(m.get("parent_id"))) is not None:
        if _dropped(parent):
            return True
        m = parent
    return False


def _size(m: dict[str, Any], children: dict[str, list]) -> int:
    return 1 + sum(_size(c, children) for c in children.get(m["message_id"], []))


def _dropped(m: dict[str, Any]) -> bool:
    return bool(m.get("deleted")) or m.get("review_result") is False


def _kids(m: dict[str, Any], children: dict[str, list], role: str) -> list[dict[str, Any]]:
    return [c for c in children.get(m["message_id"], []) if c["role"] == role and not _dropped(c)]


def _ranked(kids: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((k for k in kids if isinstance(k.get("rank"), int)), key=lambda k: (k["rank"], k["message_id"]))


def _best(kids: list[dict[str, Any]]) -> dict[str, Any] | None:
    ranked = _ranked(kids)
    return ranked[0] if ranked else kids[0] if len(kids) == 1 else None


def _as_turn(m: dict[str, Any]) -> Message:
    return turn("user" if m["role"] == "prompter" else "assistant", m["text"])


def _oasst_tree(root: dict[str, Any], children: dict[str, list]) -> Iterator[Record]:
    tree, lang = root.get("message_tree_id") or root["message_id"], root.get("lang")
    path, node = [root], root
    while (reply := _best(_kids(node, children, "assistant"))) is not None:
        path.append(reply)
        node = _best(_kids(reply, children, "prompter"))
        if node is None:
            break
        path.append(node)
    if path[-1]["role"] == "prompter":
        path.pop()
    if len(path) >= 2:
        yield sft([_as_turn(m) for m in path], f"{tree}/{path[-1]['message_id']}", lang=lang, group=tree)
    stack = [(root, [_as_turn(root)])]
    while stack:
        node, prompt = stack.pop()
        replies = _kids(node, children, "assistant")
        for better, worse in combinations(_ranked(replies), 2):
            if better["rank"] < worse["rank"]:
                yield pref(prompt, better["text"], worse["text"], f"{node['message_id']}:{better['message_id']}>"
                           f"{worse['message_id']}", lang=lang, group=tree)
        for reply in sorted(replies, key=lambda r: r["message_id"], reverse=True):
            for follow in sorted(_kids(reply, children, "prompter"), key=lambda r: r["message_id"], reverse=True):
                stack.append((follow, [*prompt, _as_turn(reply), _as_turn(follow)]))


# ----------------------------------------------------------------------------------------------------------------
# Instruction-style sources: COIG and COIG-PC-core
# ----------------------------------------------------------------------------------------------------------------
def _instruction(instruction: str, inp: str, output: str, source_id: str, meta: dict | None = None) -> Record:
    return sft([turn("user", user_turn(instruction, inp)), turn("assistant", output)], source_id, meta=meta)


@rowwise
def parse_coig(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    """COIG's raw files, read directly (the hub's loading script does not run on datasets >= 4). Exam and
    human-value part 2 rows: instruction = ``textbox_q_instruction``, input = context + question, answer = answer +
    analysis. The counterfactual-correction chats become multi-turn conversations."""
    rid = _row_id(f, n)
    subset = f.subset or ""
    if subset.startswith("translated"):
        yield _instruction(field_text(row, "trans_instruction"), field_text(row, "trans_input", required=False),
                           field_text(row, "trans_output"), rid, {"subset": subset})
    elif subset.startswith("counterfactual") or subset.startswith("counterfactural"):
        yield sft(_coig_chat(row), rid, meta={"subset": subset})
    elif "textbox_q_instruction" in row or subset.startswith("exam") or subset.endswith("part2"):
        inp = "\n".join(p for p in (field_text(row, "textbox_q_context", required=False).strip(),
                                    field_text(row, "textbox_question", required=False).strip()) if p)
        answer = "\n".join(p for p in (field_text(row, "textbox_answer").strip(),
                                       field_text(row, "textbox_answer_analysis", required=False).strip()) if p)
        yield _instruction(field_text(row, "textbox_q_instruction"), inp, answer, rid, {"subset": subset})
    else:
        yield _instruction(field_text(row, "instruction"), field_text(row, "input", required=False),
                           field_text(row, "output"), rid, {"subset": subset})


def _coig_chat(row: dict[str, Any]) -> list[Message]:
    """One counterfactual-correction dialogue: ``round_0`` … ``round_N``, each ``{"response": "<JSON text with Q
    and A>"}`` (the layout COIG's own loading script reads)."""
    rounds = sorted((int(k.removeprefix("round_")), v) for k, v in row.items()
                    if k.startswith("round_") and k.removeprefix("round_").isdigit())
    if not rounds:
        raise BadRow("chat without round_N entries")
    messages = []
    for _, r in rounds:
        try:
            qa = json.loads(field_text(r if isinstance(r, dict) else {}, "response"))
        except json.JSONDecodeError as err:
            raise BadRow("chat round response is not JSON") from err
        if not isinstance(qa, dict):
            raise BadRow("chat round response is not a Q/A object")
        messages += [turn("user", field_text(qa, "Q")), turn("assistant", field_text(qa, "A"))]
    return messages


@rowwise
def parse_coig_pc_core(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    task = row.get("task_type") if isinstance(row.get("task_type"), dict) else {}
    meta = {"task": row.get("task_name_in_eng"), "domain": row.get("domain"), **{f"task_{k}": v for k, v in task.items()}}
    yield _instruction(field_text(row, "instruction"), field_text(row, "input", required=False),
                       field_text(row, "output"), _row_id(f, n), {k: v for k, v in meta.items() if v})


# ----------------------------------------------------------------------------------------------------------------
# Preference sources
# ----------------------------------------------------------------------------------------------------------------
@rowwise
def parse_shp(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    a, b, history = field_text(row, "human_ref_A"), field_text(row, "human_ref_B"), field_text(row, "history")
    if row.get("labels") not in (0, 1):
        raise BadRow("`labels` missing or not 0/1")
    ratio = row.get("score_ratio")
    if src.min_score_ratio is not None:
        if not isinstance(ratio, (int, float)):
            raise BadRow("`score_ratio` missing or not a number")
        if ratio < src.min_score_ratio:
            raise BadRow(f"score_ratio below min_score_ratio {src.min_score_ratio}")
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    post = str(row.get("post_id") or _row_id(f, n))
    yield pref([turn("user", history)], chosen, rejected,
               f"{post}:{row.get('c_root_id_A')}:{row.get('c_root_id_B')}", group=post,
               meta={"domain": row.get("domain") or f.subset, "score_ratio": ratio})


@rowwise
def parse_ultrafeedback(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    chosen, rejected = _conversation(row, "chosen"), _conversation(row, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BadRow("chosen/rejected do not end with an assistant turn")
    if chosen[:-1] != rejected[:-1] or not chosen[:-1] or chosen[-2]["role"] != "user":
        raise BadRow("chosen and rejected do not share the user prompt")
    sc, sr = row.get("score_chosen"), row.get("score_rejected")
    if isinstance(sc, (int, float)) and isinstance(sr, (int, float)) and sc == sr:
        raise BadRow("tie (score_chosen == score_rejected)")
    pid = str(row.get("prompt_id") or _row_id(f, n))
    yield pref(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], f"{f.split}:{pid}", group=pid,
               meta={"score_chosen": sc, "score_rejected": sr})


def _conversation(row: dict[str, Any], key: str) -> list[Message]:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in value):
        raise BadRow(f"`{key}` is not a list of role/content messages")
    return [turn(m["role"], m["content"]) for m in value]


_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


def hh_turns(transcript: str) -> list[Message]:
    """``\n\nHuman: …\n\nAssistant: …`` → messages, starting with Human and ending with one Assistant reply. The
    published transcripts sometimes hold two turns of one speaker in a row: in the shared turns they are joined into
    one turn; as the final reply (5 of the 2 312 harmless-base test pairs) the pair is counted and left out."""
    parts = _HH_SPEAKER.split(transcript)
    if parts[0].strip() or len(parts) < 5 or parts[1] != "Human":
        raise BadRow("transcript is not Human/Assistant turns")
    speakers = parts[1::2]
    if speakers[-1] != "Assistant":
        raise BadRow("transcript does not end with an Assistant turn")
    if speakers[-2] != "Human":  # e.g. a reply holding an inline "Human:" and a second "Assistant:" after it
        raise BadRow("last reply spans several Assistant turns")
    messages: list[Message] = []
    for who, text in zip(speakers, parts[2::2], strict=True):
        role = "user" if who == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1] = turn(role, messages[-1]["content"] + "\n\n" + text)
        else:
            messages.append(turn(role, text))
    return messages


@rowwise
def parse_hh_rlhf(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    chosen, rejected = hh_turns(field_text(row, "chosen")), hh_turns(field_text(row, "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("chosen and rejected part before the last reply")
    yield pref(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], _row_id(f, n), meta={"subset": f.subset})


@rowwise
def parse_pku_saferlhf(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    prompt, responses = field_text(row, "prompt"), (field_text(row, "response_0"), field_text(row, "response_1"))
    better, safer = row.get("better_response_id"), row.get("safer_response_id")
    rule = src.chosen_by or "safer"
    for key, value in (("better_response_id", better), ("safer_response_id", safer)):
        if (rule == "agree" or key.startswith(rule)) and value not in (0, 1):
            raise BadRow(f"`{key}` missing or not 0/1")
    if rule == "agree" and better != safer:
        raise BadRow("better and safer responses disagree (chosen_by: agree)")
    pick = safer if rule in ("safer", "agree") else better
    flags = [row.get(f"is_response_{i}_safe") for i in (0, 1)]
    meta = {"chosen_safe": flags[pick], "rejected_safe": flags[1 - pick],
            "chosen_severity": row.get(f"response_{pick}_severity_level"),
            "rejected_severity": row.get(f"response_{1 - pick}_severity_level"),
            "rejected_harms": _harms(row.get(f"response_{1 - pick}_harm_category")), "chosen_by": rule}
    yield pref([turn("user", prompt)], responses[pick], responses[1 - pick], _row_id(f, n), meta=meta)


def _harms(categories: Any) -> list[str]:
    return sorted(k for k, v in categories.items() if v) if isinstance(categories, dict) else []


# ----------------------------------------------------------------------------------------------------------------
# The registry and the counting reader
# ----------------------------------------------------------------------------------------------------------------
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("oasst1", ("sft", "pref"), ("data/*",), parse_oasst1, "Apache-2.0",
            "hub dataset card (OpenAssistant/oasst1)", False),
    Dataset("coig", ("sft",), ("*.json", "*.jsonl", "*.tar.gz"), parse_coig, "Apache-2.0",
            "hub dataset card (BAAI/COIG)", False, subset_glob="{}.*"),
    Dataset("coig_pc_core", ("sft",), ("data/*",), parse_coig_pc_core,
            "other (COIG-PC terms)",
            "hub dataset card: licence `other`, per-upstream-source terms accepted on the hub (gated)", True),
    Dataset("shp", ("pref",), ("*/*.json", "*/*.jsonl"), parse_shp, "unspecified",
            "hub dataset card (stanfordnlp/SHP) names no licence; Reddit's API terms apply", True),
    Dataset("ultrafeedback_binarized", ("pref",), ("data/*_prefs-*",), parse_ultrafeedback, "MIT",
            "hub dataset card (HuggingFaceH4/ultrafeedback_binarized)", False),
    Dataset("hh_rlhf", ("pref",), ("harmless-base/*", "helpful-*/*"), parse_hh_rlhf,
            "MIT", "hub dataset card (Anthropic/hh-rlhf: MIT); the design cautions research use only, "
            "not commercial redistribution", True),
    Dataset("pku_saferlhf", ("pref",), ("data/*/*",), parse_pku_saferlhf, "CC-BY-NC-4.0",
            "hub dataset card (PKU-Alignment/PKU-SafeRLHF)", True, subset_glob="data/{}/*"),
)}


def download(src: SourceConfig) -> Path:
    """The source's row files at its pinned revision, fetched from the hub (or its local cache) into the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    dataset = DATASETS[src.name]
    patterns = [dataset.subset_glob.format(s) for s in src.subsets] if src.subsets else list(dataset.patterns)
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


@dataclass
class Tally:
    """What reading one source saw: rows read from its files, and rows skipped by reason."""
    read: int = 0
    skipped: Counter = field(default_factory=Counter)


def records(src: SourceConfig, files: list[RawFile], tally: Tally) -> Iterator[Record]:
    """Every record of a source, stamped with its name; unusable rows are counted in ``tally`` by reason."""
    def stream() -> RowStream:
        for f in files:
            for n, row in read_rows(f, tally.skipped):
                tally.read += 1
                yield f, n, row

    kept = 0
    for rec in DATASETS[src.name].parse(stream(), src):
        if isinstance(rec, BadRow):
            tally.skipped[str(rec)] += 1
            continue
        yield {**rec, "source": src.name}
        kept += 1
        if src.max_rows is not None and kept >= src.max_rows:
            return
