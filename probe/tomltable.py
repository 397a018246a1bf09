"""Typed, located reading of TOML tables, shared by every file format Vantage reads
(catalogs, lab scenarios): an unknown key, a wrong type or a bad value fails with
the key's full path and the reason, through the caller's own exception type.

>>> t = TableReader(doc, "target[0]", {"id", "ports"}, lambda key, why: ValueError(f"{key}: {why}"))
>>> t.items("ports", int)
[443]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

ErrorFactory = Callable[[str, str], Exception]

MAX_NUMBER = 1e12  # no count, size, rate or duration Vantage reads is larger

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "a table",
    bool: "true or false",
}


def type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


class TableReader:
    """One table of a document; ``path`` is its key path (``target[2].expect``)."""

    def __init__(self, table: Any, path: str, allowed: set[str], error: ErrorFactory) -> None:
        self.path, self.error = path, error
        if not isinstance(table, dict):
            raise error(path, "expected a table")
        self.table: dict[str, Any] = table
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, reason: str) -> Exception:
        """The caller's exception for key ``name`` (``name`` may carry an index)."""
        return self.error(self.key(name), reason)

    def get(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
    ) -> Any:
        if name not in self.table:
            if required:
                raise self.fail(name, "is required")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:  # bool is an int subclass
            raise self.fail(name, f"expected {type_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(
                name, f"expected {type_name(kind)}, got {type(value).__name__} {value!r}"
            )
        return value

    def text(self, name: str, *, required: bool = False, default: str | None = None) -> Any:
        value = self.get(name, str, default, required=required)
        if required and not value.strip():
            raise self.fail(name, "must not be empty")
        return value

    def items(self, name: str, kind: type) -> list[Any]:
        values = self.get(name, list, [])
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, kind):
                raise self.fail(f"{name}[{i}]", f"expected {type_name(kind)}, got {v!r}")
        return values

    def strings(self, name: str) -> tuple[str, ...]:
        return tuple(self.items(name, str))

    def choice(self, name: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.get(name, str, default, required=default is None)
        if value not in choices:
            raise self.fail(name, f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    def number(
        self, name: str, default: float, minimum: float = 0.0, maximum: float = MAX_NUMBER
    ) -> float:
        """A finite number in ``minimum..maximum`` (nan, inf and absurd sizes fail here,
        not as an OverflowError later)."""
        value = self.get(name, (int, float), default)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(name, f"must be a finite number, got {value}")
        if value < minimum:
            raise self.fail(name, f"must be at least {minimum:g}, got {value}")
        if value > maximum:
            raise self.fail(name, f"must be at most {maximum:g}, got {value:g}")
        return float(value)

    def sub(self, name: str, allowed: set[str]) -> TableReader | None:
        value = self.get(name, dict)
        return None if value is None else TableReader(value, self.key(name), allowed, self.error)


def to_toml(doc: dict[str, Any]) -> str:
    """Just enough TOML writing for catalogs (strings, numbers, booleans, lists, tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if hasattr(v, "isoformat"):
            return str(v.isoformat())
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    lines: list[str] = []
    for key, v in doc.items():
        if not isinstance(v, dict | list) or (
            isinstance(v, list) and not any(isinstance(x, dict) for x in v)
        ):
            lines.append(f"{key} = {value(v)}")
    for key, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {value(x)}" for k, x in v.items()]
        elif isinstance(v, list) and any(isinstance(x, dict) for x in v):
            for item in v:
                lines.append(f"\n[[{key}]]")
                lines += [f"{k} = {value(x)}" for k, x in item.items()]
    return "\n".join(lines) + "\n"
