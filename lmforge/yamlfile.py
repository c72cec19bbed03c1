"""Reading YAML files users write (run configs, pipelines, cleaning and model configs): one-line errors naming the
file and line, duplicate keys refused, and every mapping remembering the line of each key so that a bad value
found later names it too (no torch: data tools import this)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LMForgeError
from lmforge.files import read_utf8

__all__ = ["YamlMap", "key_at", "leading_comment", "merge", "parse_value", "parse_yaml", "read_yaml_file"]


def leading_comment(text: str, paragraph: bool = False) -> list[str]:
    """The comment lines that open a YAML file (a recipe's or pipeline's description), without the "# " and with
    their indentation; ``paragraph``: up to the first empty comment line."""
    out = []
    for ln in text.splitlines():
        if not ln.startswith("#") or (paragraph and not ln[1:].strip()):
            break
        out.append(ln[2:].rstrip() if ln.startswith("# ") else ln[1:].rstrip())
    return out


class YamlMap(dict):
    """A mapping read from a YAML file: ``source`` is the file, ``lines[key]`` the line its key is on."""

    def __init__(self, *args: Any, source: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.source = source
        self.lines: dict[Any, int] = {}


def key_at(d: Any, key: Any) -> str:
    """``FILE:LINE`` where ``key`` of mapping ``d`` was written, or "" when it did not come from a file."""
    line = getattr(d, "lines", {}).get(key)
    return f"{d.source}:{line}" if line and d.source else ""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` (flags, overrides) on top of ``base``, recursively; a key ``over`` sets no longer points to a line
    of ``base``'s file."""
    out = copy.copy(base)
    if isinstance(out, YamlMap):
        out.lines = dict(base.lines)
    for k, v in over.items():
        if isinstance(v, dict) and out.get(k) is not None and not isinstance(out[k], dict):
            at = key_at(base, k)
            raise LMForgeError(f"{at + ': ' if at else ''}{k}: expected a mapping of settings, got {out[k]!r}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
            if isinstance(out, YamlMap):
                out.lines.pop(k, None)
    return out


class _Loader(yaml.SafeLoader):
    source = ""


def _mapping(loader: _Loader, node: yaml.MappingNode):
    m = YamlMap(source=loader.source)
    yield m
    own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # '<<' merge keys: theirs first, then the mapping's own (which may override them)
    first = len(node.value) - own
    for i, (kn, vn) in enumerate(node.value):
        key = loader.construct_object(kn, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                    kn.start_mark) from None
        line = kn.start_mark.line + 1
        if i >= first and key in m and m.lines.get(key, 0) > 0:
            raise LMForgeError(f"{loader.source}:{line}: duplicate key {key!r} (also on line {m.lines[key]}); "
                               "keep one")
        m[key] = loader.construct_object(vn, deep=False)
        m.lines[key] = line if i >= first else -line  # (negative: came from a merge key, may be overridden)
    m.lines = {k: abs(v) for k, v in m.lines.items()}


_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse ``text`` (read from ``source``), refusing duplicate keys; mappings come back as YamlMap."""
    if "\0" in text:
        raise LMForgeError(f"{source}:{text[:text.index(chr(0))].count(chr(10)) + 1}: holds a NUL byte; not YAML "
                           "text")
    loader = _Loader(text)
    loader.source = source
    try:
        data = loader.get_single_data()
        _check_size(data, source)
        return data
    except RecursionError:
        raise LMForgeError(f"{source}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise LMForgeError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()


class _ValueLoader(yaml.SafeLoader):
    """YAML for a command-line value: as in files, except that dates stay text (--data.path 2024-01-01)."""


_ValueLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def parse_value(raw: str, flag: str) -> Any:
    """A ``--section.key VALUE`` flag's value, read as YAML (numbers, true/false, null, [lists]); one line naming
    the flag if it does not parse."""
    try:
        return yaml.load(raw, Loader=_ValueLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LMForgeError(f"{flag} {raw!r}: cannot read the value ({why}); quote text that holds YAML "
                           "syntax") from None
    except RecursionError:
        raise LMForgeError(f"{flag}: the value is nested too deeply") from None


MAX_VALUES = 1_000_000  # values a file may expand to through its aliases (a few KB can name billions: "laughs")


def _check_size(data: Any, source: str) -> None:
    """Refuse a document whose aliases expand it past MAX_VALUES values (copying or saving it would never end)."""
    seen, todo = 0, [data]
    while todo:
        x = todo.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise LMForgeError(f"{source}: its aliases (*name) expand it to more than {MAX_VALUES:,} values; "
                               "refusing it")
        if isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)


def read_yaml_file(path: str | Path, what: str = "config") -> Any:
    """Read and parse a YAML file; any failure is one line naming it (and the line, where there is one)."""
    path = Path(path)
    return parse_yaml(read_utf8(path, what), str(path))
