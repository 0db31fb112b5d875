"""OASST1 (OpenAssistant/oasst1): message rows → conversation trees → the best path (SFT) and ranked sibling pairs
(preference). The only source with native Chinese preference pairs (its zh trees)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from itertools import combinations
from typing import Any

from pipeline.data.sources.base import BadRow, Message, Record, RowStream, Sample, Source, SourceConfig, pref, sft, turn


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


SOURCE = Source(
    "oasst1", ("sft", "pref"), ("data/*",), parse_oasst1, "Apache-2.0", "hub dataset card (OpenAssistant/oasst1)",
    noncommercial=False,
    # one zh tree: the best path (4 turns); 3 pairs among the ranked root replies + 1 under the follow-up
    sample=Sample(1, 4, "请用通俗的语言解释一下什么是大语言模型"))
