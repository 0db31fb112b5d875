"""The one strict loader: YAML → typed dataclass trees, every problem collected and raised together.

:func:`load_yaml` reads one mapping (duplicate keys and tab indentation refused, errors naming the file and line).
:func:`build` validates a raw tree against a dataclass: an unknown key names the dotted path and the closest valid key,
a wrong type or choice names what was expected and what was given. A dataclass may define ``check(key)``: its
cross-field rules, returning problem texts, where ``key("r")`` spells a field's dotted path (`` `lora.r` ``); it runs
once its own subtree built cleanly. Overrides (``--set key=value``) are applied to the raw tree *before* validation
(:func:`apply_override`), so they pass the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import shlex
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.errors import ConfigError

Key = Callable[[str], str]  # field name → its dotted path as problems show it


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path | str) -> dict[str, Any]:
    """Read one YAML mapping with errors that name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); save "
                           f"the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 {path.name} > fixed.yaml`)"]) from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line[: len(line) - len(line.lstrip())].count("\t"):
            raise ConfigError([f"{path}:{lineno}: tab character in the indentation; YAML indents with spaces only"])
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{where}: malformed YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of keys at the top, got a {type(data).__name__}; write "
                           f"`key: value` lines (see the files in configs/)"])
    return data


def yaml_value(value: Any) -> str:
    """A value as an override spells it (``[a, b]``, ``null``); strings as they are."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def close(word: str, options: Iterable[str], prefix: str = "") -> str:
    """``; did you mean `x`?`` for the closest option, or ''."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean `{prefix}{match[0]}`?" if match else ""


# --------------------------------------------------------------------------------------------------------------
# Validation: raw YAML tree -> dataclass, collecting every problem
# --------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def fields(cls: type) -> dict[str, dataclasses.Field]:
    """The keys a config dataclass takes (``source_file`` is filled in by the loader, never read from YAML)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}


class _Builder:
    def __init__(self, source: str, overridden: set[str]):
        self.source = source
        self.overridden = overridden
        self.problems: list[str] = []
        self.malformed = 0              # problems of shape (unknown key, wrong type): checks do not run on those

    def fail(self, path: str, msg: str) -> None:
        origin = " (from --set)" if path in self.overridden else ""
        self.problems.append(f"{self.source}: `{path}`{origin}: {msg}")
        self.malformed += 1

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if raw is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                return self.value(inner[0], raw, path)
            for candidate in inner:          # `int | Literal["auto"]`: the first member that takes the value
                problems, malformed = len(self.problems), self.malformed
                value = self.value(candidate, raw, path)
                if len(self.problems) == problems:
                    return value
                del self.problems[problems:]
                self.malformed = malformed
            self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
            return raw
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, raw, path)
        if origin is Literal:
            choices = typing.get_args(tp)
            if raw not in choices:
                self.fail(path, f"expected {_type_name(tp)}; got {raw!r}" + close(str(raw), map(str, choices)))
            return raw
        if origin is list:
            if not isinstance(raw, list):
                self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
                return raw
            (item,) = typing.get_args(tp)
            return [self.value(item, v, f"{path}.{i}") for i, v in enumerate(raw)]
        if origin is dict:
            if not isinstance(raw, dict):
                self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
                return raw
            _, item = typing.get_args(tp)
            return {str(k): self.value(item, v, f"{path}.{k}") for k, v in raw.items()}
        return self.scalar(tp, raw, path)

    def scalar(self, tp: Any, raw: Any, path: str) -> Any:
        if tp is float:
            if isinstance(raw, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
                try:
                    return float(raw)
                except ValueError:
                    pass
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return float(raw)
        elif tp is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
        elif tp is str:
            if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
                return str(raw)
        elif isinstance(raw, tp):
            return raw
        self.fail(path, f"expected {_type_name(tp)}; got {raw!r}")
        return raw

    def dataclass(self, cls: type, raw: Any, path: str) -> Any:
        if not isinstance(raw, dict):
            self.fail(path or "(top)", f"expected a mapping; got {raw!r}")
            return None
        known = fields(cls)
        hints = typing.get_type_hints(cls)
        before = self.malformed
        kwargs: dict[str, Any] = {}
        for key, val in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in known:
                self.fail(sub, f"unknown key{close(str(key), known, f'{path}.' if path else '')} "
                               f"(valid here: {', '.join(known)})")
                continue
            kwargs[key] = self.value(hints[key], val, sub)
        for name, f in known.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(f"{path}.{name}" if path else name, "required key is missing")
        try:
            obj = cls(**kwargs)
        except TypeError:
            return None
        if self.malformed == before and hasattr(obj, "check"):  # cross-field rules on a well-formed subtree
            self.problems += [f"{self.source}: {p}" for p in obj.check(lambda name: f"`{path}.{name}`" if path
                                                                       else f"`{name}`")]
        return obj


def build(cls: type, raw: dict[str, Any], source: str, overridden: set[str] | None = None) -> Any:
    """Validate a raw YAML tree against a dataclass (and the ``check`` rules of every dataclass in it); raise every
    problem at once."""
    builder = _Builder(source, overridden or set())
    obj = builder.dataclass(cls, raw, "")
    if builder.problems:
        raise ConfigError(builder.problems)
    return obj


def share(key: Key, name: str, value: float) -> list[str]:
    """The problem of a share outside [0, 1], or none."""
    return [] if 0.0 <= value <= 1.0 else [f"{key(name)} must be in [0, 1]; got {value}"]


def at_least(key: Key, obj: Any, names: Iterable[str], low: int = 1, *, nullable: bool = False) -> list[str]:
    """The problems of integer fields below ``low`` (null allowed with ``nullable``)."""
    problems = []
    for name in names:
        value = getattr(obj, name)
        if value is None and nullable:
            continue
        if value < low:
            problems.append(f"{key(name)} must be at least {low}{' or null' if nullable else ''}; got {value}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------
def parse_overrides(sets: list[str] | None = None, overrides: str | None = None) -> list[tuple[str, Any]]:
    """`--set k=v` (repeatable) and `--overrides "k=v k2=v2"`; values are YAML (`tasks=[a, b]`, `limit=null`)."""
    try:
        words = shlex.split(overrides or "")
    except ValueError as err:  # an unbalanced quote: `SET="adapter=it's"`
        raise ConfigError([f"overrides {overrides!r}: {err} (they are split like a shell line); put a value that "
                           f"holds a quote inside the other kind of quotes, e.g. SET=\"key=\\\"it's\\\"\" "
                           f"(key=\"it's\")"]) from None
    items = list(sets or []) + words
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: expected key=value, e.g. lora.r=8"])
        try:
            parsed.append((key.strip(), yaml.safe_load(value) if value != "" else ""))
        except yaml.YAMLError as err:
            why = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError([f"override {item!r}: the value is not valid YAML ({why}); an override with "
                               f"spaces goes in quotes as a whole, e.g. SET=\"'key={{a: 1}}'\""]
                              ) from None
    return parsed


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted path in a raw YAML tree. List items by index (`sources.0.path`) or by name (`sources.shp.path`).

    Unknown keys are created, so that validation reports them with a suggestion.
    """
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, ".".join(parts[: i + 1]))]
        else:
            nxt = node.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = node[part] = {}
            node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [it.get("name") for it in items if isinstance(it, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError([f"override `{where}`: no list item {part!r}; use an index 0..{len(items) - 1}"
                       + (f" or a name ({', '.join(map(str, names))})" if any(names) else "")])
