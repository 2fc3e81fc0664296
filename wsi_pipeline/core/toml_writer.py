"""Writing TOML: the standard library reads it (:mod:`tomllib`) but does not write it, and the
cards the pipeline writes need only plain tables of strings, numbers, booleans and lists."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dump_toml"]


def dump_toml(document: Mapping[str, Any]) -> str:
    """Serialise nested dicts of strings, numbers, booleans and lists as TOML.

    Scalars and lists of scalars become ``key = value``; dicts become ``[tables]`` and lists of
    dicts ``[[arrays of tables]]``. Empty dicts become inline ``{}``.
    """
    lines: list[str] = []
    _dump_table(document, (), lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(table: Mapping[str, Any], prefix: tuple[str, ...], lines: list[str]) -> None:
    def is_table(v: Any) -> bool:
        return isinstance(v, Mapping) and bool(v)

    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, Mapping) for i in v)

    for key, value in table.items():
        if not (is_table(value) or is_table_array(value)):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        name = ".".join(_toml_key(k) for k in (*prefix, key))
        if is_table(value):
            lines += ["", f"[{name}]"]
            _dump_table(value, (*prefix, key), lines)
        elif is_table_array(value):
            for item in value:
                lines += ["", f"[[{name}]]"]
                _dump_table(item, (*prefix, key), lines)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
